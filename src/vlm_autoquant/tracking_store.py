"""The MLflow store, checked before any weight is loaded, and a new SQLite store made whole.

Every store problem a run would otherwise meet only when it logs is found here: a server that is
down, or that answers but refuses our credentials (probed with MLflow's own client code, so
credentials from the URI, MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN and TLS settings count as they
do for logging); a `file:` store MLflow 3 refuses; an SQLite file that cannot be written, is not
SQLite, or whose schema is half-migrated or from another MLflow; a deleted experiment.

A new SQLite store is built and migrated at a temporary path beside the target and renamed into
place under the store lock, so a process killed while MLflow migrates leaves no store (and a
temporary file the next creator sweeps), never a half-made one. On 4 or more cores a run
migrates it in a child process (`store_building`) while it checks its inputs and imports torch
and transformers, and puts it in place before any weight is loaded. Credentials in a tracking
URI are never shown: every message goes through `redact`.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from urllib.parse import urlparse

from .core.errors import Problems

log = logging.getLogger(__name__)

KEY = "MLFLOW_TRACKING_URI"
DEFAULT_EXPERIMENT = "qwen2.5-vl-3b-autoquant-fp8"  # where every run goes unless told otherwise
DEFAULT_URI = "sqlite:///mlflow.db"  # MLflow 3's own default when MLFLOW_TRACKING_URI is unset
PROBE_TIMEOUT_S = 5  # one try, no retries: a store that does not answer in 5 s is down
PROBE_ENDPOINT = "/api/2.0/mlflow/experiments/get-by-name"  # authenticated, unlike /health
# `scheme://user:password@host`: everything between :// and the last @ before the path.
_CREDENTIALS = re.compile(r"(?<=://)[^/\s]*@")
_REVISION = re.compile(r"^(down_revision|revision)\s*(?::[^=]*)?=\s*(.+)$", re.MULTILINE)


def redact(text: object) -> str:
    """`text` with the credentials of every URL in it replaced by `***`."""
    return _CREDENTIALS.sub("***@", str(text))


class RedactCredentials(logging.Filter):
    """A handler filter: the credentials of any URL in a log line are replaced by `***`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "@" in message:
            record.msg, record.args = redact(message), None
        return True


def log_to_stderr(debug: bool) -> None:
    """The log every process of a run writes (the run's, its tracker's): one line per phase at
    INFO, library chatter at DEBUG, and no tracking password in any line. Without `debug`,
    libraries' notices of their own future changes stay quiet (Python hides DeprecationWarning)."""
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(message)s",
        datefmt="%H:%M:%S",
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactCredentials) for f in handler.filters):
            handler.addFilter(RedactCredentials())
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else MLflow's default (sqlite:///mlflow.db, artifacts in ./mlruns)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def shown_uri() -> str:
    """The tracking URI as it may be printed (credentials redacted)."""
    return redact(tracking_uri())


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    return Path(uri[len("sqlite:///") :]).resolve() if uri.startswith("sqlite:///") else None


def is_server(uri: str) -> bool:
    """Whether MLflow reaches this store over the network (anything but a local file)."""
    return sqlite_file(uri) is None and _file_store(uri) is None


def _file_store(uri: str) -> Path | None:
    """The folder of a `file:` URI or a plain path (MLflow's file store), else None."""
    if uri.startswith("file:"):
        return Path(urlparse(uri).path)
    if "://" in uri or uri.startswith("databricks") or re.match(r"^[A-Za-z][\w+.-]*:", uri):
        return None
    return Path(uri)


def active_experiment(experiment: str | None) -> str | None:
    """The experiment name a run will use, as `tracking.experiment_id` chooses it (None where a
    non-Default MLFLOW_EXPERIMENT_ID chooses it by id)."""
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name is None and os.environ.get("MLFLOW_EXPERIMENT_ID", "") not in ("", "0"):
        return None
    return name or DEFAULT_EXPERIMENT


def check_store(problems: Problems, experiment: str | None = None) -> None:
    """Add a problem for every reason the tracking store would fail this run's logging."""
    uri = tracking_uri()
    name = active_experiment(experiment)
    if uri.startswith(("http://", "https://")):
        _check_server(uri, name, problems)
    elif (db := sqlite_file(uri)) is not None:
        _check_sqlite(db, name, problems)
    elif (folder := _file_store(uri)) is not None:
        if os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
            problems.add(
                KEY,
                f"{redact(uri)} is a file store, which MLflow {_mlflow_version()} refuses (maintenance mode)",
                "use sqlite:///mlflow.db (`mlflow migrate-filestore` moves old runs), "
                "or set MLFLOW_ALLOW_FILE_STORE=true",
            )
        elif not _writable_dir(folder):
            problems.add(
                KEY,
                f"cannot write the file store {folder}",
                "fix its permissions or point MLFLOW_TRACKING_URI elsewhere",
            )


def _fix_uri() -> str:
    return (
        "start the server, fix MLFLOW_TRACKING_URI, or unset it to use the local store "
        "(sqlite:///mlflow.db with artifacts under ./mlruns)"
    )


def _check_server(uri: str, experiment: str | None, problems: Problems) -> None:
    """One authenticated request, as MLflow's REST store makes it, with a short timeout."""
    from mlflow.utils.credentials import get_default_host_creds  # mlflow: off the refusal path
    from mlflow.utils.rest_utils import http_request  # mlflow: off the refusal path

    try:
        resp = http_request(
            get_default_host_creds(uri),
            PROBE_ENDPOINT,
            "GET",
            max_retries=0,
            backoff_factor=0,
            timeout=PROBE_TIMEOUT_S,
            raise_on_status=False,
            params={"experiment_name": experiment or "Default"},
        )
    except Exception as exc:  # noqa: BLE001 - any failure to connect means the same to the user
        problems.add(
            KEY,
            f"tracking server {redact(uri)} is unreachable ({type(exc).__name__}: {redact(exc)[:300]})",
            _fix_uri(),
        )
        return
    code = resp.status_code
    body = _json(resp)
    if code in (401, 403):
        problems.add(
            KEY,
            f"tracking server {redact(uri)} is reachable but refuses these credentials (HTTP {code})",
            "set MLFLOW_TRACKING_USERNAME and "
            "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) for an account with "
            "access to the experiment",
        )
    elif code == 404 and body.get("error_code") == "RESOURCE_DOES_NOT_EXIST":
        return  # the experiment does not exist yet: the run creates it
    elif code != 200:
        problems.add(
            KEY,
            f"{redact(uri)} does not answer as an MLflow tracking server (HTTP {code} for {PROBE_ENDPOINT})",
            _fix_uri(),
        )
    elif experiment and body.get("experiment", {}).get("lifecycle_stage") == "deleted":
        _deleted(experiment, body["experiment"].get("experiment_id"), problems)


def _json(resp) -> dict:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _deleted(name: str, exp_id: object, problems: Problems) -> None:
    problems.add(
        "--experiment",
        f"experiment {name!r} is deleted in the tracking store "
        f"{shown_uri()} (MLflow will not start a run in it)",
        f"restore it (mlflow experiments restore --experiment-id {exp_id}), or pass another --experiment",
    )


def _writable_dir(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


# SQLite ---------------------------------------------------------------------------------------

_RW = "file:{}?mode=rw"  # how the write probe opens an existing store


def _check_sqlite(db: Path, experiment: str | None, problems: Problems) -> None:
    try:
        db.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=db.parent):
            pass
    except OSError as exc:
        problems.add(KEY, f"cannot write the SQLite store in {db.parent} ({exc.strerror})", _fix_uri())
        return
    if not db.exists() or db.stat().st_size == 0:
        return  # a new store: `ensure_store` makes it, whole, before any weight is loaded
    state = schema_problem(db)
    if state is not None:
        problems.add(KEY, *state)
        return
    write = _write_error(db)
    if write is not None:
        problems.add(
            KEY,
            f"the SQLite store {db} cannot be written ({write})",
            f"make it writable (chmod u+w {db}, and its directory), or point "
            "MLFLOW_TRACKING_URI at another file",
        )
    elif experiment and (exp_id := _deleted_experiment(db, experiment)) is not None:
        _deleted(experiment, exp_id, problems)


def _tables(db: Path) -> set[str]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)) as con:
        return {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def schema_problem(db: Path) -> tuple[str, str] | None:
    """(message, fix) when `db` is not an SQLite store this MLflow can use as it is."""
    aside = f"mv {db} {db}.broken"
    try:
        tables = _tables(db)
        versions = []
        if "alembic_version" in tables:
            with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
                versions = [r[0] for r in con.execute("SELECT version_num FROM alembic_version")]
    except sqlite3.DatabaseError as exc:
        return (
            f"{db} is not a usable SQLite database ({exc})",
            f"move it aside ({aside}) and rerun: a new store is created",
        )
    if not tables:
        return None
    if not versions:
        return (
            f"{db} is a half-made MLflow store: it holds {len(tables)} tables but no schema "
            "version (a process was killed while MLflow created it)",
            f"move it aside ({aside}) and rerun: a new store is created; a finished "
            "--output-dir is logged into it with --log-only",
        )
    head, known = _revisions()
    if head is None or versions[0] == head:
        return None
    if versions[0] not in known:
        return (
            f"{db} was made by a newer MLflow (schema revision {versions[0]} is unknown to "
            f"MLflow {_mlflow_version()})",
            "upgrade mlflow, or point MLFLOW_TRACKING_URI at another store",
        )
    return (
        f"{db}'s schema is at revision {versions[0]}, MLflow {_mlflow_version()} needs "
        f"{head}: an older MLflow made it, or a process was killed while upgrading it",
        f"back it up (cp {db} {db}.bak), then run: mlflow db upgrade sqlite:///{db}; if that "
        f"fails with 'table ... already exists', the upgrade was cut short: move it aside "
        f"({aside}) and rerun, and a new store is created",
    )


def _write_error(db: Path) -> str | None:
    """Why SQLite cannot write `db` (a read-only file or mount), or None."""
    try:
        with contextlib.closing(
            sqlite3.connect(_RW.format(db), uri=True, timeout=1, isolation_level=None)
        ) as con:
            con.execute("BEGIN IMMEDIATE")  # the write lock, then a write that is rolled back
            try:
                con.execute("CREATE TABLE vlm_autoquant_write_probe (x INTEGER)")
            finally:
                con.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        return None if "locked" in str(exc) else str(exc)
    return None


def _deleted_experiment(db: Path, name: str) -> str | None:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            row = con.execute(
                "SELECT experiment_id, lifecycle_stage FROM experiments WHERE name = ?", (name,)
            ).fetchone()
    except sqlite3.DatabaseError:
        return None
    return str(row[0]) if row and row[1] == "deleted" else None


def _mlflow_dir() -> Path | None:
    spec = importlib.util.find_spec("mlflow")  # finds the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec else []
    return Path(locations[0]) if locations else None


def _revisions() -> tuple[str | None, set[str]]:
    """(head, every revision) of the installed MLflow's schema migrations, read from its files."""
    root = _mlflow_dir()
    revs: set[str] = set()
    downs: set[str] = set()
    for path in (root / "store" / "db_migrations" / "versions").glob("*.py") if root else []:
        for kind, value in _REVISION.findall(path.read_text(encoding="utf-8", errors="replace")):
            ids = set(re.findall(r"[\"']([0-9A-Za-z_]+)[\"']", value))
            (revs if kind == "revision" else downs).update(ids)
    heads = revs - downs
    return (next(iter(heads)) if len(heads) == 1 else None), revs


def _mlflow_version() -> str:
    for dist in ("mlflow", "mlflow-skinny"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            return metadata.version(dist)
    return "?"


@contextlib.contextmanager
def store_lock() -> Iterator[None]:
    """Serialise the creation and first use of a SQLite store between processes."""
    db = sqlite_file(tracking_uri())
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_store() -> None:
    """Create a new SQLite store whole: migrate it at a temporary path, then rename it into
    place, under the store lock. Does nothing for an existing store or another kind of store."""
    db = sqlite_file(tracking_uri())
    if db is None or (_made(db) and not _leftovers(db)):
        return
    with store_lock():
        for stale in _leftovers(db):
            stale.unlink(missing_ok=True)  # left by a creator that was killed
        if _made(db):
            return  # another process made it while we waited
        tmp = _temp_store(db)
        try:
            _migrate(tmp)
            _publish(tmp, db)
        finally:
            _remove_temp(tmp)


def _temp_store(db: Path) -> Path:
    """A new empty file beside `db`, named as `_leftovers` finds it."""
    fd, name = tempfile.mkstemp(prefix=f".{db.name}.", suffix=".tmp", dir=db.parent)
    os.close(fd)
    return Path(name)


def _publish(tmp: Path, db: Path) -> None:
    """Rename the migrated `tmp` into place as `db`, with the permissions a new file gets."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, db)
    log.info("created the MLflow store %s", db)


def _remove_temp(tmp: Path) -> None:
    for leftover in (tmp, Path(f"{tmp}-journal")):
        leftover.unlink(missing_ok=True)


def create_store(problems: Problems) -> None:
    """`ensure_store`, with a failure (a full disk, say) added to `problems`."""
    try:
        ensure_store()
    except Exception as exc:  # noqa: BLE001 - whatever MLflow raised, no store was left behind
        problems.add(
            KEY,
            f"the new MLflow store could not be created ({type(exc).__name__}: {redact(exc)[:300]})",
            "free disk space or fix the permissions of its "
            "directory, or point MLFLOW_TRACKING_URI at another store",
        )


CHILD_MIN_CORES = 4  # usable cores from which a child process pays (`has_core_to_spare`)
_MIGRATE = "import sys, pathlib, vlm_autoquant.tracking_store as s; s._migrate(pathlib.Path(sys.argv[1]))"


@dataclass
class StoreBuild:
    """A new SQLite store migrating at a temporary path in a child process."""

    db: Path | None = None
    tmp: Path | None = None
    proc: subprocess.Popen | None = None

    @classmethod
    def start(cls) -> StoreBuild:
        """Start migrating when the store is a new SQLite file in an existing folder and a core
        is free for it; otherwise (a server, an existing store, a folder still to make, two
        cores) `finish` does what is needed, in this process."""
        db = sqlite_file(tracking_uri())
        if db is None or not db.parent.is_dir() or _made(db) or not _cores_to_spare():
            return cls()
        tmp = _temp_store(db)
        child = [sys.executable, "-c", _MIGRATE, str(tmp)]
        io = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return cls(db, tmp, subprocess.Popen(child, env=child_env(), **io))

    def finish(self, problems: Problems) -> None:
        """Rename the child's store into place under the store lock. When the child failed (or
        another creator came first), `create_store` does the rest here and reports any failure."""
        if self.proc is not None and self.proc.wait() == 0 and self.tmp.exists():
            with store_lock():
                if not _made(self.db):
                    _publish(self.tmp, self.db)
        self.discard()
        create_store(problems)  # nothing to do for a store in place

    def discard(self) -> None:
        """Stop the child and remove its temporary store: a refused run leaves no store."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.tmp is not None:
            _remove_temp(self.tmp)
        self.proc = self.tmp = None


def has_core_to_spare() -> bool:
    """A child process pays only beside a free core: it imports MLflow once more, which on two
    busy cores costs more than the work it moves (docs/PERFORMANCE.md, "Before the model loads")."""
    return len(os.sched_getaffinity(0)) >= CHILD_MIN_CORES


def _cores_to_spare() -> bool:
    """Whether a new store migrates in a child process (`has_core_to_spare`)."""
    return has_core_to_spare()


def child_env() -> dict[str, str]:
    """The environment of a child `python -c` that imports this package as this process does."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}


@contextlib.contextmanager
def store_building() -> Iterator[StoreBuild]:
    """A new SQLite store migrates in a child process while the block runs; the block calls
    `finish` to put it in place. Leaving the block without `finish` leaves no store behind."""
    build = StoreBuild.start()
    try:
        yield build
    finally:
        build.discard()


def _leftovers(db: Path) -> list[Path]:
    """Temporary stores (and their journals) of creators that were killed."""
    return list(db.parent.glob(f".{db.name}.*.tmp*"))


def _made(db: Path) -> bool:
    try:
        return db.stat().st_size > 0 and bool(_tables(db))
    except (OSError, sqlite3.DatabaseError):
        return db.exists() and db.stat().st_size > 0  # not ours to replace: the check reports it


def _migrate(path: Path) -> None:
    """Every MLflow table and migration, in a fresh SQLite file at `path`."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # mlflow: off the refusal path
    from mlflow.tracking._tracking_service.utils import _get_sqlalchemy_store  # mlflow: off the refusal path

    uri = f"sqlite:///{path}"
    try:
        _get_sqlalchemy_store(uri, None)  # MLflow's own creation: tables, migrations, Default
    finally:
        engine = SqlAlchemyStore._engine_map.pop(uri, None)
        if engine is not None:
            engine.dispose()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
