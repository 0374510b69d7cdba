"""Path checks that never hang and never leak an OSError: every failure becomes a Problem.

Name too long, symlink loops, permission denied, and a FIFO, device or socket where a file is
expected are reported with the input and a fix. Files are opened non-blocking and checked with
fstat (type and size) before a byte is read, so a FIFO named like a config file cannot block.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Literal

from .errors import Problems

NAME_MAX = 255


class NotARegularFile(ValueError):
    """The path exists but is not a regular file of acceptable size."""


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISREG, "a regular file"),
    ):
        if test(mode):
            return name
    return "a special file"


def kind(mode: int) -> str:
    """What an st_mode is, in words ("a directory", "a FIFO (named pipe)", ...)."""
    return _kind(mode)


def describe_oserror(path: Path, exc: OSError) -> tuple[str, str]:
    """(message, fix) for an OSError met on `path`."""
    code = exc.errno
    if code == errno.ENAMETOOLONG:
        longest = max((len(p) for p in str(path).split(os.sep)), default=0)
        detail = (
            f"a component of {longest} characters (the limit is {NAME_MAX})"
            if longest > NAME_MAX
            else f"{len(str(path))} characters in all"
        )
        return (
            f"path too long ({detail}): {str(path)[:80]}...",
            "use a shorter path (shorter folder names, or a symlink to a short path)",
        )
    if code == errno.ELOOP:
        return f"{path} is a symbolic-link loop", "fix or remove the symlink (ls -l shows where it points)"
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"permission denied on {path}",
            "fix the permissions (chmod/chown) or pass a path you can read",
        )
    if code == errno.ENOTDIR:
        return f"a component of {path} is not a directory", "check the path"
    if code == errno.ENOENT:
        return f"{path} does not exist", "check the path"
    return f"{path} cannot be accessed ({exc.strerror or exc})", "check the path"


def probe(path: Path, flag: str, problems: Problems, kind: Literal["file", "dir"]) -> bool:
    """False (with a problem added) when `path` exists but cannot serve as a `kind`.

    A missing path returns True: the caller reports absence with its own message and fix.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return True
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:
            return True  # reported by the caller as "does not exist" / "not writable"
        problems.add(flag, *describe_oserror(path, exc))
        return False
    want = stat.S_ISREG if kind == "file" else stat.S_ISDIR
    if not want(st.st_mode):
        expected = "a file" if kind == "file" else "a directory"
        problems.add(flag, f"{path} is not {expected} (it is {_kind(st.st_mode)})", f"pass {expected}")
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (os.O_DIRECTORY if kind == "dir" else 0))
        os.close(fd)
    except OSError as exc:
        problems.add(flag, *describe_oserror(path, exc))
        return False
    return True


def exists(path: Path) -> bool:
    """Path.exists that says False instead of raising (ENAMETOOLONG, EACCES, ...)."""
    try:
        os.stat(path)
        return True
    except (OSError, ValueError):
        return False


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes.

    Opened non-blocking and checked with fstat before reading: a FIFO or device raises
    NotARegularFile at once instead of blocking. OSError propagates for the caller to describe.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotARegularFile(f"{path} is {_kind(st.st_mode)}, not a regular file")
        if st.st_size > limit:
            raise NotARegularFile(f"{path} is {st.st_size} bytes, more than the {limit} this input can be")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as f:  # never a buffer of `limit` bytes
            return f.read(min(limit, st.st_size + 1))
    finally:
        os.close(fd)


def special_files(folder: Path) -> list[tuple[str, str]]:
    """(name, kind) of the entries of `folder` that are neither regular files nor directories
    (after following symlinks), e.g. a FIFO named tokenizer_config.json."""
    out = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return out
    for e in entries:
        try:
            mode = os.stat(e.path).st_mode
        except FileNotFoundError:
            continue  # a dangling symlink: read by nothing unless named, and then reported
        except OSError as exc:
            out.append((e.name, describe_oserror(Path(e.path), exc)[0]))
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            out.append((e.name, _kind(mode)))
    return out
