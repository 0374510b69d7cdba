"""Integrity of what this tool reads back: signed search records, pickle loads that cannot run
code, artifact digests for the manifest, finite amax values.

Why an HMAC key outside the output dir (and not a record inside the MLflow run): whoever can
write `--output-dir` can write a pickle *and* a matching sha256, so the record must carry a
secret the output dir does not hold. A per-user key file (default
`~/.cache/vlm_autoquant/hmac.key`, 32 random bytes, created 0600 on first use; override the path
with VLM_AUTOQUANT_HMAC_KEY_FILE) works with `--log-only`, without a tracking server, and when
tracking is down, which a record inside the MLflow run would not. A record written under
another key (another user or machine) is refused like a forged one; `--overwrite` discards it.
The pickle is additionally loaded with an explicit `weights_only=True`, which torch honours even
when TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set, so a valid signature is never the only guard.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import math
import pickle
from pathlib import Path
from typing import Any

import torch

from .errors import Problem, UsageError
from .hmac_key import KEY_BYTES, KEY_ENV, key_path, load_or_create  # noqa: F401 - re-exported

MAX_PICKLE_BYTES = 64 << 30  # a search checkpoint of the 3B is ~100 MB; this only bounds reads


def _key() -> bytes:
    return load_or_create()


def _canonical(record: dict) -> bytes:
    body = {k: v for k, v in record.items() if k != "hmac"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def sign(record: dict) -> dict:
    """`record` plus an `hmac` field over all its other fields."""
    return {**record, "hmac": hmac.new(_key(), _canonical(record), hashlib.sha256).hexdigest()}


def verified(record: Any) -> bool:
    """Whether `record` carries a valid HMAC under this user's key."""
    if not isinstance(record, dict) or not isinstance(record.get("hmac"), str):
        return False
    expected = hmac.new(_key(), _canonical(record), hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, record["hmac"])


def load_weights_only(path: Path, expected_sha256: str | None = None, where: str = "") -> Any:
    """torch.load with an explicit weights_only=True, from bytes checked against `expected_sha256`.

    The bytes are read once, hashed and unpickled from memory, so the file cannot be swapped
    between the check and the load. A refused or unparsable pickle raises UsageError (exit 2)
    with our own message (never torch's hint to retry with weights_only=False).
    """
    where = where or str(path)
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise UsageError(
            Problem(
                where,
                f"{path} is {size} bytes, more than any file this tool writes",
                "delete it or choose another --output-dir",
            )
        )
    data = path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise UsageError(
            Problem(
                where,
                f"{path} changed after it was verified; it will not be loaded",
                "make sure no other process writes this directory, then rerun (or pass --overwrite)",
            )
        )
    return load_bytes(data, path, where)


def load_bytes(data: bytes, path: Path, where: str = "") -> Any:
    """torch.load of bytes already read (and checked) with an explicit weights_only=True; a
    refused or unparsable pickle raises UsageError naming `path`."""
    where = where or str(path)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        kind = (
            "holds objects other than tensors and plain containers"
            if isinstance(exc, pickle.UnpicklingError)
            else "is not a readable torch file"
        )
        raise UsageError(
            Problem(
                where,
                f"{path} {kind} ({type(exc).__name__}); it was refused without running any of its code",
                "delete it, or pass --overwrite to discard it",
            )
        ) from None


def nonfinite_amax(state: Any, prefix: str = "") -> list[str]:
    """Names of the amax tensors in a (nested) quantizer state that hold NaN or Inf."""
    bad: list[str] = []
    if isinstance(state, dict):
        for k, v in state.items():
            name = f"{prefix}.{k}" if prefix else str(k)
            if torch.is_tensor(v) and "amax" in str(k) and v.is_floating_point():
                if not bool(torch.isfinite(v).all()):
                    bad.append(name)
            elif isinstance(v, (dict, list, tuple)):
                bad.extend(nonfinite_amax(v, name))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            bad.extend(nonfinite_amax(v, f"{prefix}[{i}]"))
    elif isinstance(state, float) and not math.isfinite(state):
        bad.append(prefix)
    return bad
