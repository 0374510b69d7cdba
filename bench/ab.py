"""Two commands as whole processes, in turn (A B A B ...), and the ratio A/B pair by pair.

    python bench/ab.py -n 5 --warmup 1 --a 'CMD_A' --b 'CMD_B' [--out ab.json]

Each command is split as a shell splits words and run without a shell, its output thrown away.
Prints each side's wall seconds (min, median, max), its peak resident memory, and the median of
the pairwise ratios A/B, which holds when the machine's speed drifts between pairs. Standard
library only; not part of the package.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path


def once(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one run of `cmd`."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True, help="command A, one string")
    p.add_argument("--b", required=True, help="command B, one string")
    p.add_argument("-n", type=int, default=5, help="counted pairs")
    p.add_argument("--warmup", type=int, default=1, help="pairs run first and not counted")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    cmds = {"A": shlex.split(args.a), "B": shlex.split(args.b)}
    runs: dict[str, list] = {"A": [], "B": []}
    for i in range(args.warmup + args.n):
        for side, cmd in cmds.items():
            wall, rss, code = once(cmd)
            if code != 0:
                print(f"{side} exited {code}: {args.a if side == 'A' else args.b}", file=sys.stderr)
                return 1
            if i >= args.warmup:
                runs[side].append((wall, rss))
    result = {"commands": {"A": args.a, "B": args.b}, "pairs": args.n}
    for side, rows in runs.items():
        walls = [w for w, _ in rows]
        result[side] = {
            "wall_s": {"min": min(walls), "median": statistics.median(walls), "max": max(walls)},
            "peak_rss_mib": max(r for _, r in rows),
        }
        print(
            f"{side} wall s  min {min(walls):.2f}  median {statistics.median(walls):.2f}  "
            f"max {max(walls):.2f}  peak RSS {result[side]['peak_rss_mib']:.0f} MiB"
        )
    ratios = [a / b for (a, _), (b, _) in zip(runs["A"], runs["B"])]
    result["ratio_a_over_b"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}
    print(f"A/B wall  median {statistics.median(ratios):.3f}  (min {min(ratios):.3f}, max {max(ratios):.3f})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
