"""Sweep benchmark: the whole catalog in one sweep against one single-scheme run.

    python bench/bench_sweep.py [--repeats 2] [--out bench/results/sweep-cpu.json]
        [--sizes "--num-calib-steps 1 ..."]   # smaller than the demo's (the tests' smoke run)

Both run as fresh processes on the embedded demo (the same tiny checkpoint, captions and demo
sizes), each into a fresh output directory and MLflow store, so every process pays its imports,
loading, calibration and scoring. Reports the median wall time of each and their ratio, plus the
sweep's scoring-group breakdown, and prints a table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vlm_autoquant.model.demo import DEMO_OVERRIDES, build_demo  # noqa: E402

SINGLE = ROOT / "scripts" / "qwen" / "qwen2_5_vl_3b_autoquant_fp8_schemes.py"
SWEEP = ROOT / "scripts" / "qwen" / "qwen2_5_vl_3b_autoquant_fp8_sweep.py"
SCHEME = "fp8-balanced-10b"
# The catalog schemes that share one scoring group with SCHEME (they differ only in budget).
GROUP = "fp8-all-8b,fp8-aggressive-9b,fp8-balanced-10b,fp8-conservative-12b"


def timed(cmd: list[str], work: Path) -> float:
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
        PYTHONPATH=str(ROOT / "src"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    for k in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(k, None)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t
    (work / "log.txt").write_text(proc.stderr)
    if proc.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", type=Path, default=Path("/tmp/vlm-bench-sweep"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sweep-cpu.json")
    demo_flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_OVERRIDES.items())
    p.add_argument("--sizes", default=demo_flags, help="size flags for every run (default: the demo's)")
    args = p.parse_args()
    sizes = args.sizes.split()
    shutil.rmtree(args.work, ignore_errors=True)
    model_dir, captions = build_demo(args.work / "demo")
    common = ["--model-dir", str(model_dir), "--calib-file", str(captions), *sizes]
    single, sweep, group = [], [], []
    for i in range(args.repeats):  # alternate, so drift hits both sides alike
        w = args.work / f"single{i}"
        w.mkdir(parents=True)
        single.append(
            timed(
                [
                    sys.executable,
                    str(SINGLE),
                    "--scheme-name",
                    SCHEME,
                    "--output-dir",
                    str(w / "out"),
                    *common,
                ],
                w,
            )
        )
        w = args.work / f"sweep{i}"
        w.mkdir(parents=True)
        sweep.append(timed([sys.executable, str(SWEEP), "--output-dir", str(w / "out"), *common], w))
        w = args.work / f"group{i}"
        w.mkdir(parents=True)
        group.append(
            timed(
                [sys.executable, str(SWEEP), "--schemes", GROUP, "--output-dir", str(w / "out"), *common], w
            )
        )
        print(
            f"repeat {i}: single {single[-1]:.1f} s, sweep {sweep[-1]:.1f} s, "
            f"one-group sweep {group[-1]:.1f} s",
            flush=True,
        )
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    out = args.work / f"sweep{args.repeats - 1}" / "out"
    manifests = {m.parent.name: json.loads(m.read_text()) for m in out.glob("*/manifest.json")}
    groups: dict[str, dict] = {}
    for name, m in manifests.items():
        g = groups.setdefault(
            m["search"]["scoring_group"], {"schemes": [], "scoring_s": 0.0, "calibration_s": 0.0}
        )
        g["schemes"].append(name)
        g["scoring_s"] += m["timings"].get("score", 0.0)
        g["calibration_s"] += m["timings"].get("calibrate", 0.0)
    single_m = json.loads((args.work / f"single{args.repeats - 1}" / "out" / "manifest.json").read_text())
    result = {
        "scheme": SCHEME,
        "schemes_in_sweep": len(manifests),
        "single_wall_s": single,
        "sweep_wall_s": sweep,
        "ratio": med(sweep) / med(single),
        "group_sweep_wall_s": group,
        "group_schemes": GROUP.split(","),
        "group_ratio": med(group) / med(single),
        "groups": groups,
        "single_timings": single_m["timings"],
        "sizes": sizes,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'':34}{'median wall (s)':>16}")
    print(f"{'one scheme (' + SCHEME + ')':34}{med(single):>16.1f}")
    print(f"{'whole catalog (' + str(len(manifests)) + ' schemes)':34}{med(sweep):>16.1f}")
    print(f"{'the 4 schemes of one group':34}{med(group):>16.1f}")
    print(f"{'ratio sweep / single':34}{result['ratio']:>16.2f}   (goal <= 1.3)")
    print(f"{'ratio one-group sweep / single':34}{result['group_ratio']:>16.2f}")
    for key, g in groups.items():
        print(
            f"  group {key}: {', '.join(sorted(g['schemes']))}: calibration "
            f"{g['calibration_s']:.1f} s, scoring {g['scoring_s']:.1f} s"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
