"""A checkpoint's weights read into the page cache in the background, before anything asks.

A run checks its inputs and imports torch, transformers and ModelOpt for several seconds before
it loads the LM; an export imports ModelOpt before it hashes and restores the weights. A weight
file that is not in the page cache (a checkpoint just downloaded or copied, or not read since
the machine started) then costs its whole read inside the load: the full-size 3B's 7.5 GB took
22 s from the 2-core CPU machine's disk. `start` returns at once; a daemon thread asks the
kernel to read the LM tensors' bytes (`posix_fadvise(POSIX_FADV_WILLNEED)` over each contiguous
range, in file order: the kernel reads, nothing is copied), so the load and the weights digest
find them in memory. Linux reads at most the device's readahead window per call (8 MiB on that
disk), so each range is asked for window by window. What is already cached costs nothing. At
most half the available memory is asked for, so a checkpoint larger than memory does not evict
its own first shards before the load reads them. Only headers are read here; a missing or
unreadable file is left to the checks that report it. Where posix_fadvise does not exist,
nothing happens.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from pathlib import Path

import psutil

from .checkpoint import VISION_RE
from .identity import shard_layout, weight_files

log = logging.getLogger(__name__)


def lm_ranges(model_dir: Path) -> list[tuple[Path, int, int]]:
    """(file, start, end) byte ranges of the LM's tensors (vision tensors left out), adjacent
    tensors merged, in file order then offset order."""
    out: list[tuple[Path, int, int]] = []
    for shard in weight_files(Path(model_dir)):
        spans = sorted(
            (start, end)
            for name, (*_, start, end) in shard_layout(shard).items()
            if not VISION_RE.match(name)
        )
        for start, end in spans:
            if out and out[-1][0] == shard and out[-1][2] == start:
                out[-1] = (shard, out[-1][1], end)
            else:
                out.append((shard, start, end))
    return out


def within(ranges: list[tuple[Path, int, int]], budget: int) -> list[tuple[Path, int, int]]:
    """The first `budget` bytes of `ranges`, in order (the last range cut short)."""
    kept, left = [], budget
    for path, start, end in ranges:
        if left <= 0:
            break
        kept.append((path, start, min(end, start + left)))
        left -= end - start
    return kept


MIN_WINDOW, MAX_WINDOW = 128 << 10, 64 << 20


def window(path: Path) -> int:
    """The most one WILLNEED call reads from `path`'s block device: the larger of its readahead
    window and its largest request (sysfs); 128 KiB where unknown (not a block device)."""
    st = os.stat(path)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    for queue in (dev / "queue", dev / ".." / "queue"):  # a disk, or a partition's disk
        try:
            kib = max(int((queue / f).read_text()) for f in ("read_ahead_kb", "max_sectors_kb"))
        except (OSError, ValueError):
            continue
        return min(max(kib << 10, MIN_WINDOW), MAX_WINDOW)
    return MIN_WINDOW


def _advise(ranges: list[tuple[Path, int, int]]) -> None:
    for path, start, end in ranges:
        step = window(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            for at in range(start, end, step):
                os.posix_fadvise(fd, at, min(step, end - at), os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def start(model_dir: Path, budget: int | None = None) -> threading.Thread | None:
    """Ask for `model_dir`'s LM weights (at most `budget` bytes, default half the available
    memory) in a daemon thread; None where nothing was asked for."""
    if not hasattr(os, "posix_fadvise"):
        return None
    try:
        ranges = lm_ranges(model_dir)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:  # the checks report it
        log.debug("no prefetch of %s: %s", model_dir, exc)
        return None
    ranges = within(ranges, psutil.virtual_memory().available // 2 if budget is None else budget)
    if not ranges:
        return None
    thread = threading.Thread(target=_quietly, args=(ranges,), name="prefetch", daemon=True)
    thread.start()
    return thread


def _quietly(ranges: list[tuple[Path, int, int]]) -> None:
    try:
        _advise(ranges)
    except OSError as exc:  # a file gone or unreadable meanwhile: the load reports it
        log.debug("prefetch stopped: %s", exc)
