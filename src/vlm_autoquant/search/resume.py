"""Search-checkpoint integrity and reuse.

ModelOpt's search checkpoint is a pickle, so it is loaded only when a record written by this
tool beside it carries the same sha256 and a valid HMAC (integrity.py says why the key lives
outside the output dir), and then only with an explicit weights_only=True.

Checkpoint and record are one atomic step: the checkpoint is written to `<name>.tmp-<pid>`, the
record naming its sha256 is written under its final name, and only then is the checkpoint renamed
into place. A kill between the two renames leaves a finished record and a finished temporary
checkpoint, which the next run promotes instead of refusing. The record also stores a fingerprint
of everything that decides the calibration and the scores (model config and tensor layout, the
packed calibration tokens, the scheme's scoring settings, library versions). A changed setting is
reported by name and the checkpoint is not reused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core import integrity
from ..core.artifacts import disk_full, sha256_file, write_json
from ..core.errors import Problem, RunFailed, UsageError

RECORD_VERSION = 2
MAX_RECORD_BYTES = 16 << 20


def fingerprint(**parts: dict) -> dict:
    """Flatten the named parts into `part.key -> value` (JSON-normalised)."""
    flat = {}
    for part, values in parts.items():
        for key, value in values.items():
            flat[f"{part}.{key}"] = json.loads(json.dumps(value, default=str))
    return flat


def fingerprint_hash(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def record_path(checkpoint: Path) -> Path:
    return checkpoint.with_suffix(".json")


def tmp_checkpoint(checkpoint: Path) -> Path:
    """Where the next checkpoint is written before its record exists (`<name>.tmp-<pid>`)."""
    return checkpoint.with_name(f"{checkpoint.name}.tmp-{os.getpid()}")


def write_record(checkpoint: Path, fp: dict, stage: str, source: Path | None = None) -> str:
    """Record (signed, atomically) the sha256 of `source` (default: `checkpoint`) as the
    checkpoint's, with the fingerprint; return the sha256.

    Pass the temporary file as `source` and rename it over `checkpoint` afterwards: the record
    then names the new checkpoint before it appears under its final name.
    """
    digest = sha256_file(source or checkpoint)
    write_json(
        record_path(checkpoint),
        integrity.sign(
            {
                "record_version": RECORD_VERSION,
                "written_by": "vlm_autoquant",
                "stage": stage,
                "checkpoint": checkpoint.name,
                "sha256": digest,
                "fingerprint": fp,
                "fingerprint_sha256": fingerprint_hash(fp),
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
        ),
    )
    return digest


def save_with_record(checkpoint: Path, fp: dict, stage: str, writer: Callable[[Path], Any]) -> str:
    """`writer(tmp)` writes the checkpoint; record first, then rename (one atomic step)."""
    tmp = tmp_checkpoint(checkpoint)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = write_record(checkpoint, fp, stage, source=tmp)
        os.replace(tmp, checkpoint)
    except Exception as exc:
        if disk_full(exc):
            raise RunFailed(
                f"no space left to write the search checkpoint {checkpoint} (a full "
                f"disk, a quota or the file-size limit: {str(exc)[:200]}); free "
                "disk space (or lift the limit) or choose another --output-dir. "
                "Nothing partial was left."
            ) from exc
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return digest


def read_record(checkpoint: Path) -> dict | None:
    """The signed record beside `checkpoint`, or None when absent, unreadable or not signed."""
    path = record_path(checkpoint)
    try:
        if not path.is_file() or path.stat().st_size > MAX_RECORD_BYTES:
            return None
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (
        not integrity.verified(record)
        or not isinstance(record.get("sha256"), str)
        or not isinstance(record.get("fingerprint"), dict)
    ):
        return None
    return record


def load_verified(checkpoint: Path) -> Any:
    """Unpickle `checkpoint` (weights_only=True) only if its signed record names its bytes."""
    where = f"--output-dir ({checkpoint})"
    record = read_record(checkpoint)
    if record is None:
        raise UsageError(
            Problem(
                where,
                "the search checkpoint has no record signed by this tool "
                "on this account; it will not be loaded",
                "pass --overwrite to discard it, or choose another --output-dir",
            )
        )
    return integrity.load_weights_only(checkpoint, record["sha256"], where)


def load_searcher_state(searcher) -> bool:
    """ModelOpt's `load_search_checkpoint(strict=False)`, with a verified weights_only load.

    Same steps as ModelOpt 0.47's `BaseSearcher.load_search_checkpoint`: the per-rank path,
    falling back to the configured one; the saved keys set on the searcher, defaults for the rest.
    """
    path = searcher._get_checkpoint_path()
    if path is None:
        return False
    if not os.path.exists(path):
        path = searcher.config["checkpoint"]
    if path is None or not os.path.exists(path):
        return False
    state = load_verified(Path(path))
    if not isinstance(state, dict):
        raise UsageError(
            Problem(
                f"--output-dir ({path})",
                "the search checkpoint is not a searcher state",
                "pass --overwrite to discard it",
            )
        )
    for key, default in searcher.default_state_dict.items():
        setattr(searcher, key, state.get(key, default))
    return True


def _promote_finished_tmp(checkpoint: Path, recorded_sha: str) -> bool:
    """After a kill between record and rename: move the temporary checkpoint the record names
    into place; remove every other temporary checkpoint. Returns whether one was promoted."""
    promoted = False
    for tmp in sorted(checkpoint.parent.glob(f"{checkpoint.name}.tmp-*")):
        if not promoted and tmp.is_file() and sha256_file(tmp) == recorded_sha:
            os.replace(tmp, checkpoint)
            promoted = True
        else:
            tmp.unlink(missing_ok=True)
    return promoted


@dataclass
class Reuse:
    """What a verified checkpoint lets the run skip."""

    stage: str | None  # None (nothing to reuse), "calibrated" or "scored"
    sha256: str | None = None


def check_reusable(
    checkpoint: Path, fp: dict, overwrite: bool, compare: tuple[str, ...] | None = None
) -> Reuse:
    """Decide whether `checkpoint` may be loaded; raise UsageError when it must not be.

    `compare` limits the fingerprint keys that must match (a sweep seeds a new scoring group
    from another group's calibration, which must agree on the calibration keys only).
    With `overwrite`, an unusable checkpoint is deleted instead of refused.
    """
    record = read_record(checkpoint)
    if record is not None and (not checkpoint.exists() or sha256_file(checkpoint) != record["sha256"]):
        _promote_finished_tmp(checkpoint, record["sha256"])
    else:
        _promote_finished_tmp(checkpoint, "")  # only removes stale temporary checkpoints
    if not checkpoint.exists():
        return Reuse(None)
    problem = _why_not_reusable(checkpoint, record, fp, compare)
    if problem is not None:
        return _refuse(checkpoint, overwrite, problem)
    return Reuse(record.get("stage"), record["sha256"])


def _why_not_reusable(
    checkpoint: Path, record: dict | None, fp: dict, compare: tuple[str, ...] | None
) -> Problem | None:
    """Why an existing checkpoint must not be loaded: unsigned, modified, or other settings."""
    where = f"--output-dir ({checkpoint})"
    if record is None:
        return Problem(
            where,
            "a search checkpoint without a record signed by this tool on this account "
            f"(forged, or signed with another key than {integrity.key_path()}); it is a pickle "
            "of unknown origin and will not be loaded",
            "delete it, pass --overwrite to discard it, or choose another --output-dir",
        )
    if sha256_file(checkpoint) != record["sha256"]:
        return Problem(
            where,
            "the search checkpoint's sha256 differs from the one this tool recorded "
            "(modified, or cut short by a crash while being written); it will not be loaded",
            "pass --overwrite to discard it and search again",
        )
    recorded_fp = record["fingerprint"]
    keys = compare if compare is not None else tuple(sorted(set(fp) | set(recorded_fp)))
    changed = [k for k in keys if fp.get(k) != recorded_fp.get(k)]
    if not changed:
        return None
    detail = "; ".join(f"{k}: {_short(recorded_fp.get(k))} -> {_short(fp.get(k))}" for k in changed[:6])
    return Problem(
        where,
        f"settings changed since this search checkpoint was written ({detail}); "
        "its calibration and scores do not apply",
        "rerun with the original settings to "
        "resume, pass --overwrite to discard it and search again, or use another --output-dir",
    )


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:18] + "..." + text[-18:]


def _refuse(checkpoint: Path, overwrite: bool, problem: Problem) -> Reuse:
    if not overwrite:
        raise UsageError(problem)
    checkpoint.unlink(missing_ok=True)
    record_path(checkpoint).unlink(missing_ok=True)
    return Reuse(None)
