"""tracking.py: runs end in one place, a tracking failure never costs the result, stale runs close."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading

import pytest

from vlm_autoquant.core.artifacts import MANIFEST_FILE, RUN_ID_FILE
from vlm_autoquant.tracking_store import PROBE_ENDPOINT
from vlm_autoquant.tracking_store import _cores_to_spare as REAL_CORES_TO_SPARE

from .conftest import PY, QUICK, run_cli, subprocess_env


def store(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, mlflow.MlflowClient(tracking_uri=uri)


@pytest.mark.parametrize(
    "exc,status", [(None, "FINISHED"), (RuntimeError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_tracked_run_ends_finished_failed_or_killed(tmp_path, monkeypatch, exc, status):
    from vlm_autoquant.tracking import tracked_run

    uri, client = store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    out = tmp_path / "out"
    with pytest.raises(type(exc)) if exc else _nothing():
        with tracked_run("e", "r", out_dir=out) as tracker:
            tracker.log_metrics({"m": 1.0})
            if exc:
                raise exc
    run = client.get_run(tracker.run_id)
    assert run.info.status == status
    assert (out / RUN_ID_FILE).read_text().splitlines()[0] == tracker.run_id
    if exc:
        assert type(exc).__name__ in run.data.tags["failure_reason"]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_a_run_left_running_by_a_killed_process_is_closed_as_killed(tmp_path, monkeypatch):
    from vlm_autoquant.tracking import close_stale, remember

    uri, client = store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    exp = client.create_experiment("e")
    stale = client.create_run(exp).info.run_id  # RUNNING, as a SIGKILLed process leaves it
    remember(tmp_path, stale)
    close_stale(tmp_path).join()  # in the background: mlflow is imported off the main thread
    run = client.get_run(stale)
    assert run.info.status == "KILLED" and "killed" in run.data.tags["failure_reason"]
    close_stale(tmp_path).join()  # a finished run is left as it is
    assert client.get_run(stale).info.status == "KILLED"


def test_the_next_run_in_that_dir_waits_for_the_stale_run_to_close(tmp_path, monkeypatch):
    """close_stale returns at once; the run that replaces the recorded id closes the old first."""
    from vlm_autoquant.tracking import close_stale, remember, tracked_run

    uri, client = store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    stale = client.create_run(client.create_experiment("e")).info.run_id
    remember(tmp_path, stale)
    close_stale(tmp_path)
    with tracked_run("e", "r", out_dir=tmp_path) as tracker:
        tracker.wait()
        assert client.get_run(stale).info.status == "KILLED"
    assert (tmp_path / RUN_ID_FILE).read_text().splitlines()[0] == tracker.run_id != stale
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_system_metrics_are_sampled_often_and_stop_without_waiting(tmp_path, monkeypatch):
    """A 3 s run still gets system metrics (MLflow's 10 s default gave none), and ending it does
    not wait out a sampling interval."""
    import time

    from vlm_autoquant.tracking import SYSTEM_METRICS_INTERVAL_S, tracked_run

    uri, client = store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    with tracked_run("e", "r", system_metrics=True) as tracker:
        tracker.wait()
        time.sleep(3.0)  # a sample published, the next one pending
        t0 = time.perf_counter()
    stop_s = time.perf_counter() - t0
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert "system/cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)
    assert stop_s < SYSTEM_METRICS_INTERVAL_S, f"ending the run took {stop_s:.2f} s"


class _Api500(http.server.BaseHTTPRequestHandler):
    """Answers the store check (an experiment lookup), 500 on every other API call: a server
    that breaks after the check."""

    def _answer(self):
        ok = self.path.startswith(PROBE_ENDPOINT)
        self.send_response(404 if ok else 500)
        self.end_headers()
        self.wfile.write(b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}' if ok else b"{}")

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, *a):
        pass


def test_tracking_failure_keeps_the_result_and_log_only_logs_it_later(
    demo, tmp_path, monkeypatch, capsys, caplog
):
    """The failing run goes through the CLI in-process (against a live server that fails every
    API call); --log-only then runs through the same entry point into a working store."""
    import logging

    caplog.set_level(logging.INFO)  # what the script shows on stderr
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api500)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "out"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        code = run_cli(
            [
                "--scheme-name",
                "fp8-balanced-10b",
                "--model-dir",
                demo[0],
                "--calib-file",
                demo[1],
                "--output-dir",
                out,
                *QUICK,
            ]
        )
    finally:
        server.shutdown()
    err = capsys.readouterr().err + caplog.text
    assert code == 1, err[-3000:]
    assert "safe on disk" in err and "--log-only" in err
    # the recovery command names the store and the experiment it was meant for
    assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{server.server_address[1]}" in err
    assert "--experiment qwen2.5-vl-3b-autoquant-fp8" in err
    assert "Traceback" not in err
    doc = json.loads((out / MANIFEST_FILE).read_text())  # the whole result is there
    uri, client = store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for leftover in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(leftover, raising=False)  # what the failed run left in os.environ
    code = run_cli(["--log-only", "--output-dir", out])
    later = capsys.readouterr().err
    assert code == 0, later[-3000:]
    assert "Traceback" not in later
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["effective_bits/achieved"] == doc["effective_bits"]["achieved"]
    assert runs[0].data.tags["logged_later_from"] == str(out.resolve())
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {MANIFEST_FILE}


def test_two_processes_start_runs_on_one_fresh_sqlite_store(tmp_path):
    """The store's first-time schema creation is serialised: both processes get their run."""
    code = (
        "import sys\nfrom vlm_autoquant.tracking import tracked_run\n"
        "with tracked_run('e', sys.argv[1]) as t:\n    t.log_metrics({'m': 1.0})\n"
    )
    uri, client = store(tmp_path)
    procs = [
        subprocess.Popen(
            [PY, "-c", code, f"r{i}"],
            cwd=tmp_path,
            text=True,
            stderr=subprocess.PIPE,
            env=subprocess_env(MLFLOW_TRACKING_URI=uri),
        )
        for i in range(2)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert sorted(r.data.tags["mlflow.runName"] for r in runs) == ["r0", "r1"]
    assert {r.info.status for r in runs} == {"FINISHED"}


# --- the store is checked before any work, and a new one is made whole -----------------------


def _problems(experiment: str | None = None):
    from vlm_autoquant.core.errors import Problems
    from vlm_autoquant.tracking_store import check_store

    problems = Problems()
    check_store(problems, experiment)
    return problems.items


def test_a_store_killed_while_it_is_created_is_never_left_half_made(tmp_path, monkeypatch):
    """SIGKILL a first run while MLflow migrates its new store: no store is left (only a
    temporary file, swept by the next creator), and the next run gets a working store."""
    import os
    import signal
    import time

    db = tmp_path / "mlflow.db"
    code = "from vlm_autoquant.tracking import tracked_run\nwith tracked_run('e', 'r') as t:\n    t.wait()\n"
    proc = subprocess.Popen(
        [PY, "-c", code],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        env=subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{db}"),
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:  # the first bytes of a schema
        if any(
            p.stat().st_size > 0
            for p in tmp_path.glob("*mlflow.db*")
            if p.is_file() and not p.name.endswith(".lock")
        ):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert not db.exists() and not _problems("e"), "a killed creation left a half-made store"
    from vlm_autoquant.tracking import tracked_run

    monkeypatch.chdir(tmp_path)
    with tracked_run("e", "r") as t:  # the next run, here in this process
        t.wait()
    uri, client = store(tmp_path)
    runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def _half_made(db, version: str | None) -> None:
    import sqlite3

    con = sqlite3.connect(db)  # some of MLflow's tables, as a killed migration leaves them
    con.execute(
        "CREATE TABLE experiments (experiment_id INTEGER PRIMARY KEY, name TEXT, lifecycle_stage TEXT)"
    )
    con.execute("CREATE TABLE runs (run_uuid TEXT PRIMARY KEY)")
    if version is not None:
        con.execute("CREATE TABLE alembic_version (version_num TEXT)")
        con.execute("INSERT INTO alembic_version VALUES (?)", (version,))
    con.commit()
    con.close()


def test_a_half_made_store_is_refused_at_once_with_the_way_out(tracking, demo, capsys):
    from pathlib import Path

    db = Path(tracking[len("sqlite:///") :])
    _half_made(db, None)
    code = run_cli(
        [
            "--scheme-name",
            "fp8-balanced-10b",
            "--model-dir",
            demo[0],
            "--calib-file",
            demo[1],
            "--output-dir",
            "out",
            *QUICK,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    assert "MLFLOW_TRACKING_URI" in err and "half-made" in err
    assert f"mv {db} {db}.broken" in err and "Traceback" not in err
    assert not Path("out").exists()


def test_a_store_behind_or_ahead_of_this_mlflow_is_refused_with_the_command(tmp_path, monkeypatch):
    """A schema revision this MLflow knows but is not its head (an older MLflow, or an upgrade
    cut short) names `mlflow db upgrade`; one it does not know names a newer MLflow."""
    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    _half_made(db, "84291f40a231")  # an early MLflow schema revision
    [p] = _problems()
    assert "84291f40a231" in p.message and f"mlflow db upgrade sqlite:///{db}" in p.fix
    assert "already exists" in p.fix and f"mv {db}" in p.fix
    db.unlink()
    _half_made(db, "ffffffffffff")
    [p] = _problems()
    assert "newer MLflow" in p.message


def _store_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "mlflow.db" in p.name and not p.name.endswith(".lock"))


def _default_experiment(db) -> list[tuple]:
    import sqlite3

    with sqlite3.connect(db) as con:
        return con.execute("SELECT name FROM experiments").fetchall()


def test_a_new_store_migrates_in_a_child_and_appears_whole(tmp_path, monkeypatch, store_child):
    from vlm_autoquant.core.errors import Problems
    from vlm_autoquant.tracking_store import StoreBuild

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.chdir(tmp_path)
    build = StoreBuild.start()
    assert build.proc is not None and build.tmp.parent == tmp_path
    assert not db.exists()  # only `finish` puts it in place
    problems = Problems()
    build.finish(problems)
    assert problems.items == [] and build.proc is None
    assert _store_files(tmp_path) == ["mlflow.db"]  # no temporary store or journal left
    assert _default_experiment(db) == [("Default",)]  # MLflow's own migrations ran in the child
    assert _problems() == []


def test_without_a_core_to_spare_the_store_is_made_in_this_process(tmp_path, monkeypatch, store_child):
    from vlm_autoquant import tracking_store
    from vlm_autoquant.core.errors import Problems

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setattr(tracking_store.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(tracking_store, "_cores_to_spare", REAL_CORES_TO_SPARE)
    build = tracking_store.StoreBuild.start()
    assert build.proc is None and build.tmp is None
    problems = Problems()
    build.finish(problems)
    assert problems.items == [] and _store_files(tmp_path) == ["mlflow.db"]


def test_a_refused_run_leaves_no_store_and_no_child(tmp_path, monkeypatch, store_child):
    from vlm_autoquant.tracking_store import store_building

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    with store_building() as build:
        child = build.proc
        assert child is not None and child.poll() is None
    assert child.returncode is not None  # stopped, not left migrating
    assert _store_files(tmp_path) == []


def test_a_failed_child_falls_back_to_making_the_store_here(tmp_path, monkeypatch, store_child):
    from vlm_autoquant import tracking_store
    from vlm_autoquant.core.errors import Problems

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.setattr(tracking_store, "_MIGRATE", "raise SystemExit(3)")
    build = tracking_store.StoreBuild.start()
    problems = Problems()
    build.finish(problems)
    assert problems.items == [] and _store_files(tmp_path) == ["mlflow.db"]
    assert _default_experiment(db)


def test_a_store_made_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch, store_child):
    from vlm_autoquant import tracking_store
    from vlm_autoquant.core.errors import Problems

    db = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    build = tracking_store.StoreBuild.start()
    tracking_store.ensure_store()  # another creator first (it sweeps the child's file as a leftover)
    theirs = db.stat().st_ino
    problems = Problems()
    build.finish(problems)
    assert problems.items == [] and db.stat().st_ino == theirs
    assert _store_files(tmp_path) == ["mlflow.db"]


def test_a_run_refused_after_the_cheap_checks_leaves_no_store(demo, tmp_path, monkeypatch, store_child):
    """The store migrates while transformers checks the config and tokenizer; a refusal there
    stops the child and removes its file."""
    import shutil

    from vlm_autoquant import VlmAutoquantError, quantize

    ckpt = tmp_path / "ckpt"
    shutil.copytree(demo[0], ckpt, ignore=shutil.ignore_patterns("tokenizer*", "vocab*", "merges*"))
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(VlmAutoquantError, match="tokenizer"):
        quantize(ckpt, output_dir=tmp_path / "o", calib_file=demo[1])
    assert _store_files(store) == [] and not (tmp_path / "o").exists()


def test_new_existing_file_and_read_only_stores(tmp_path, monkeypatch):
    import os

    from vlm_autoquant import tracking_store

    db = tmp_path / "s" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    assert _problems("e") == [] and not db.exists()  # the check itself writes nothing
    tracking_store.ensure_store()
    assert _problems("e") == [] and db.is_file()
    db.chmod(0o444)
    if os.geteuid() == 0:  # root writes a 0444 file anyway: open it as SQLite does for others
        monkeypatch.setattr(tracking_store, "_RW", "file:{}?mode=ro")
    [p] = _problems("e")
    assert "cannot be written" in p.message and "readonly" in p.message and "chmod" in p.fix
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file://{tmp_path / 'mlruns'}")
    [p] = _problems("e")
    assert "file store" in p.message and "MLFLOW_ALLOW_FILE_STORE" in p.fix
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert _problems("e") == []


def test_a_deleted_experiment_is_found_before_the_run(tmp_path, monkeypatch):
    uri, client = store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    exp = client.create_experiment("gone")
    assert _problems("gone") == []
    client.delete_experiment(exp)
    [p] = _problems("gone")
    assert p.input == "--experiment" and "deleted" in p.message
    assert f"mlflow experiments restore --experiment-id {exp}" in p.fix
    assert _problems("other") == []


class _AuthServer(http.server.BaseHTTPRequestHandler):
    """An MLflow server behind basic auth (user:secret); experiment 'gone' is deleted."""

    def do_GET(self):
        import base64

        good = "Basic " + base64.b64encode(b"user:secret").decode()
        if self.headers.get("Authorization") != good:
            self.send_response(401)
            body = b"unauthorized"
        elif "experiment_name=gone" in self.path:
            self.send_response(200)
            body = json.dumps(
                {"experiment": {"experiment_id": "7", "name": "gone", "lifecycle_stage": "deleted"}}
            ).encode()
        else:
            self.send_response(404)
            body = b'{"error_code": "RESOURCE_DOES_NOT_EXIST"}'
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture
def auth_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AuthServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_a_server_is_checked_with_the_credentials_mlflow_sends(auth_server, monkeypatch):
    """Credentials in the URI are used, as MLflow's client uses them; a 401 is 'reachable but
    refused', not 'unreachable'; the password never appears in a message."""
    for key in (
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "MLFLOW_TRACKING_TOKEN",
        "MLFLOW_RUN_ID",
        "MLFLOW_EXPERIMENT_ID",
        "MLFLOW_EXPERIMENT_NAME",
    ):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:secret@127.0.0.1:{auth_server}")
    assert _problems("e") == []
    [p] = _problems("gone")
    assert p.input == "--experiment" and "deleted" in p.message and "secret" not in str(p)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://user:hunter2@127.0.0.1:{auth_server}")
    [p] = _problems("e")
    assert "reachable but refuses" in p.message and "HTTP 401" in p.message
    assert "hunter2" not in str(p) and "***@127.0.0.1" in p.message
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{auth_server}")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "user")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
    assert _problems("e") == []


def test_credentials_are_never_printed_by_a_refused_run(tmp_path, monkeypatch, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:hunter2@127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)
    code = run_cli(
        ["--scheme-name", "fp8-balanced-10b", "--model-dir", tmp_path / "none", "--output-dir", "out"]
    )
    err = capsys.readouterr().err
    assert code == 2 and "unreachable" in err and "alice:***@" not in err
    assert "hunter2" not in err and f"http://***@127.0.0.1:{port}" in err


def test_redaction_covers_every_url_in_a_message_and_a_log_line():
    import logging

    from vlm_autoquant.tracking_store import RedactCredentials, redact

    assert redact("to https://u:p@ss@h:1/x and http://t@h2/") == "to https://***@h:1/x and http://***@h2/"
    assert redact("sqlite:///a@b.db") == "sqlite:///a@b.db"  # no host part: nothing to hide
    record = logging.LogRecord("x", logging.INFO, "f", 1, "store %s failed", ("http://a:b@h",), None)
    RedactCredentials().filter(record)
    assert record.getMessage() == "store http://***@h failed"


def test_no_mlflow_export_by_run_id_never_contacts_a_server(tmp_path, monkeypatch, capsys):
    from vlm_autoquant import tracking_store
    from vlm_autoquant.cli.export import main as export_main

    def contacted(*a, **k):
        raise AssertionError("a server was contacted")

    monkeypatch.setattr(tracking_store, "_check_server", contacted)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:pw@127.0.0.1:9")
    code = export_main(["--run-id", "0123abcd", "--output-dir", str(tmp_path / "o"), "--no-mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and "--artifacts-dir" in err and "--no-mlflow" in err
    assert "pw@" not in err and not (tmp_path / "o").exists()


def test_a_copied_output_dir_does_not_close_the_original_run(tmp_path, monkeypatch):
    """The run id file travels with a copy; the run it names belongs to the original dir."""
    import shutil

    from vlm_autoquant.tracking import close_stale, remember

    uri, client = store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    live = client.create_run(client.create_experiment("e")).info.run_id
    original = tmp_path / "orig"
    remember(original, live)
    shutil.copytree(original, tmp_path / "copy")
    assert close_stale(tmp_path / "copy") is None
    assert client.get_run(live).info.status == "RUNNING"
    close_stale(original).join()  # the directory it was recorded in: a killed run's, closed
    assert client.get_run(live).info.status == "KILLED"


def test_the_log_only_command_carries_the_store_and_the_experiment(monkeypatch):
    from pathlib import Path

    from vlm_autoquant.run.report import log_only_command

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:pw@host:5000")
    cmd = log_only_command(Path("out dir"), "my exp")
    assert cmd.startswith("MLFLOW_TRACKING_URI='http://***@host:5000' ")
    assert "--log-only --output-dir 'out dir' --experiment 'my exp'" in cmd
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert log_only_command(Path("o"), "e").endswith("--log-only --output-dir o --experiment e")


def test_a_half_made_store_met_at_the_run_start_names_the_way_out(tmp_path, monkeypatch):
    """MLflow itself meets the half-made store (made past the check): the error says which file
    to move aside, not to wait until tracking works again."""
    from vlm_autoquant.tracking import Tracker, TrackingFailed

    db = tmp_path / "mlflow.db"
    _half_made(db, None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    with pytest.raises(TrackingFailed) as info:
        Tracker("e", "r").wait()
    assert "killed" in str(info.value) and f"mv {db} {db}.broken" in str(info.value)


def launcher_run(client, experiment_id: str, monkeypatch) -> str:
    """A RUNNING run made as `mlflow run` makes it (entry-point params, project tags), with the
    environment it gives the entry point's process."""
    run = client.create_run(
        experiment_id, tags={"mlflow.source.type": "PROJECT", "mlflow.project.entryPoint": "main"}
    )
    client.log_param(run.info.run_id, "scheme_name", "fp8-balanced-10b")
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return run.info.run_id


def test_a_run_mlflow_run_put_in_default_continues_in_the_readme_experiment(tmp_path, monkeypatch):
    """`mlflow run` without --experiment-name makes its run in "Default" (id 0): the tool's run
    goes to DEFAULT_EXPERIMENT with the launcher's params and tags; the launcher's run is ended
    as a named pointer to it."""
    from vlm_autoquant.tracking import DEFAULT_EXPERIMENT, tracked_run

    uri, client = store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    launcher = launcher_run(client, "0", monkeypatch)
    with tracked_run(None, "fp8-balanced-10b") as tracker:
        tracker.log_params({"scheme_name": "fp8-balanced-10b", "scheme.seq_len": 512})
    run = client.get_run(tracker.run_id)
    assert tracker.run_id != launcher and tracker.experiment_name == DEFAULT_EXPERIMENT
    assert client.get_experiment(run.info.experiment_id).name == DEFAULT_EXPERIMENT
    assert run.info.status == "FINISHED" and run.info.run_name == "fp8-balanced-10b"
    assert run.data.params == {"scheme_name": "fp8-balanced-10b", "scheme.seq_len": "512"}
    assert run.data.tags["mlflow.project.entryPoint"] == "main"
    old = client.get_run(launcher)
    assert old.info.status == "FINISHED" and old.data.tags["continued_in_run"] == tracker.run_id
    assert old.info.run_name == f"fp8-balanced-10b (moved to {DEFAULT_EXPERIMENT})"
    assert "--experiment-name" in old.data.tags["mlflow.note.content"]


def test_mlflow_run_with_an_experiment_keeps_its_run_and_a_flag_wins(tmp_path, monkeypatch):
    """`mlflow run --experiment-name e2e`: the launcher's run is used as it is; an explicit
    --experiment (here "mine") still takes the run there."""
    from vlm_autoquant.tracking import tracked_run

    uri, client = store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    e2e = client.create_experiment("e2e")
    for flag in (None, "mine"):
        launcher = launcher_run(client, e2e, monkeypatch)
        with tracked_run(flag, "r") as tracker:
            tracker.log_metrics({"m": 1.0})
        assert tracker.experiment_name == (flag or "e2e")
        assert (tracker.run_id == launcher) == (flag is None)
        assert client.get_run(tracker.run_id).info.run_name == "r"


def test_a_failure_before_the_run_started_names_and_explains_the_mlflow_run(tmp_path, monkeypatch):
    from vlm_autoquant.tracking import DEFAULT_EXPERIMENT, mark_launch_failed

    uri, client = store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    launcher_run(client, "0", monkeypatch)
    run_id = mark_launch_failed(None, "nope", "--scheme-name: unknown scheme 'nope'")
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == DEFAULT_EXPERIMENT
    assert run.info.status == "FAILED" and run.info.run_name == "nope"
    assert "unknown scheme" in run.data.tags["failure_reason"]
    assert mark_launch_failed(None, "nope", "again") is None  # the launcher's run is done
    monkeypatch.delenv("MLFLOW_RUN_ID")
    assert mark_launch_failed(None, "x", "outside mlflow run") is None


def test_a_run_this_process_ended_releases_its_record(tmp_path):
    """The record holds the run id and the directory's identity; ended_here reads the id."""
    from vlm_autoquant import tracking

    out = tmp_path / "o"
    assert tracking.ended_here(out)  # nothing recorded: nothing to keep
    tracking.remember(out, "0123abcd")
    assert not tracking.ended_here(out)  # recorded, not ended: kept for close_stale
    tracking._ended.add("0123abcd")
    try:
        assert tracking.ended_here(out)
    finally:
        tracking._ended.discard("0123abcd")


QUICK_KW = {
    "num_calib_samples": 512,
    "num_calib_steps": 2,
    "num_score_steps": 2,
    "num_eval_samples": 64,
    "seq_len": 128,
}


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_a_scheme_tracked_in_a_child_process_logs_what_one_tracked_here_logs(
    demo, tracking, tmp_path, monkeypatch
):
    import mlflow

    from vlm_autoquant import api
    from vlm_autoquant import tracking as trk

    done = {}
    for child in (False, True):
        monkeypatch.setattr(trk, "tracker_in_child", lambda child=child: child)
        done[child] = api.quantize(
            demo[0],
            output_dir=tmp_path / f"out-{child}",
            calib_file=demo[1],
            experiment=f"e-{child}",
            **QUICK_KW,
        )
    assert done[True].experiment == "e-True" and done[False].experiment == "e-False"
    client = mlflow.MlflowClient()
    here, there = (client.get_run(done[c].run_id) for c in (False, True))
    assert here.info.status == there.info.status == "FINISHED"
    assert set(here.data.params) == set(there.data.params)
    assert set(here.data.metrics) == set(there.data.metrics)
    for key in ("effective_bits/achieved", "quality/kl_mean", "layers/fp8", "search/predicted_loss"):
        assert here.data.metrics[key] == there.data.metrics[key]
    volatile = {"mlflow.source.name", "mlflow.source.type", "mlflow.user", "mlflow.source.git.commit"}
    assert set(here.data.tags) - volatile == set(there.data.tags) - volatile
    assert _artifacts(client, here.info.run_id) == _artifacts(client, there.info.run_id)
    names = [sorted(d.dataset.name for d in r.inputs.dataset_inputs) for r in (here, there)]
    assert names[0] == names[1] and names[0]  # the caption splits, logged from the child too
    assert (tmp_path / "out-True" / RUN_ID_FILE).read_text().split()[0] == there.info.run_id


def test_a_scheme_tracked_in_a_child_process_imports_no_mlflow_in_the_run(demo, tracking, tmp_path):
    from vlm_autoquant.core.errors import Problems
    from vlm_autoquant.tracking_store import create_store

    create_store(Problems())  # an existing store, as from the second run on
    script = (
        "import sys, vlm_autoquant.tracking as t\n"
        "t.tracker_in_child = lambda: True\n"
        "from vlm_autoquant import api\n"
        f"done = api.quantize({str(demo[0])!r}, output_dir='out', calib_file={str(demo[1])!r},\n"
        f"                    **{QUICK_KW!r})\n"
        "print(done.run_id, done.experiment)\n"
        "print(sorted(m for m in ('mlflow', 'matplotlib', 'sqlalchemy', 'alembic') if m in sys.modules))\n"
    )
    proc = subprocess.run(
        [PY, "-c", script],
        cwd=tmp_path,
        env=subprocess_env(MLFLOW_TRACKING_URI=tracking),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_line, imported = proc.stdout.strip().splitlines()[-2:]
    assert imported == "[]"
    run_id, experiment = run_line.split()
    client = store(tmp_path / "mlruns")[1]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert "sensitivity.png" in {f.path for f in client.list_artifacts(run_id)}  # drawn in the child


def test_a_child_run_beside_a_free_core_is_tracked_in_a_child_process_under_its_parent(
    tracking, tmp_path, tracker_child
):
    import mlflow

    from vlm_autoquant.tracking import RemoteTracker, tracked_run

    with tracked_run("e", "parent") as parent:
        with tracked_run("e", "child", parent, out_dir=tmp_path / "child") as child:
            assert isinstance(child, RemoteTracker)
            child.log_metrics({"m": 2.0})
    client = mlflow.MlflowClient()
    run, top = client.get_run(child.run_id), client.get_run(parent.run_id)
    assert run.data.tags["mlflow.parentRunId"] == top.info.run_id
    assert run.info.experiment_id == top.info.experiment_id
    assert run.data.metrics["m"] == 2.0 and run.info.status == top.info.status == "FINISHED"
    assert (tmp_path / "child" / RUN_ID_FILE).read_text().split()[0] == run.info.run_id
    assert child._proc.returncode == 0  # the child process ended with its run


def test_the_child_trackers_errors_and_its_death_arrive_here_as_tracking_failed(tracking, tmp_path):
    import json

    import mlflow

    from vlm_autoquant.tracking import RemoteTracker, TrackingFailed, close_stale

    out = tmp_path / "out"
    tracker = RemoteTracker("e", "r", out_dir=out)
    with pytest.raises(TrackingFailed, match="TypeError"):
        tracker.log_with(json.loads)  # json.loads(tracker) fails in the child
    tracker.log_metrics({"m": 1.0})  # the child still serves after an error
    run_id = tracker.run_id
    tracker._proc.kill()
    tracker._proc.wait()
    with pytest.raises(TrackingFailed, match="ended unexpectedly"):
        tracker.log_metrics({"m": 2.0})
    client = mlflow.MlflowClient()
    assert client.get_run(run_id).info.status == "RUNNING"  # left for close_stale, as in-process
    close_stale(out).join()
    assert client.get_run(run_id).info.status == "KILLED"
    assert client.get_run(run_id).data.metrics["m"] == 1.0


def test_a_tracker_process_that_died_before_the_report_still_leaves_the_log_only_command(tracking, tmp_path):
    from types import SimpleNamespace

    from vlm_autoquant.run import pipeline
    from vlm_autoquant.tracking import RemoteTracker, TrackingFailed

    out = tmp_path / "out"
    tracker = RemoteTracker("e", "r", out_dir=out)
    tracker.wait()
    tracker._proc.kill()
    tracker._proc.wait()
    family = SimpleNamespace(data=SimpleNamespace(split=SimpleNamespace(calib=["a cat"], eval=None)))
    inputs = SimpleNamespace(calib_path=tmp_path / "captions.txt")
    with pytest.raises(TrackingFailed) as err:
        pipeline.log_finished(tracker, None, out, family, inputs)
    assert "ended unexpectedly" in str(err.value)
    assert f"--log-only --output-dir {out} --experiment e" in str(err.value)


@pytest.mark.parametrize(
    "exc,status", [(None, "FINISHED"), (KeyboardInterrupt(), "KILLED"), (RuntimeError("x"), "FAILED")]
)
def test_a_run_tracked_in_a_child_process_ends_finished_killed_or_failed(
    tmp_path, tracking, tracker_child, exc, status
):
    import mlflow

    from vlm_autoquant.tracking import RemoteTracker, ended_here, tracked_run

    out = tmp_path / "out"
    with pytest.raises(type(exc)) if exc else _nothing():
        with tracked_run("e", "r", out_dir=out, separate=True) as tracker:
            assert isinstance(tracker, RemoteTracker)
            tracker.log_metrics({"m": 1.0})
            if exc:
                raise exc
    run = mlflow.MlflowClient().get_run(tracker.run_id)
    assert run.info.status == status and run.data.metrics["m"] == 1.0
    assert ended_here(out)  # the output dir's record needs no closing by a later run
    assert tracker._proc.poll() == 0  # the child exited once the run ended


def test_when_no_tracker_process_can_start_the_run_is_tracked_from_this_one(
    tmp_path, tracking, tracker_child, monkeypatch
):
    import mlflow

    from vlm_autoquant import tracking as trk

    def no_process(*args, **kwargs):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(trk.subprocess, "Popen", no_process)
    with trk.tracked_run("e", "r", out_dir=tmp_path / "out", separate=True) as tracker:
        assert not isinstance(tracker, trk.RemoteTracker)
        tracker.log_metrics({"m": 3.0})
    assert mlflow.MlflowClient().get_run(tracker.run_id).data.metrics["m"] == 3.0


def test_only_a_run_that_draws_imports_the_report_modules_beside_the_main_thread(tmp_path, monkeypatch):
    """A scheme's run pre-imports matplotlib and datasets once it exists; an export's run, which
    draws nothing and logs no captions, does not spend the interpreter lock on them."""
    from vlm_autoquant import api, tracking

    uri, _ = store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    calls: list[str] = []
    monkeypatch.setattr(tracking, "_prewarm_report_imports", lambda: calls.append("prewarmed"))
    export = api._export_tracker_factory("e")("export", tmp_path / "export")
    export.wait().end()
    assert calls == []
    scheme = tracking.Tracker("e", "scheme", out_dir=tmp_path / "scheme")
    scheme._thread.join()  # the pre-import runs in the run's start thread, after the run exists
    scheme.wait().end()
    assert calls == ["prewarmed"]
