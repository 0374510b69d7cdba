"""The collector pauses while a run imports, then leaves what the imports made out of every later
collection (frozen), and the process's collector is as it was once the run ends."""

from __future__ import annotations

import gc
import weakref

import pytest

import vlm_autoquant
from vlm_autoquant.core import heap

from ..test_api import QUICK


class Node:
    """A container object the collector tracks, which a weak reference can watch."""


@pytest.fixture(autouse=True)
def collector():
    """Each test starts with the collector on and nothing frozen, and leaves it that way."""
    gc.unfreeze()
    gc.enable()
    yield
    gc.unfreeze()
    gc.enable()


def scanned(obj: object) -> bool:
    """Whether the collector scans `obj` (frozen objects are in no generation)."""
    return any(o is obj for o in gc.get_objects())


def test_settle_collects_the_pauses_garbage_and_freezes_what_lives():
    old = Node()
    with heap.long_lived_heap() as settle:
        assert not gc.isenabled()  # no automatic collection while the run imports
        cycle = Node()
        cycle.me = cycle
        gone = weakref.ref(cycle)
        del cycle
        assert gone() is not None  # paused: the cycle waits
        settle()
        assert gone() is None  # collected, not frozen (nor inherited by a fork after it)
        assert gc.isenabled() and gc.get_freeze_count() > 0
        assert not scanned(old)
        new = Node()
        assert scanned(new)
        cycle = Node()
        cycle.me = cycle
        gone = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert gone() is None
        settle()  # after later imports: what they made is frozen too
        assert not scanned(new) and gc.isenabled()
    assert gc.isenabled() and gc.get_freeze_count() == 0 and scanned(old) and scanned(new)


def test_a_frozen_object_is_still_freed_by_its_last_reference():
    with heap.long_lived_heap() as settle:
        obj = Node()
        watch = weakref.ref(obj)
        settle()
        assert not scanned(obj)
        del obj
        assert watch() is None


def test_a_block_left_before_settling_restores_the_collector():
    with pytest.raises(RuntimeError), heap.long_lived_heap():
        assert not gc.isenabled()
        raise RuntimeError("a bad input")
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_the_callers_own_collector_settings_are_kept():
    gc.disable()
    with heap.long_lived_heap() as settle:
        settle()
        assert not gc.isenabled()  # the caller turned it off: it stays off
    assert not gc.isenabled()
    gc.enable()
    mine = Node()
    gc.freeze()  # the caller froze objects of its own: the block must not unfreeze them
    with heap.long_lived_heap() as settle:
        settle()
    assert gc.get_freeze_count() > 0 and not scanned(mine)


def test_a_run_scores_with_the_imports_frozen_and_ends_as_it_began(demo, tracking, tmp_path):
    """ModelOpt's gradient search calls gc.collect() around scoring: those full collections
    run with the imported modules frozen; quantize and export leave the collector as found."""
    seen: list[tuple[int, int, bool]] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            seen.append((info["generation"], gc.get_freeze_count(), gc.isenabled()))

    gc.callbacks.append(record)
    try:
        out = tmp_path / "q"
        vlm_autoquant.quantize(demo[0], "fp8-balanced-10b", output_dir=out, calib_file=demo[1], **QUICK)
        assert gc.isenabled() and gc.get_freeze_count() == 0
        full = [frozen for generation, frozen, _ in seen if generation == 2]
        assert sum(frozen > 100_000 for frozen in full) >= 2, full  # torch alone is >100k objects
        vlm_autoquant.export(out, output_dir=tmp_path / "ckpt", mlflow=False)
        assert gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.callbacks.remove(record)
