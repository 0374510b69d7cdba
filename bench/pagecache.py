"""Page-cache tools for measuring what a loader really reads from a checkpoint.

`evict(paths)` drops the files' clean pages (posix_fadvise DONTNEED); after a process has loaded
the checkpoint, `resident_bytes(path, ranges)` asks the kernel (mincore) which pages are in the
page cache, per byte range: a page is resident only if something read it since the eviction
(plus kernel read-ahead around what was read).

As a command, for cold-start measurements (a checkpoint as after a reboot or a fresh download):

    python bench/pagecache.py evict CHECKPOINT_DIR
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_pages(path: Path) -> bytes:
    """One byte per page of the file; bit 0 set when the page is in the page cache."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            vec = ctypes.create_string_buffer((size + PAGE - 1) // PAGE)
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return vec.raw
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def tensor_ranges(path: Path) -> dict[str, tuple[int, int]]:
    """Absolute byte ranges of each tensor in a safetensors file (from its header)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    return {
        k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    }


def resident_bytes(path: Path, ranges: list[tuple[int, int]]) -> int:
    """Bytes of the given ranges whose pages are resident (page granularity)."""
    pages = resident_pages(path)
    total = 0
    for start, end in ranges:
        for p in range(start // PAGE, (end + PAGE - 1) // PAGE):
            if pages[p] & 1:
                total += min(end, (p + 1) * PAGE) - max(start, p * PAGE)
    return total


def read_ranges(path: Path, ranges: list[tuple[int, int]], chunk: int = 64 << 20) -> int:
    """Plain reads of the ranges (the I/O floor of loading them); returns bytes read."""
    done = 0
    with path.open("rb", buffering=0) as f:
        for start, end in sorted(ranges):
            f.seek(start)
            left = end - start
            while left:
                got = len(f.read(min(chunk, left)))
                if not got:
                    break
                done += got
                left -= got
    return done


def main() -> None:
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "evict" or not Path(sys.argv[2]).is_dir():
        raise SystemExit(f"usage: {sys.argv[0]} evict CHECKPOINT_DIR")
    files = sorted(p for p in Path(sys.argv[2]).iterdir() if p.is_file())
    evict(files)
    left = sum(sum(b & 1 for b in resident_pages(f)) * PAGE for f in files if f.stat().st_size)
    print(f"{len(files)} files evicted; {left} bytes still resident", file=sys.stderr)


if __name__ == "__main__":
    main()
