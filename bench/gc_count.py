"""How many cyclic garbage collections a Python script makes, per generation, and their seconds.

    python bench/gc_count.py SCRIPT.py ARGS...

Runs the script in this interpreter (`runpy`) with a `gc.callbacks` hook and prints, when it
exits, one line to stderr: `gc collections {generation: (count, seconds)}`, plus one line per
full (generation 2) collection with its wall time. Standard library only; not part of the
package.
"""

from __future__ import annotations

import atexit
import gc
import runpy
import sys
import time

STATS = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
_started = [0.0]


def _record(phase: str, info: dict) -> None:
    if phase == "start":
        _started[0] = time.perf_counter()
        return
    seconds = time.perf_counter() - _started[0]
    row = STATS[info["generation"]]
    row[0] += 1
    row[1] += seconds
    if info["generation"] == 2:
        print(f"gc full collection at {time.strftime('%H:%M:%S')}: {seconds:.3f} s", file=sys.stderr)


def _report() -> None:
    gc.callbacks.remove(_record)  # the interpreter's own collections at shutdown are not the script's
    summary = {g: (n, round(t, 3)) for g, (n, t) in STATS.items()}
    print(f"gc collections {summary}", file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    gc.callbacks.append(_record)
    atexit.register(_report)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
