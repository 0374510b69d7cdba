"""Staging directories: a result is built beside its --output-dir and renamed into place.

A staging dir is named `.<output name>.partial-XXXX`, holds STAGING_MARKER, and its LOCK_FILE is
locked (fcntl.flock) by the process building in it for as long as that process lives. A process
killed mid-build (SIGKILL, power loss) leaves it behind; the next build into the same parent
removes every staging dir whose lock it can take: one carrying our marker, whose builder is gone.
A live builder's dir cannot be locked and is never touched, and nothing without our marker is.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..core.artifacts import LOCK_FILE, MARKER_FILE, RUN_ID_FILE

log = logging.getLogger(__name__)
STAGING_MARKER = ".vlm_autoquant_staging"
BOOKKEEPING = (LOCK_FILE, MARKER_FILE, RUN_ID_FILE, STAGING_MARKER)  # not part of a result


def _try_lock(lock: Path) -> int | None:
    """An fd holding an exclusive lock on `lock`, or None when another process holds it."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def sweep_stale(parent: Path) -> list[Path]:
    """Remove the staging dirs in `parent` that a dead process left; return them."""
    removed = []
    for p in sorted(parent.glob(".*.partial-*")):
        if p.is_symlink() or not p.is_dir() or not (p / STAGING_MARKER).is_file():
            continue
        fd = _try_lock(p / LOCK_FILE)
        if fd is None:
            continue  # a live build (or no lock yet: too young to judge)
        try:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
        finally:
            os.close(fd)
    for p in removed:
        log.info("removed %s, left by a killed export", p)
    return removed


@contextlib.contextmanager
def staging_dir(target: Path) -> Iterator[Path]:
    """A fresh staging dir beside `target`, locked and marked while the block runs; removed
    on exit unless `publish` renamed it into place. Stale ones in the same parent are swept."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target.parent)
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # before the marker: never sweepable
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        (path / STAGING_MARKER).write_text(json.dumps({"target": target.name, "pid": os.getpid()}) + "\n")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # gone already when published
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # published, it is the output dir's lock: no holder now
        os.close(fd)


@contextlib.contextmanager
def result_files(path: Path) -> Iterator[Path]:
    """A temporary folder of links to the files of `path` less our bookkeeping: what is
    uploaded as the result (a lock file or run record is no part of a checkpoint)."""
    with tempfile.TemporaryDirectory(prefix="vlm-result-") as tmp:
        for p in sorted(path.rglob("*")):
            if p.is_file() and p.name not in BOOKKEEPING:
                link = Path(tmp) / p.relative_to(path)
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(p.resolve())
        yield Path(tmp)


def mark_finished(staging: Path, target: Path) -> None:
    """Make a staging dir an output dir of ours: our marker and the run record of `target` (the
    MLflow run writing into it). The staging marker goes once the dir is renamed into place."""
    (staging / MARKER_FILE).write_text(json.dumps({"written_by": "vlm_autoquant", "pid": os.getpid()}) + "\n")
    with contextlib.suppress(OSError):
        shutil.copyfile(target / RUN_ID_FILE, staging / RUN_ID_FILE)
