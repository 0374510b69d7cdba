"""The cyclic garbage collector kept off the heap that the imports leave behind.

A run imports torch, transformers, MLflow and ModelOpt: about 680,000 objects that live until
the process ends. CPython's cyclic collector rescans every one of them in each full collection
(about 0.35 s each on a 2-core CPU), and a run made a dozen: nine or ten triggered by the
imports' own growth, and two that ModelOpt's gradient search calls around scoring
(`gc.collect()`). `long_lived_heap` pauses the automatic collector while a run imports and
validates. Each `settle()` then collects what the pause left (the youngest generation, where all
of it still is, so no garbage is frozen, and a process forked later inherits none it could
collect), freezes what is alive (moved to the permanent generation, which no collection scans)
and resumes the collector, so later collections scan only what the run made since. Freezing
changes no object's lifetime: a frozen object is still freed when its last reference goes; only
a reference cycle among frozen objects waits until `gc.unfreeze()`, which the block calls on exit
unless something froze objects before it (docs/PERFORMANCE.md, "The garbage collector").
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def long_lived_heap() -> Iterator[Callable[[], None]]:
    """Pause automatic collection from the block's start; yield `settle` (collect, freeze, resume),
    to call once the imports are done and again after later imports."""
    was_enabled, frozen_before = gc.isenabled(), gc.get_freeze_count()

    def settle() -> None:
        # What the pause made is all in the youngest generation (nothing collected, so nothing
        # was promoted): collecting that one frees the pause's garbage without rescanning
        # what existed before the block (a long-lived caller's heap).
        gc.collect(0)
        gc.freeze()
        if was_enabled:
            gc.enable()

    gc.disable()
    try:
        yield settle
    finally:
        if frozen_before == 0:  # what the block froze (nothing if it never settled)
            gc.unfreeze()
        if was_enabled:
            gc.enable()
