"""Time the export against ModelOpt's `export_hf_checkpoint` alone plus a plain vision-bytes copy.

    python bench/bench_export.py --model-dir CKPT --run-dir RUN_OUTPUT_DIR --work SCRATCH [--out X.json]
    python bench/bench_export.py --demo --work /tmp/bexp      # CPU smoke run: tiny demo + quick run

In one process: restore the quantized LM once (not timed against either side), warm the page
cache with the vision bytes, then
  baseline = export_hf_checkpoint(copy of the model) + copy of the vision tensors' bytes to a file;
  ours     = the export's modelopt_export + assemble phases (verification reported apart).
Prints JSON: both times, their ratio (goal <= 1.3), verification time, peak host RSS and peak GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402


def baseline(model, model_dir: Path, target: Path) -> dict:
    """ModelOpt's export alone + copying the vision tensors' bytes (what any export must do)."""
    import warnings

    from modelopt.torch.export import export_hf_checkpoint

    from vlm_autoquant.exporter.assemble import vision_tensors

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(model, export_dir=target)
    t1 = time.perf_counter()
    with (target / "vision.bin").open("wb") as out:
        for _, _, _, shard, start, end in vision_tensors(model_dir):
            with shard.open("rb") as f:
                f.seek(start)
                out.write(f.read(end - start))
    t2 = time.perf_counter()
    return {"export_hf_checkpoint_s": t1 - t0, "vision_copy_s": t2 - t1, "total_s": t2 - t0}


def demo_run(work: Path) -> tuple[Path, Path]:
    """A tiny checkpoint and one quick run of it (CPU smoke test)."""
    from vlm_autoquant.cli import main
    from vlm_autoquant.model.demo import build_demo

    model_dir, captions = build_demo(work / "demo")
    code = main(
        [
            "--scheme-name",
            "fp8-balanced-10b",
            "--model-dir",
            str(model_dir),
            "--calib-file",
            str(captions),
            "--output-dir",
            str(work / "run"),
            "--num-calib-samples",
            "512",
            "--num-calib-steps",
            "2",
            "--num-score-steps",
            "2",
            "--num-eval-samples",
            "64",
            "--seq-len",
            "128",
            "--overwrite",
        ]
    )
    if code:
        sys.exit(f"demo run failed ({code})")
    return model_dir, work / "run"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-dir", type=Path)
    p.add_argument("--run-dir", type=Path, help="the quantization run's --output-dir")
    p.add_argument("--work", type=Path, required=True, help="scratch directory (emptied)")
    p.add_argument("--demo", action="store_true", help="build the tiny demo and a quick run")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    a = p.parse_args()
    from vlm_autoquant.cli.common import configure
    from vlm_autoquant.core.errors import Problems
    from vlm_autoquant.core.timing import Phases, gpu_peak_gib, peak_rss_gib
    from vlm_autoquant.exporter import pipeline as export_pipeline
    from vlm_autoquant.exporter.assemble import vision_tensors
    from vlm_autoquant.exporter.inputs import ExportOptions, gather
    from vlm_autoquant.exporter.pipeline import _restore
    from vlm_autoquant.model.lm import pick_device

    configure(False)
    shutil.rmtree(a.work / "export", ignore_errors=True)
    shutil.rmtree(a.work / "baseline", ignore_errors=True)
    model_dir, run_dir = demo_run(a.work) if a.demo else (a.model_dir, a.run_dir)
    problems = Problems()
    # ModelOpt's format: the side timed against export_hf_checkpoint plus a vision copy
    inputs = gather(
        ExportOptions(
            output_dir=a.work / "export", artifacts_dir=run_dir, model_dir=model_dir, format="modelopt"
        ),
        a.work,
        problems,
    )
    problems.raise_if_any()
    device = pick_device()
    model = _restore(inputs, device)
    for _, _, _, shard, start, end in vision_tensors(model_dir):  # warm cache for both sides
        with shard.open("rb") as f:
            f.seek(start)
            f.read(end - start)
    base = baseline(copy.deepcopy(model), model_dir, a.work / "baseline")
    del model
    if device.type == "cuda":
        torch.cuda.synchronize()
    phases = Phases()
    from vlm_autoquant.core.errors import RunFailed
    from vlm_autoquant.exporter.staging import staging_dir

    try:
        with staging_dir(a.work / "export") as staging:
            report = export_pipeline.export_checkpoint(inputs, staging, phases)
    except RunFailed as exc:  # the timings still stand; the failure is part of the result
        report = {
            "passed": False,
            "failure": str(exc),
            "bytes": None,
            "checks": {"numerics": {"kl_mean": None, "top1_agreement": None}},
        }
    ours = phases.seconds["modelopt_export"] + phases.seconds["assemble"]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model_dir": str(model_dir),
        "baseline": base,
        "ours_s": ours,
        "ours_phases": phases.seconds,
        "ratio": ours / base["total_s"],
        "goal_ratio": 1.3,
        "verify_s": phases.seconds["verify"],
        "checks_passed": report["passed"],
        "failure": report.get("failure"),
        "kl_mean": report["checks"]["numerics"]["kl_mean"],
        "engine_arithmetic": report["checks"]["numerics"].get("engine_arithmetic"),
        "scales": report["checks"].get("scales"),
        "top1_agreement": report["checks"]["numerics"]["top1_agreement"],
        "export_bytes": report["bytes"],
        "peak_rss_gib": peak_rss_gib(),
        "peak_gpu_gib": gpu_peak_gib(),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
