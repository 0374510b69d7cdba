"""A sweep's scheme reports, logged one after another beside the sweep's work.

A finished scheme's report (`pipeline.report_scheme`: params, metrics, per-layer series, table,
figure, artifacts and caption datasets) needs nothing of the model, and takes most of a second
per scheme on a GPU host. In a sweep the next scheme's solve and evaluation, or the next
family's search, need nothing of it either. Where the schemes' trackers live in child processes
(`tracking.tracker_in_child`: beside a free core), each finished member's report is handed to
one worker thread, in order, which only sends it to the child and waits for its answer; the
sweep waits for them before it writes its comparison (where a report that failed marks its
scheme FAILED) or when it stops, so a scheme that finished before a signal is still logged whole.

Elsewhere the reports run in the caller's thread, as they are submitted: drawn and logged by a
thread of this process, they would hold its interpreter lock against the next scheme's work
(the demo's catalog sweep measured 1.04x slower that way on two cores).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ..core.errors import Interrupted


class Reports:
    """Jobs run in submission order, by one daemon thread when `beside` (else by `submit`
    itself); `wait` returns once all have ended. A context manager: leaving the block waits,
    whatever ended it."""

    def __init__(self, beside: bool = True) -> None:
        self.beside = beside
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: list[tuple[Any, Future]] = []
        self._thread: threading.Thread | None = None

    def submit(self, about: Any, fn: Callable[..., Any], *args: Any) -> Future:
        """Run `fn(*args)` after the jobs before it; `about` names the job in `failed()`."""
        future: Future = Future()
        self._jobs.append((about, future))
        if not self.beside:
            _run(future, fn, args)
            return future
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="scheme-reports", daemon=True)
            self._thread.start()
        self._queue.put((future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                _run(*job)
            except BaseException:  # noqa: BLE001, S110 - recorded in its future; the next jobs run
                pass

    def wait(self) -> None:
        """Block until every submitted job has ended (idempotent)."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join()
        self._thread = None

    def failed(self) -> list[tuple[Any, BaseException]]:
        """(about, exception) of each ended job that raised, in submission order."""
        return [(about, f.exception()) for about, f in self._jobs if f.done() and f.exception() is not None]

    def __enter__(self) -> Reports:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wait()


def _run(future: Future, fn: Callable[..., Any], args: tuple) -> None:
    """`fn(*args)` into `future`; an interrupt (KeyboardInterrupt, `Interrupted`) is recorded
    and raised on, so that inline it stops the sweep as any signal does."""
    future.set_running_or_notify_cancel()
    try:
        future.set_result(fn(*args))
    except (Interrupted, KeyboardInterrupt) as exc:
        future.set_exception(exc)
        raise
    except BaseException as exc:  # noqa: BLE001 - handed to whoever reads the future
        future.set_exception(exc)
