"""Atomic file writes and output-directory checks.

Every artifact is written to a temporary name in the same directory, flushed, fsynced and
renamed into place, so a reader sees the previous complete file or the new complete file, never
a partial one. A failure (disk full, signal) removes the temporary file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import Problems, RunFailed

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

ARTIFACTS = {
    MANIFEST_FILE: "per-layer formats, scores and costs; versioned JSON",
    QUANT_STATE_FILE: "ModelOpt state + quantizer amax values (restore onto the original checkpoint)",
    SCHEME_FILE: "the resolved scheme, overrides applied",
    LAYERS_FILE: "one row per LM linear: name, group, format, scores, costs",
    SENSITIVITY_FIGURE: "(MLflow only, mlflow.log_figure) per-layer FP8 sensitivity by format",
}

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
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise RunFailed(f"no space left to write {target} ({exc.strerror}); free disk space "
                            f"or choose another --output-dir. Nothing partial was left.") from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


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


def check_output_dir(path: Path, problems: Problems, finished_marker: str, overwrite: bool) -> None:
    """--output-dir must be a writable directory (or creatable) and not hold a finished run."""
    if path.exists() and not path.is_dir():
        problems.add("--output-dir", f"{path} is a file", "pass a directory path")
        return
    probe = path if path.exists() else next((p for p in path.parents if p.exists()), Path("/"))
    try:  # a real write: os.access says yes to root even on read-only mounts
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        problems.add("--output-dir", f"{probe} is not writable ({exc.strerror})",
                     "choose a directory you can write to, or fix its permissions")
        return
    if (path / finished_marker).exists() and not overwrite:
        problems.add("--output-dir", f"{path} already holds a finished run ({finished_marker})",
                     "pass --overwrite to replace it (its search checkpoint is reused when the "
                     "settings match), or choose another --output-dir")
