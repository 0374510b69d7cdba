"""Atomic file writes and output-directory checks.

Every artifact is written to a temporary name in the same directory, flushed, fsynced and
renamed into place, so a reader sees the previous complete file or the new complete file, never
a partial one. A failure (disk full, signal) removes the temporary file; one left by a kill is
swept by the next run that takes the directory's lock.

An output dir is ours when it holds MARKER_FILE (written when a run claims it). A non-empty
directory without it is refused unless --overwrite, and even then none of its files is replaced.
One run at a time holds LOCK_FILE (fcntl.flock); a second refuses at once, naming the PID.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from . import paths
from .errors import Problem, Problems, RunFailed, UsageError

MANIFEST_SCHEMA_VERSION = 1
# Artifact names: files written into --output-dir, logged to MLflow under the same names.
MANIFEST_FILE = "manifest.json"
QUANT_STATE_FILE = "quantized_state.pt"
LM_WEIGHTS_FILE = "lm_weights.safetensors"
SCHEME_FILE = "scheme.yaml"
LAYERS_FILE = "layers.csv"
SENSITIVITY_FIGURE = "sensitivity.png"
SEARCH_DIR = "search"
SEARCH_CHECKPOINT = "autoquant_search.pth"
SEARCH_RECORD = "autoquant_search.json"
COMPARISON_FILE = "comparison.csv"
PARETO_FIGURE = "pareto.png"
EXPORT_REPORT_FILE = "export_report.json"  # the export's finished-result marker and report

ARTIFACTS = {
    MANIFEST_FILE: "per-layer formats, scores and costs; versioned JSON",
    QUANT_STATE_FILE: "ModelOpt state + quantizer amax values (restore onto the original checkpoint)",
    SCHEME_FILE: "the resolved scheme, overrides applied",
    LAYERS_FILE: "one row per LM linear: name, group, format, scores, costs",
    SENSITIVITY_FIGURE: "(MLflow only, mlflow.log_figure) per-layer FP8 sensitivity by format",
}

MARKER_FILE = ".vlm_autoquant"
LOCK_FILE = ".vlm_autoquant.lock"
RUN_ID_FILE = ".mlflow_run_id"  # the MLflow run writing into the dir (tracking.remember)
# The source tree's root (protected from --output-dir like the home directory).
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Names this tool writes into --output-dir; in a directory it did not create, none may exist.
OUR_NAMES = (
    MANIFEST_FILE,
    QUANT_STATE_FILE,
    LM_WEIGHTS_FILE,
    SCHEME_FILE,
    LAYERS_FILE,
    COMPARISON_FILE,
    SEARCH_DIR,
    LOCK_FILE,
    RUN_ID_FILE,
)
# Temporary files of atomic_path: `.<target>.<mkstemp suffix>.tmp`, for targets we write.
_STALE_TMP = re.compile(
    r"^\.(?:%s|autoquant_search\.json|group-[0-9a-f]+\.json)\.[A-Za-z0-9_]+\.tmp$"
    % "|".join(re.escape(n) for n in OUR_NAMES)
)

# Tests inject a failure between the temporary write and the rename through this hook.
_before_rename: Callable[[Path, Path], None] | None = None


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are ordinary files
        if _before_rename is not None:
            _before_rename(tmp, target)
        os.replace(tmp, target)
    except Exception as exc:
        if disk_full(exc):
            raise RunFailed(
                f"no space left to write {target} (a full disk, a quota or the "
                f"file-size limit: {str(exc)[:200]}); free disk space (or lift the "
                "limit) or choose another --output-dir. Nothing partial was "
                "left."
            ) from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# How a full disk, a quota or RLIMIT_FSIZE ("File too large") reaches us: an errno from Python's
# own writes; from torch's C++ stream writer a RuntimeError about a short write; from
# safetensors' Rust writer the OS error in the text.
_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_FULL_TEXT = re.compile(
    r"No space left|File too large|Disk quota|os error (?:27|28|122)\b|"
    r"unexpected pos|file write failed",
    re.IGNORECASE,
)


def disk_full(exc: BaseException) -> bool:
    """Whether a failed write means no room: a full disk, a quota or the file-size limit."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    return type(exc).__name__ in ("RuntimeError", "SafetensorError") and bool(_FULL_TEXT.search(str(exc)))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target: Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(target: Path, obj: Any) -> None:
    write_text(target, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_with(target: Path, writer: Callable[[IO[bytes]], None]) -> None:
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        writer(f)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def protected_reason(
    path: Path, model_dir: Path | None = None, artifacts_dir: Path | None = None
) -> str | None:
    """Why `path` must never be an output dir (None when it may be): the filesystem root, the
    home directory, the project root, the current directory, the model dir, a run's artifacts
    dir, or a folder holding any of them (replacing it would replace them too). Symlinks are
    followed: a link to a protected dir is that dir."""
    try:
        real = Path(os.path.realpath(path))
        named = [
            (Path("/"), "the filesystem root"),
            (Path.home(), "your home directory"),
            (PROJECT_ROOT, "the project root"),
            (Path.cwd(), "the current directory"),
        ]
        if model_dir is not None:
            named.append((model_dir, "the --model-dir checkpoint"))
        if artifacts_dir is not None:
            named.append((artifacts_dir, "the run's --artifacts-dir"))
        named = [(Path(os.path.realpath(p)), why) for p, why in named]
    except (OSError, ValueError):
        return None
    for p, why in named:
        if real == p:
            return why
    for p, why in named:
        if real in p.parents:
            return f"a folder that holds {why} ({p})"
    return None


def refuse_protected(
    path: Path, problems: Problems, model_dir: Path | None = None, artifacts_dir: Path | None = None
) -> bool:
    """Add a problem and return True when `path` is protected (`protected_reason`)."""
    why = protected_reason(path, model_dir, artifacts_dir)
    if why is not None:
        problems.add(
            "--output-dir",
            f"{path} is {why}; this tool will not write there, with or without --overwrite",
            "pass a new directory for the results, e.g. outputs/<scheme>",
        )
    return why is not None


def check_output_dir(
    path: Path,
    problems: Problems,
    finished_marker: str,
    overwrite: bool,
    model_dir: Path | None = None,
    our_names: tuple[str, ...] = OUR_NAMES,
) -> None:
    """--output-dir must be a writable directory (or creatable), ours or empty, not protected,
    and not hold a finished run (unless --overwrite)."""
    if refuse_protected(path, problems, model_dir):
        return
    if paths.exists(path) and not path.is_dir():
        problems.add("--output-dir", f"{path} is a file", "pass a directory path")
        return
    if not paths.probe(path, "--output-dir", problems, "dir") or not _writable(path, problems):
        return
    if not paths.exists(path):
        return
    if not (path / MARKER_FILE).exists() and any(path.iterdir()):
        _check_foreign_dir(path, problems, overwrite, our_names)
        return
    if (path / finished_marker).exists() and not overwrite:
        problems.add(
            "--output-dir",
            f"{path} already holds a finished run ({finished_marker})",
            "pass --overwrite to replace it (its search checkpoint is reused when the "
            "settings match), or choose another --output-dir",
        )


def _writable(path: Path, problems: Problems) -> bool:
    """Whether a file can be made in `path` (or its nearest existing parent); else a problem."""
    probe = path if paths.exists(path) else next((p for p in path.parents if paths.exists(p)), Path("/"))
    try:  # a real write: os.access says yes to root even on read-only mounts
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        msg, fix = paths.describe_oserror(path, exc)
        if exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
            msg = f"{probe} is not writable ({exc.strerror})"
            fix = "choose a directory you can write to, or fix its permissions"
        problems.add("--output-dir", msg, fix)
        return False
    return True


def _check_foreign_dir(path: Path, problems: Problems, overwrite: bool, our_names: tuple[str, ...]) -> None:
    """A non-empty dir without our marker: only with --overwrite, and never over a name we write."""
    if not overwrite:
        problems.add(
            "--output-dir",
            f"{path} is not empty and was not created by this tool (no {MARKER_FILE} marker)",
            "choose a new or empty --output-dir, or "
            "pass --overwrite to add the results beside its files (none of them "
            "is ever replaced or deleted)",
        )
        return
    clash = [n for n in our_names if paths.exists(path / n)]
    if clash:
        problems.add(
            "--output-dir",
            f"{path} holds {', '.join(clash)}, which this tool did "
            "not write (no marker); even with --overwrite it never replaces them",
            "move those files away, or choose another --output-dir",
        )


def check_replaced_dir(
    path: Path,
    problems: Problems,
    overwrite: bool,
    finished_marker: str,
    model_dir: Path | None = None,
    artifacts_dir: Path | None = None,
) -> None:
    """An --output-dir that a writer replaces as a whole (the export): not protected, a new or
    empty directory, or, with --overwrite, one this tool wrote (MARKER_FILE) holding nothing
    but a finished result of the same writer (`finished_marker`) and our bookkeeping."""
    if refuse_protected(path, problems, model_dir, artifacts_dir):
        return
    if paths.exists(path) and not path.is_dir():
        problems.add("--output-dir", f"{path} is a file", "pass a directory path")
        return
    if not paths.probe(path, "--output-dir", problems, "dir") or not paths.exists(path):
        return
    if not any(path.iterdir()):
        return
    fix = "choose a new or empty --output-dir, or move its files away"
    if not (path / MARKER_FILE).exists():
        problems.add(
            "--output-dir",
            f"{path} is not empty and was not created by this tool (no "
            f"{MARKER_FILE} marker); even with --overwrite it is never replaced",
            fix,
        )
    elif not (path / finished_marker).exists() and not only_our_bookkeeping(path):
        problems.add(
            "--output-dir",
            f"{path} holds another kind of result of this tool (no "
            f"{finished_marker}); even with --overwrite it is never replaced",
            fix,
        )
    elif not overwrite and not only_our_bookkeeping(path):
        problems.add(
            "--output-dir",
            f"{path} already holds a result ({finished_marker})",
            "pass --overwrite to replace it, or choose another --output-dir",
        )


def sweep_stale_tmp(out_dir: Path) -> list[Path]:
    """Remove temporary files our atomic writes left behind (a kill mid-write); return them.

    Call only while holding the directory's lock: a live run's temporary files look the same.
    Only names matching our own targets are touched, never a user's file.
    """
    removed = []
    for p in out_dir.rglob(".*.tmp"):
        if _STALE_TMP.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _holder(lock: Path) -> str:
    try:
        return lock.read_text(encoding="ascii").strip() or "unknown"
    except (OSError, UnicodeDecodeError):
        return "unknown"


@contextlib.contextmanager
def locked_output_dir(
    path: Path, finished_marker: str | None = None, overwrite: bool = True
) -> Iterator[Path]:
    """Hold an exclusive lock on `path` for a run; claim it (marker) and sweep stale temp files.

    A second holder is refused at once with UsageError naming the first one's PID. With
    `finished_marker`, the finished-run check is repeated under the lock (another run may have
    finished since validation). The lock file stays (unlinking it would let two processes hold
    locks on different inodes); the kernel drops the lock when the process dies, even by SIGKILL.
    """
    path.mkdir(parents=True, exist_ok=True)
    lock = path / LOCK_FILE
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(
            Problem(
                "--output-dir",
                f"{path} is in use by another run (PID {_holder(lock)} holds {LOCK_FILE})",
                "wait for that run to finish (or stop it), or choose another --output-dir",
            )
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if finished_marker and not overwrite and (path / finished_marker).exists():
            raise UsageError(
                Problem(
                    "--output-dir",
                    f"{path} already holds a finished run "
                    f"({finished_marker}), finished by another run meanwhile",
                    "pass --overwrite to replace it, or choose another --output-dir",
                )
            )
        if not (path / MARKER_FILE).exists():
            write_json(path / MARKER_FILE, {"written_by": "vlm_autoquant", "pid": os.getpid()})
        sweep_stale_tmp(path)
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def only_our_bookkeeping(path: Path, run_record: bool = True) -> bool:
    """Whether every file under `path` is our lock or marker (a dir we made and left empty),
    or, with `run_record`, the record of its MLflow run."""
    names = (LOCK_FILE, MARKER_FILE, RUN_ID_FILE) if run_record else (LOCK_FILE, MARKER_FILE)
    return all(p.name in names for p in path.rglob("*") if p.is_file())
