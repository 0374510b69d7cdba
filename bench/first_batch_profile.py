"""Where a run's first calibration and score batches go: the driver with its first batches profiled.

    python bench/first_batch_profile.py OUT_DIR -- SCRIPT.py ARGS...

Runs SCRIPT (a driver script: scripts/qwen/qwen2_5_vl_3b_autoquant_fp8_schemes.py) in this
process with ModelOpt's per-batch loop (`_AutoQuantizeBaseSearcher._run_func`, which calibration
and scoring both go through) wrapped: the first two batches of each loop run under
`torch.profiler` (CPU, and CUDA where there is a GPU), each ended by a device sync. Writes, per
profiled batch, `<loop>-<batch>.txt` (the ops by self CPU time, then by total CPU time; `<loop>`
is the first 20 characters of ModelOpt's progress text, spaces as underscores) and `times.json`
(each profiled batch's wall seconds, and as `<loop>-0-setup` the seconds from the loop's start
to its first batch). The profiler slows what it records: read the tables for where the time
goes, and the driver's own phase log for how long a batch takes.
"""

from __future__ import annotations

import json
import runpy
import sys
import time
from pathlib import Path

import torch

PROFILED = 2  # batches per loop


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _wrap(out: Path, times: dict):
    import modelopt.torch.quantization.algorithms as mq_algorithms

    base = mq_algorithms._AutoQuantizeBaseSearcher
    orig = base._run_func
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def run_func(self, func, num_iters=1, desc=""):
        t_entry, seen = time.perf_counter(), [0]
        loop = desc[:20].replace(" ", "_") or "loop"  # "Calibrating_for_FP8_", "Estimating_auto_quan"

        def profiled(*args, **kwargs):
            i = seen[0]
            seen[0] += 1
            if i == 0:
                times[f"{loop}-0-setup"] = time.perf_counter() - t_entry
            if i >= PROFILED:
                return func(*args, **kwargs)
            _sync()
            t0 = time.perf_counter()
            with torch.profiler.profile(activities=activities) as prof:
                result = func(*args, **kwargs)
                _sync()
            times[f"{loop}-{i}"] = time.perf_counter() - t0
            table = prof.key_averages()
            (out / f"{loop}-{i}.txt").write_text(
                table.table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=70)
                + "\n\n"
                + table.table(sort_by="cpu_time_total", row_limit=45, max_name_column_width=70)
            )
            (out / "times.json").write_text(json.dumps(times, indent=1) + "\n")
            return result

        return orig(self, profiled, num_iters, desc)

    base._run_func = run_func


def main() -> None:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        raise SystemExit(__doc__.split("\n\n")[1])
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    _wrap(out, {})
    script = sys.argv[3]
    sys.argv = sys.argv[3:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
