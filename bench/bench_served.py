"""The run's KL against the KL an engine serves: one scheme with shared and per-module fused scales.

    python bench/bench_served.py --size 3b --data .bench_data --work /tmp/bserved --out r.json
    python bench/bench_served.py --size tiny --work /tmp/bserved        # CPU smoke run

In one process, on one checkpoint (`--size 3b`: the full-size random 3B of model/demo.build_checkpoint;
`tiny`: the demo's) and one caption file: for each `--fused-scales` (shared-max, per-module) run
the scheme through the driver (cli.main), export the run with ModelOpt's exporter plus the
released layout (exporter/assemble.py; the checks are left out, `bench_export.py` times those), apply
vLLM's load-time transformation to the exported LM (exporter/engine_load.py: the group's largest weight
and input scale, siblings re-quantized where their weight scales differ), and measure KL and
top-1 against the BF16 model on the run's own held-out captions (the split and packing of the
run's quality metrics). Prints JSON:
- run: the run's own quality metrics (fake quant, from its manifest);
- written: the export as written, read back by exporter/verify.dequantized_lm;
- served: the same after vLLM's transformation (and the bytes it changed);
each of the last two in ModelOpt's fake-quant arithmetic (x * 448/amax, amax = 448 x
input_scale) and in a serving kernel's (x * 1/input_scale). Goal: the shared-max served KL
equals the shared-max run KL within 2% (`goal_met`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODES = ("shared-max", "per-module")
GOAL_REL = 0.02
TINY_SIZES = (
    "--num-calib-samples 256 --num-calib-steps 1 --num-score-steps 1 --num-eval-samples 64 --seq-len 128"
)


def checkpoint(size: str, data: Path, work: Path, device: str) -> tuple[Path, Path]:
    """(model_dir, captions): a random checkpoint of `size`, built once under `work`."""
    from vlm_autoquant.model.demo import build_checkpoint, make_captions

    ckpt = work / f"ckpt-{size}"
    if size == "3b":
        captions = data / "coco2017_captions" / "train_sample.txt"
        if not (ckpt / "config.json").exists():
            build_checkpoint(
                ckpt, "3b", "released", seed=0, tokenizer=data / "qwen2_5_vl_tokenizer", device=device
            )
        return ckpt, captions
    captions = work / "captions.txt"
    captions.write_text("\n".join(make_captions(3000, 0)) + "\n")
    if not (ckpt / "config.json").exists():
        build_checkpoint(ckpt, "tiny", "released", seed=0, tokenizer=make_captions(3000, 0))
    return ckpt, captions


def quantize(model_dir: Path, captions: Path, out: Path, scheme: str, mode: str, sizes: list[str]) -> dict:
    """One driver run (MLflow in a sqlite file under `out`'s parent); its manifest."""
    from vlm_autoquant.cli import main

    code = main(
        [
            "--scheme-name",
            scheme,
            "--model-dir",
            str(model_dir),
            "--calib-file",
            str(captions),
            "--output-dir",
            str(out),
            "--fused-scales",
            mode,
            "--overwrite",
            *sizes,
        ]
    )
    if code:
        sys.exit(f"the {mode} run failed ({code})")
    return json.loads((out / "manifest.json").read_text())


def export_unchecked(run_dir: Path, model_dir: Path, target: Path) -> Path:
    """The export's ModelOpt export and assembly (no checks), in the run's FP8 arithmetic."""
    import shutil

    from vlm_autoquant.core.errors import Problems
    from vlm_autoquant.exporter import assemble as export
    from vlm_autoquant.exporter.inputs import ExportOptions, gather
    from vlm_autoquant.exporter.pipeline import _restore
    from vlm_autoquant.model.lm import pick_device
    from vlm_autoquant.search.fp8_kernel import run_arithmetic

    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    problems = Problems()
    inputs = gather(
        ExportOptions(
            output_dir=target.with_name(target.name + "-unused"), artifacts_dir=run_dir, model_dir=model_dir
        ),
        target.parent,
        problems,
    )
    problems.raise_if_any()
    kernel = inputs.manifest.search.fp8_kernel
    with run_arithmetic(kernel):
        model = _restore(inputs, pick_device())
        mo_dir = export.run_modelopt_export(model, target, kernel)
        del model
    export.write_configs(model_dir, mo_dir, target, False)
    export.assemble(model_dir, mo_dir, target, False)
    shutil.rmtree(mo_dir)
    return target


def held_out(manifest: dict, model_dir: Path) -> list[dict]:
    """The run's held-out batches: its caption split and packing (calib_data.build_data)."""
    from transformers import AutoTokenizer

    from vlm_autoquant.plan.calib_data import load_captions, pack, split_captions

    s = manifest["scheme"]
    split = split_captions(
        load_captions(Path(manifest["calibration"]["file"])),
        s["num_calib_samples"],
        s["num_eval_samples"],
        s["seed"],
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    return pack(tok, split.eval, s["seq_len"], s["batch_size"], s["seed"]).batches


def measure(lm_dir: Path, cfg, bf16, batches: list[dict], device) -> dict:
    """KL and top-1 of the LM in `lm_dir` against `bf16`, in both FP8 arithmetics."""
    from vlm_autoquant.exporter.verify import compare_logits, dequantized_lm

    out = {}
    for arithmetic in ("modelopt", "engine"):
        candidate = dequantized_lm(lm_dir, cfg, device, arithmetic, reference=bf16)
        r = compare_logits(bf16, candidate, batches, device)
        out[arithmetic] = {
            "kl_mean": r["kl_mean"],
            "top1_agreement": r["top1_agreement"],
            "tokens": r["tokens"],
        }
        del candidate
    return out


def one_mode(args, mode: str, model_dir: Path, captions: Path, sizes: list[str]) -> dict:
    """Run, export, transform and measure one --fused-scales mode."""
    from vlm_autoquant.exporter.engine_load import write_served
    from vlm_autoquant.model.lm import load_lm, pick_device, text_config

    t0 = time.perf_counter()
    run_dir = args.work / f"run-{mode}"
    manifest = quantize(model_dir, captions, run_dir, args.scheme, mode, sizes)
    t1 = time.perf_counter()
    written = export_unchecked(run_dir, model_dir, args.work / f"export-{mode}")
    stats = write_served(written, args.work / f"served-{mode}")
    t2 = time.perf_counter()
    device, cfg = pick_device(), text_config(model_dir)
    bf16 = load_lm(model_dir, cfg, device)
    batches = held_out(manifest, model_dir)
    q = manifest["quality"]
    result = {
        "run": {"kl_mean": q["kl_mean"], "top1_agreement": q["top1_agreement"], "tokens": q["tokens"]},
        "written": measure(written, cfg, bf16, batches, device),
        "served": measure(args.work / f"served-{mode}", cfg, bf16, batches, device),
        "vllm_transform": stats,
        "fp8_groups": manifest["summary"]["groups_fp8"],
        "manifest_export": manifest.get("export"),
        "seconds": {"run": t1 - t0, "export": t2 - t1, "measure": time.perf_counter() - t2},
    }
    del bf16
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["3b", "tiny"], default="3b")
    p.add_argument(
        "--data",
        type=Path,
        default=ROOT / ".bench_data",
        help="folder with qwen2_5_vl_tokenizer/ and coco2017_captions/train_sample.txt",
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_served"))
    p.add_argument("--scheme", default="fp8-balanced-10b")
    p.add_argument(
        "--sizes",
        default=None,
        help="driver flags (default: 256 held-out captions at 3b; one tiny batch each at tiny)",
    )
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{args.work.resolve() / 'mlflow.db'}")
    from vlm_autoquant.cli.common import configure

    configure(False)
    args.work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    sizes = shlex.split(
        args.sizes
        if args.sizes is not None
        else "--num-eval-samples 256"
        if args.size == "3b"
        else TINY_SIZES
    )
    model_dir, captions = checkpoint(args.size, args.data, args.work, "cuda" if cuda else "cpu")
    result = {
        "size": args.size,
        "scheme": args.scheme,
        "sizes": sizes,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "modes": {m: one_mode(args, m, model_dir, captions, sizes) for m in MODES},
    }
    shared = result["modes"]["shared-max"]
    run_kl, served_kl = shared["run"]["kl_mean"], shared["served"]["modelopt"]["kl_mean"]
    result["served_over_run"] = {
        m: r["served"]["modelopt"]["kl_mean"] / r["run"]["kl_mean"]
        for m, r in result["modes"].items()
        if r["run"]["kl_mean"]
    }
    result["goal_met"] = bool(run_kl and abs(served_kl - run_kl) <= GOAL_REL * run_kl)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
