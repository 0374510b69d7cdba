"""An export process up to the end of its write: wall time and peak host memory, tree against tree.

    python bench/export_until_written.py --artifacts-dir RUN_OUTPUT_DIR --model-dir CKPT \
        --work SCRATCH [--src BEFORE/src] [--repeats 2] [--phase ct_export] [--out X.json]

Runs the export script of each tree (this one's `src`, then each `--src`, in turn, `--repeats`
times) as a fresh process, `--no-mlflow`, into SCRATCH, and stops it with SIGTERM (the export
removes its staging folder) once its `--phase` line is logged: by default the compressed-tensors
write, before the verification, which on a CPU would run the full model for minutes. For each
process: the wall seconds to that line, the process's peak resident memory then (VmHWM, Linux),
and its phase lines. Prints and writes JSON with every run and each tree's medians.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "scripts/qwen/qwen2_5_vl_3b_autoquant_fp8_export.py"


def _peak_gib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    raise SystemExit("/proc/<pid>/status has no VmHWM: this benchmark needs Linux")


def until_written(src: Path, args: argparse.Namespace, tag: str) -> dict:
    """One export process of the tree whose package is in `src`, stopped after `args.phase`."""
    env = dict(
        os.environ,
        PYTHONPATH=str(src),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        MLFLOW_DISABLE_TELEMETRY="true",
    )
    cmd = [sys.executable, str(src.parent / SCRIPT), "--artifacts-dir", str(args.artifacts_dir)]
    cmd += ["--model-dir", str(args.model_dir), "--output-dir", str(args.work / tag), "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, "--no-mlflow"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    out: dict = {"tree": str(src), "phases": []}
    for line in proc.stderr:  # type: ignore[union-attr]
        if " INFO " in line and " s  RSS " in line:
            out["phases"].append(line.strip())
            if line.split()[2] == args.phase:
                out["wall_s"] = time.perf_counter() - t0
                out["peak_rss_gib"] = _peak_gib(proc.pid)
                proc.send_signal(signal.SIGTERM)
                break
    proc.stderr.read()  # type: ignore[union-attr]
    proc.wait()
    if "wall_s" not in out:
        raise SystemExit(f"the export of {src} ended (exit {proc.returncode}) before its {args.phase} line")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts-dir", type=Path, required=True, help="a finished run's output dir")
    p.add_argument("--model-dir", type=Path, required=True, help="its base checkpoint")
    p.add_argument("--work", type=Path, required=True, help="scratch folder for the exports")
    p.add_argument("--src", type=Path, action="append", default=[], help="another tree's src (repeatable)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--phase", default="ct_export", help="the phase whose line ends the process")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    trees = [ROOT / "src", *(s.resolve() for s in args.src)]
    runs = [
        until_written(src, args, f"t{i}-r{r}") for r in range(args.repeats) for i, src in enumerate(trees)
    ]
    medians = {
        str(src): {
            k: statistics.median(run[k] for run in runs if run["tree"] == str(src))
            for k in ("wall_s", "peak_rss_gib")
        }
        for src in trees
    }
    result = {"phase": args.phase, "medians": medians, "runs": runs}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
