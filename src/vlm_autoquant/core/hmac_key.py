"""The per-user HMAC key file (integrity.py says why it exists), checked like any input.

Its path comes from the environment, so it is validated with the other inputs, before anything
is loaded: a regular file (never a directory, FIFO or device, which would block or lie) of a
plausible size that this user can read, or an absent file whose folder can be made. A key that
other users can read is accepted with a warning: they could sign a search record.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path

from . import paths
from .errors import Problem, Problems, UsageError

log = logging.getLogger(__name__)

KEY_ENV = "VLM_AUTOQUANT_HMAC_KEY_FILE"
KEY_BYTES = 32
MAX_KEY_FILE_BYTES = 4096  # a key is 32 bytes; anything much larger is not a key file
_FIX = (
    f"point {KEY_ENV} at a regular file of {KEY_BYTES} or more random bytes that only you "
    "can read, or unset it (~/.cache/vlm_autoquant/hmac.key is made on first use)"
)


def key_path() -> Path:
    """VLM_AUTOQUANT_HMAC_KEY_FILE, else ~/.cache/vlm_autoquant/hmac.key."""
    env = os.environ.get(KEY_ENV)
    return Path(env) if env else Path.home() / ".cache" / "vlm_autoquant" / "hmac.key"


def check_key_file(problems: Problems) -> None:
    """Add a problem when the key file cannot serve; warn when other users can read it."""
    path = key_path()
    try:
        st = os.stat(path)
    except FileNotFoundError:
        _check_creatable(path, problems)
        return
    except OSError as exc:
        problems.add(KEY_ENV, *paths.describe_oserror(path, exc))
        return
    if not stat.S_ISREG(st.st_mode):
        problems.add(
            KEY_ENV, f"the HMAC key file {path} is {paths.kind(st.st_mode)}, not a regular file", _FIX
        )
        return
    if not KEY_BYTES <= st.st_size <= MAX_KEY_FILE_BYTES:
        problems.add(
            KEY_ENV,
            f"the HMAC key file {path} is {st.st_size} bytes; a key file "
            f"holds {KEY_BYTES} to {MAX_KEY_FILE_BYTES}",
            _FIX,
        )
        return
    try:
        read_key(path)
    except UsageError as exc:
        problems.extend(exc.problems)
        return
    if st.st_mode & stat.S_IROTH:
        log.warning(
            "%s: the HMAC key file %s is readable by every user (mode %o): anyone could "
            "sign a search record this tool trusts; chmod 600 %s",
            KEY_ENV,
            path,
            stat.S_IMODE(st.st_mode),
            path,
        )


def _check_creatable(path: Path, problems: Problems) -> None:
    folder = next((p for p in path.parents if paths.exists(p)), Path("/"))
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        problems.add(
            KEY_ENV,
            f"the HMAC key file {path} does not exist and cannot be made in {folder} ({exc.strerror})",
            _FIX,
        )


def read_key(path: Path) -> bytes:
    """The key's bytes; UsageError for a file that is not a readable key (never blocks)."""
    try:
        data = paths.read_regular(path, MAX_KEY_FILE_BYTES)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UsageError(Problem(KEY_ENV, *paths.describe_oserror(path, exc))) from None
    except paths.NotARegularFile as exc:
        raise UsageError(Problem(KEY_ENV, f"the HMAC key file {exc}", _FIX)) from None
    if len(data) < KEY_BYTES:
        raise UsageError(
            Problem(
                KEY_ENV,
                f"the HMAC key file {path} is shorter than {KEY_BYTES} bytes",
                "delete it (a new key is made) and rerun with --overwrite",
            )
        )
    return data


def load_or_create() -> bytes:
    """The signing key: read it, or create it 0600 (O_EXCL, so two first uses agree on one)."""
    path = key_path()
    for _ in range(2):
        try:
            return read_key(path)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue  # another process made it first: read theirs
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(KEY_BYTES))
                f.flush()
                os.fsync(f.fileno())
    return read_key(path)
