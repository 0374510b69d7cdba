"""Cooperative SIGINT/SIGTERM handling.

The first signal sets a flag; the run stops at the next batch boundary (`raise_if_set` is called
from the forward step), so ModelOpt never dies half-way through writing its search checkpoint;
an export stops at its next phase boundary (`Phases.between`).
A second signal stops at once.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator

from .errors import Interrupted

log = logging.getLogger(__name__)


class StopFlag:
    def __init__(self) -> None:
        self.signal_name: str | None = None

    def set(self, name: str) -> None:
        self.signal_name = name

    def raise_if_set(self) -> None:
        if self.signal_name is not None:
            raise Interrupted(self.signal_name)


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Install the handlers for the duration of a run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if flag.signal_name is not None:
            raise Interrupted(name)  # second signal: stop now
        flag.set(name)
        log.warning("%s received: stopping at the next batch or phase (send again to stop now)", name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """Until `stop_on_signals` takes over: SIGTERM raises Interrupted (exit 130, cleanup runs)
    instead of killing the process with nothing cleaned up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
