"""Where a Python process spends its wall time, thread by thread: a sampling profiler.

    python bench/stack_sampler.py --out PROFILE.json [--interval 0.005] -- SCRIPT.py ARGS...

A daemon thread reads every thread's Python stack (`sys._current_frames`) every `interval`
seconds and counts (thread, stack) pairs. A sample of a thread that waits (for the GIL, the
GPU, a lock, I/O) counts where it waits, so the main thread's counts add up to its wall time.
The result, written when the script exits (also through os._exit), holds per thread the
inclusive seconds of the top functions and the top leaf stacks. bench_peer.py --profile uses it.
No dependency beyond the standard library; not part of the package.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import runpy
import sys
import threading
import time


class Sampler:
    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.stacks: collections.Counter = collections.Counter()
        self.samples = 0
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack = []
                while frame is not None and len(stack) < 60:
                    code = frame.f_code
                    stack.append(f"{os.path.basename(code.co_filename)}:{code.co_name}")
                    frame = frame.f_back
                self.stacks[(names.get(ident, str(ident)), tuple(reversed(stack)))] += 1
            self.samples += 1

    def result(self) -> dict:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join()  # no sample lands in `stacks` while it is read
        wall = time.perf_counter() - self.t0
        dt = wall / max(self.samples, 1)
        threads: dict = {}
        for (thread, stack), n in self.stacks.items():
            t = threads.setdefault(
                thread, {"seconds": 0.0, "inclusive": collections.Counter(), "leaves": collections.Counter()}
            )
            t["seconds"] += n * dt
            for fn in set(stack):
                t["inclusive"][fn] += n * dt
            t["leaves"][" <- ".join(reversed(stack[-6:]))] += n * dt
        out = {"wall_s": wall, "samples": self.samples, "interval_s": dt, "threads": {}}
        for thread, t in sorted(threads.items(), key=lambda kv: -kv[1]["seconds"]):
            out["threads"][thread] = {
                "seconds": round(t["seconds"], 3),
                "inclusive_top": [[f, round(s, 3)] for f, s in t["inclusive"].most_common(60)],
                "leaves_top": [[f, round(s, 3)] for f, s in t["leaves"].most_common(40)],
            }
        return out


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=0.005)
    a = p.parse_args(argv[:split])
    script_argv = argv[split + 1 :]
    sampler = Sampler(a.interval)
    written = []

    def write() -> None:
        if not written:
            written.append(True)
            result = sampler.result()  # before the file is opened: a failure leaves no empty file
            with open(a.out, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1)

    real_exit = os._exit

    def exit_after_writing(code: int) -> None:
        write()
        real_exit(code)

    os._exit = exit_after_writing
    import atexit

    atexit.register(write)  # registered first: runs last, after the script's own handlers
    sys.argv = script_argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(script_argv[0])))
    sampler.start()
    runpy.run_path(script_argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
