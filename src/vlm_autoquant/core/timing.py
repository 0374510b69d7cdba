"""Phase timing: one log line per phase with its wall time and memory, and per-batch times."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import resource
import statistics
import time
from collections.abc import Callable, Iterator

import psutil

log = logging.getLogger("vlm_autoquant")
GIB = 1024**3


def since_process_start() -> float:
    """Seconds since this process started (interpreter start-up and imports included)."""
    return time.time() - psutil.Process().create_time()


def peak_rss_gib() -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def gpu_peak_gib() -> float:
    import torch  # torch: this module is imported on the refusal path

    return torch.cuda.max_memory_allocated() / GIB if torch.cuda.is_available() else 0.0


def human_bytes(n: float) -> str:
    """`n` bytes in the largest binary unit that keeps it at 1 or more: 812 B, 3.4 MiB, 7.51 GiB."""
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}" if unit == "GiB" else f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def memory_line() -> str:
    rss = psutil.Process().memory_info().rss / GIB
    gpu = gpu_peak_gib()
    return f"RSS {rss:.2f} GiB" + (f", peak GPU {human_bytes(gpu * GIB)}" if gpu else "")


class Phases:
    """Collects `time/<phase>_s` and logs each phase as it ends.

    `between`, where set: called before each phase starts and after each one ends (a stop flag's
    `raise_if_set`, so a signal stops the work at the next phase boundary)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()
        self.between: Callable[[], None] | None = None

    @contextlib.contextmanager
    def __call__(self, name: str, detail: str | Callable[[], str] = "") -> Iterator[None]:
        """Time the block; its line is logged when it succeeds (a failure has its own message).
        `detail` may be a function, called when the block ends (`Parts.note`)."""
        if self.between is not None:
            self.between()
        t0 = time.perf_counter()
        try:
            yield
        except BaseException:
            self.add(name, time.perf_counter() - t0)
            raise
        self.record(name, time.perf_counter() - t0, detail() if callable(detail) else detail)
        if self.between is not None:
            self.between()

    def record(self, name: str, seconds: float, detail: str = "") -> None:
        """Add a phase timed elsewhere and log its line."""
        self.add(name, seconds)
        log.info("%-10s %7.2f s  %s%s", name, seconds, memory_line(), f"  ({detail})" if detail else "")

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def total(self) -> float:
        return time.perf_counter() - self.started


_parts: contextvars.ContextVar["Parts | None"] = contextvars.ContextVar("vlm_autoquant_parts", default=None)


class Parts:
    """The named parts of one phase (validate: the torch import, the checkpoint's config, the
    tokenizer...), timed where they run by `part` and summed by name, in the order first seen."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def collecting(self) -> Iterator["Parts"]:
        """`part` blocks run (in this thread or context) during the block are counted here."""
        token = _parts.set(self)
        self.started = time.perf_counter()
        try:
            yield self
        finally:
            _parts.reset(token)

    def note(self) -> str:
        """`<part> <s>, ..., other <s> s` (other: the phase's time outside every part); a part
        under 5 ms (a module already imported) is left out of the list; no part at all: ""."""
        spent = sum(self.seconds.values())
        rest = max(time.perf_counter() - self.started - spent, 0.0)
        items = [f"{name} {secs:.2f}" for name, secs in self.seconds.items() if secs >= 0.005]
        return ", ".join(items + [f"other {rest:.2f} s"]) if self.seconds else ""


@contextlib.contextmanager
def part(name: str) -> Iterator[None]:
    """Time the block as part `name` of the phase whose `Parts` is collecting (none: not timed)."""
    parts = _parts.get()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        if parts is not None:
            parts.seconds[name] = parts.seconds.get(name, 0.0) + time.perf_counter() - t0


class BatchClock:
    """Wall time of each batch of a phase, from the first forward step on a batch to the first
    on the next one (the last batch ends with its phase). The steps of one batch (kl_div runs
    several forwards per batch) count as one batch."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self._phase: str | None = None
        self._batch: object = None
        self._t = 0.0

    def begin(self, phase: str) -> None:
        self._close()
        self._phase = phase

    def end(self) -> None:
        self._close()
        self._phase = None

    def _close(self) -> None:
        if self._phase is not None and self._batch is not None:
            self.seconds.setdefault(self._phase, []).append(time.perf_counter() - self._t)
        self._batch = None

    def wrap(self, step: Callable) -> Callable:
        """`step(model, batch)` that marks where each batch of the current phase starts."""

        @functools.wraps(step)
        def timed_step(model, batch):
            if self._phase is not None and batch is not self._batch:
                self._close()
                self._batch, self._t = batch, time.perf_counter()
            return step(model, batch)

        return timed_step


def batch_note(seconds: list[float], phase_s: float | None = None) -> str:
    """'16 batches: the first 1.21 s, the rest 0.15 s each (median); 0.40 s outside them'."""
    if not seconds:
        return ""
    if len(seconds) == 1:
        note = f"1 batch: {seconds[0]:.2f} s"
    else:
        note = (
            f"{len(seconds)} batches: the first {seconds[0]:.2f} s, "
            f"the rest {statistics.median(seconds[1:]):.2f} s each (median)"
        )
    if phase_s is not None:
        note += f"; {max(phase_s - sum(seconds), 0.0):.2f} s outside them"
    return note
