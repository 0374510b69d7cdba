"""Search-checkpoint integrity and reuse.

ModelOpt's search checkpoint is a pickle, so it is loaded only when a record written by this
tool beside it carries the same sha256. The record also stores a fingerprint of everything that
decides the calibration and the scores (model config and tensor layout, the packed calibration
tokens, the scheme's scoring settings, library versions). A changed setting is reported by name
and the checkpoint is not reused.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from .artifacts import sha256_file, write_json
from .errors import Problem, UsageError

RECORD_VERSION = 1


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


def write_record(checkpoint: Path, fp: dict, stage: str) -> str:
    """Record the checkpoint's sha256 and fingerprint (atomically); return the sha256."""
    digest = sha256_file(checkpoint)
    write_json(record_path(checkpoint), {
        "record_version": RECORD_VERSION, "written_by": "vlm_autoquant", "stage": stage,
        "sha256": digest, "fingerprint": fp, "fingerprint_sha256": fingerprint_hash(fp),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return digest


@dataclass
class Reuse:
    """What a verified checkpoint lets the run skip."""

    stage: str | None  # None (nothing to reuse), "calibrated" or "scored"
    sha256: str | None = None


def check_reusable(checkpoint: Path, fp: dict, overwrite: bool,
                   compare: tuple[str, ...] | None = None) -> Reuse:
    """Decide whether `checkpoint` may be loaded; raise UsageError when it must not be.

    `compare` limits the fingerprint keys that must match (a sweep seeds a new scoring group
    from another group's calibration, which must agree on the calibration keys only).
    With `overwrite`, an unusable checkpoint is deleted instead of refused.
    """
    if not checkpoint.exists():
        return Reuse(None)
    record_file = record_path(checkpoint)
    where = f"--output-dir ({checkpoint})"
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
        recorded_sha, recorded_fp = record["sha256"], record["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return _refuse(checkpoint, overwrite, Problem(
            where, "a search checkpoint without a valid record from this tool; it is a pickle of "
            "unknown origin and will not be loaded",
            "delete it, pass --overwrite to discard it, or choose another --output-dir"))
    if sha256_file(checkpoint) != recorded_sha:
        return _refuse(checkpoint, overwrite, Problem(
            where, "the search checkpoint's sha256 differs from the one this tool recorded "
            "(modified, or cut short by a crash while being written); it will not be loaded",
            "pass --overwrite to discard it and search again"))
    keys = compare if compare is not None else tuple(sorted(set(fp) | set(recorded_fp)))
    changed = [k for k in keys if fp.get(k) != recorded_fp.get(k)]
    if changed:
        detail = "; ".join(f"{k}: {_short(recorded_fp.get(k))} -> {_short(fp.get(k))}"
                           for k in changed[:6])
        return _refuse(checkpoint, overwrite, Problem(
            where, f"settings changed since this search checkpoint was written ({detail}); "
            "its calibration and scores do not apply", "rerun with the original settings to "
            "resume, pass --overwrite to discard it and search again, or use another --output-dir"))
    return Reuse(record.get("stage"), recorded_sha)


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:18] + "..." + text[-18:]


def _refuse(checkpoint: Path, overwrite: bool, problem: Problem) -> Reuse:
    if not overwrite:
        raise UsageError(problem)
    checkpoint.unlink(missing_ok=True)
    record_path(checkpoint).unlink(missing_ok=True)
    return Reuse(None)
