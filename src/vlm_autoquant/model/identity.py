"""Identity of a checkpoint's base LM weights: a digest of the LM tensors' bytes.

Every language-model tensor is hashed (sha256) straight from its byte range in the safetensors
shard, in a thread pool (pread and hashlib release the GIL; largest tensors first, one reused
buffer per thread, at the lowest CPU priority so that a load running beside it keeps the cores),
and the per-tensor digests are combined over the sorted tensor names. The vision tower does not
enter the LM's identity; it has its own (`vision_weights_sha256`, recorded beside it), so an
export onto another vision tower is refused. Two checkpoints of the same architecture differing
in one value of one tensor get different identities. Key layouts are normalised
(`model.language_model.` -> `model.`), so one set of weights has one identity in every layout.
A digest started in the background (`start`) can be stopped (`cancel`): its threads stop within
one chunk, so a command that fails or is stopped while the weights are hashed (the CLI's error
boundary cancels) does not wait for the hashing of a large checkpoint before it exits.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from ..core.errors import Problem
from .checkpoint import INDEX_FILE, SINGLE_FILE, VISION_RE

CHUNK = 16 << 20
WORKERS = min(8, os.cpu_count() or 1)
_futures: dict[tuple[Path, bool], tuple[Future, threading.Event]] = {}
_lock = threading.Lock()
_buffers = threading.local()


def shard_layout(shard: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """{name: (dtype, shape, start, end)} with absolute byte offsets, from the header only."""
    with shard.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > os.fstat(f.fileno()).st_size - 8:  # not a safetensors header: read nothing more
            raise ValueError(f"{shard}: its header length {size} exceeds the file")
        header = json.loads(f.read(size))
    base = 8 + size
    return {
        k: (v["dtype"], tuple(v["shape"]), base + v["data_offsets"][0], base + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    }


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [model_dir / n for n in names]
    return [model_dir / SINGLE_FILE]


class Cancelled(Exception):
    """A digest stopped by `cancel` before it was complete."""


def sha256_range(path: Path, start: int, end: int, stop: threading.Event | None = None) -> str:
    """sha256 of bytes [start, end) of `path` (pread into this thread's own buffer: safe to
    call from many threads, and no fresh 16 MiB allocation, with its page faults, per chunk).
    Raises Cancelled once `stop` is set, before the next chunk is read."""
    if getattr(_buffers, "view", None) is None:
        _buffers.view = memoryview(bytearray(CHUNK))
    view = _buffers.view
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = start
        while pos < end:
            if stop is not None and stop.is_set():
                raise Cancelled(f"{path}: hashing stopped at byte {pos}")
            n = os.preadv(fd, [view[: min(CHUNK, end - pos)]], pos)
            if not n:
                raise OSError(f"{path} ends at byte {pos}, before {end}")
            h.update(view[:n])
            pos += n
    finally:
        os.close(fd)
    return h.hexdigest()


def _lowest_priority() -> None:
    """This thread only (Linux: a thread id is a process id to setpriority): nice 19."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError):  # not Linux, or not allowed: same digest, normal priority
        pass


def tensor_digests(
    model_dir: Path,
    keep,
    workers: int = WORKERS,
    background: bool = False,
    stop: threading.Event | None = None,
) -> dict[str, str]:
    """{name: sha256 of its bytes} for every tensor whose name `keep(name)` accepts.

    `background`: the hashing threads run at the lowest CPU priority. `stop`: once set, every
    thread raises Cancelled before its next chunk."""
    jobs = []
    for shard in weight_files(model_dir):
        for name, (dtype, shape, start, end) in shard_layout(shard).items():
            if keep(name):
                jobs.append((f"{name}:{dtype}:{list(shape)}", shard, start, end))
    jobs.sort(key=lambda j: j[2] - j[3])  # largest first: no big tensor left for the end
    with ThreadPoolExecutor(
        max_workers=workers, thread_name_prefix="sha256", initializer=_lowest_priority if background else None
    ) as pool:
        digests = pool.map(lambda j: sha256_range(j[1], j[2], j[3], stop), jobs)
        return {j[0]: d for j, d in zip(jobs, digests)}


def canonical_lm_name(name: str) -> str:
    return (
        "model." + name[len("model.language_model.") :] if name.startswith("model.language_model.") else name
    )


def _combined(digests: dict[str, str]) -> str:
    combined = hashlib.sha256()
    for key in sorted(digests, key=canonical_lm_name):
        combined.update(f"{canonical_lm_name(key)}={digests[key]}\n".encode())
    return combined.hexdigest()


def _is_lm(name: str) -> bool:
    return not VISION_RE.match(name)


def lm_weights_sha256(
    model_dir: Path, workers: int = WORKERS, background: bool = False, stop: threading.Event | None = None
) -> str:
    """The identity of `model_dir`'s LM weights (vision tensors are not read)."""
    return _combined(tensor_digests(Path(model_dir), _is_lm, workers, background, stop))


def vision_weights_sha256(
    model_dir: Path, workers: int = WORKERS, background: bool = False, stop: threading.Event | None = None
) -> str | None:
    """The identity of `model_dir`'s vision tower (its `visual.*` tensors); None without one."""
    digests = tensor_digests(Path(model_dir), lambda n: bool(VISION_RE.match(n)), workers, background, stop)
    return _combined(digests) if digests else None


def start(model_dir: Path, vision: bool = False) -> Future:
    """Start computing the LM's (or the vision tower's) identity in a background thread (e.g.
    while the LM loads)."""
    key = (Path(model_dir).resolve(), vision)
    with _lock:
        if key not in _futures:
            stop = threading.Event()
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="identity")
            digest = vision_weights_sha256 if vision else lm_weights_sha256
            _futures[key] = (pool.submit(digest, key[0], WORKERS, True, stop), stop)
            pool.shutdown(wait=False)
        return _futures[key][0]


def cancel(model_dir: Path | None = None) -> None:
    """Stop the digests started for `model_dir` (every one started, without it): their threads
    end within one chunk, and a later `start` or `result` hashes afresh."""
    where = None if model_dir is None else Path(model_dir).resolve()
    with _lock:
        keys = [k for k in _futures if where is None or k[0] == where]
        for key in keys:
            _futures.pop(key)[1].set()


def result(model_dir: Path) -> str:
    """The LM identity of `model_dir`, reusing a computation already started."""
    return start(model_dir).result()


def vision_result(model_dir: Path) -> str | None:
    """The vision tower's identity of `model_dir`, reusing a computation already started."""
    return start(model_dir, vision=True).result()


def vision_mismatch(model_dir: Path, recorded: str, actual: str | None):
    """The Problem for a model_dir whose vision tower is not the one the run's base had."""
    now = f"{actual[:16]}..." if actual else "none"
    return Problem(
        "--model-dir",
        f"{model_dir} holds another vision tower than the checkpoint "
        f"the run quantized: run vision_sha256 {recorded[:16]}..., this directory "
        f"{now}",
        "point it at the checkpoint the run used (the manifest's "
        "model.directory), or pass --allow-other-weights to export with this vision "
        "tower anyway (recorded)",
    )


def mismatch(model_dir: Path, recorded: str, actual: str, flag: str = "--model-dir"):
    """The Problem for a model_dir whose LM weights are not the ones the run quantized."""
    return Problem(
        flag,
        f"{model_dir} holds other LM weights than the run quantized: run "
        f"weights_sha256 {recorded[:16]}..., this directory {actual[:16]}...",
        "point it at the checkpoint the run used (the manifest's model.directory), "
        "or pass --allow-other-weights to use these weights anyway (recorded)",
    )
