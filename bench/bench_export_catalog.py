"""Every catalog scheme, quantized and exported at full size: the sweep, then the export CLI on
each child run (the command a user runs), each export verified by its own checks.

    python bench/bench_export_catalog.py --size 3b --data .bench_data --work /tmp/vlmxcat \
        --fp8-kernel cuda-ext --out $OUT/h200-export-catalog.json
    python bench/bench_export_catalog.py --size tiny --work /tmp/vlmxcat-cpu   # CPU smoke run

The checkpoint is bench_catalog.py's (random init, released layout, planted outlier). The sweep
writes each scheme's run under <work>/sweep/out/<scheme>; each export goes to
<work>/export/<scheme> through scripts/qwen/qwen2_5_vl_3b_autoquant_fp8_export.py
--artifacts-dir, timed as a whole process. Prints and writes JSON: per scheme the export's
checks, KL, top-1 agreement, phase times and the process wall.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import env_for, sh  # noqa: E402
from bench_catalog import SWEEP, build, run  # noqa: E402

EXPORT = ROOT / "scripts" / "qwen" / "qwen2_5_vl_3b_autoquant_fp8_export.py"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["3b", "tiny"], default="3b")
    p.add_argument("--data", type=Path, default=ROOT / ".bench_data")
    p.add_argument("--work", type=Path, default=Path("/tmp/vlmxcat"))
    p.add_argument("--build-device", default="cuda")
    p.add_argument("--fp8-kernel", default="auto", choices=["auto", "eager", "cuda-ext"])
    p.add_argument("--sizes", default="", help="extra size flags for the sweep (CPU smoke)")
    p.add_argument("--export-args", default="", help="extra flags for every export, e.g. '--format both'")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "h200-export-catalog.json")
    p.add_argument(
        "--sweep-out",
        type=Path,
        default=None,
        help="export the runs of this finished sweep's output dir instead of sweeping first "
        "(its runs must have used this benchmark's checkpoint under --work)",
    )
    p.add_argument(
        "--keep-exports", action="store_true", help="keep each export (default: delete it once checked)"
    )
    args = p.parse_args()
    args.data, args.work = args.data.resolve(), args.work.resolve()
    t0 = time.perf_counter()
    ckpt, captions = build(args)
    r: dict = {"size": args.size, "build_s": time.perf_counter() - t0, "exports": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sweep_out = args.sweep_out or args.work / "sweep" / "out"
    if not args.sweep_out:
        r["sweep"] = run(
            [
                SWEEP,
                "--model-dir",
                ckpt,
                "--calib-file",
                captions,
                "--fp8-kernel",
                args.fp8_kernel,
                *args.sizes.split(),
            ],
            args.work,
            "sweep",
        )
    args.out.write_text(json.dumps(r, indent=2) + "\n")
    runs = sorted(p.parent for p in sweep_out.rglob("manifest.json"))
    for run_dir in runs:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        name = manifest["scheme"]["name"]
        target = args.work / "export" / name
        log = args.work / "export-logs" / f"{name}.txt"
        try:
            wall = sh(
                [
                    sys.executable,
                    str(EXPORT),
                    "--artifacts-dir",
                    str(run_dir),
                    "--model-dir",
                    str(ckpt),
                    "--output-dir",
                    str(target),
                    "--overwrite",
                    "--no-mlflow",
                    *args.export_args.split(),
                ],
                env_for(args.work / "export-env"),
                log,
            )
        except SystemExit as exc:  # a failed export is a result, not the end of the benchmark
            r["exports"][name] = {"passed": False, "failure": str(exc), "log": log.read_text()[-3000:]}
            args.out.write_text(json.dumps(r, indent=2) + "\n")
            continue
        rep = json.loads((target / "export_report.json").read_text())
        checks = rep["checks"]
        r["exports"][name] = {
            "process_wall_s": wall,
            "passed": rep["passed"],
            "checks": {k: (v.get("passed") if isinstance(v, dict) else v) for k, v in checks.items()},
            "kl_mean": checks["numerics"]["kl_mean"],
            "top1_agreement": checks["numerics"]["top1_agreement"],
            "fp8_kernel": manifest["search"].get("fp8_kernel"),
            "fp8_layers": manifest["summary"]["fp8"],
            "bf16_layers": manifest["summary"]["bf16"],
            "timings": rep.get("timings"),
            "bytes": rep.get("bytes"),
            "engines": rep.get("engines"),
            "loadability": checks.get("loadability"),
            "engine_arithmetic": checks["numerics"].get("engine_arithmetic"),
        }
        print(
            f"[export {name}] {wall:.1f} s, passed {rep['passed']}, KL {checks['numerics']['kl_mean']}",
            flush=True,
        )
        args.out.write_text(json.dumps(r, indent=2) + "\n")
        if not args.keep_exports:  # a 3B export is 5-10 GB: the next one needs the disk
            shutil.rmtree(target)
    r["all_passed"] = len(r["exports"]) == len(runs) > 0 and all(e["passed"] for e in r["exports"].values())
    text = json.dumps(r, indent=2)
    print(text)
    args.out.write_text(text + "\n")
    if not r["all_passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
