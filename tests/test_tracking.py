"""tracking.py: runs end in one place, a tracking failure never costs the result, stale runs close."""

from __future__ import annotations

import http.server
import json
import subprocess
import threading

import pytest

from vlm_autoquant.core.artifacts import MANIFEST_FILE, RUN_ID_FILE

from .conftest import PY, QUICK, SCRIPT, run_cli, subprocess_env


def store(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return uri, mlflow.MlflowClient(tracking_uri=uri)


@pytest.mark.parametrize("exc,status", [(None, "FINISHED"), (RuntimeError("boom"), "FAILED"),
                                        (KeyboardInterrupt(), "KILLED")])
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
    assert (out / RUN_ID_FILE).read_text().strip() == tracker.run_id
    if exc:
        assert type(exc).__name__ in run.data.tags["failure_reason"]


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def test_a_run_left_running_by_a_killed_process_is_closed_as_killed(tmp_path, monkeypatch):
    from vlm_autoquant.tracking import close_stale

    uri, client = store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    exp = client.create_experiment("e")
    stale = client.create_run(exp).info.run_id  # RUNNING, as a SIGKILLed process leaves it
    (tmp_path / RUN_ID_FILE).write_text(stale + "\n")
    close_stale(tmp_path).join()  # in the background: mlflow is imported off the main thread
    run = client.get_run(stale)
    assert run.info.status == "KILLED" and "killed" in run.data.tags["failure_reason"]
    close_stale(tmp_path).join()  # a finished run is left as it is
    assert client.get_run(stale).info.status == "KILLED"


def test_the_next_run_in_that_dir_waits_for_the_stale_run_to_close(tmp_path, monkeypatch):
    """close_stale returns at once; the run that replaces the recorded id closes the old first."""
    from vlm_autoquant.tracking import close_stale, tracked_run

    uri, client = store(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    stale = client.create_run(client.create_experiment("e")).info.run_id
    (tmp_path / RUN_ID_FILE).write_text(stale + "\n")
    close_stale(tmp_path)
    with tracked_run("e", "r", out_dir=tmp_path) as tracker:
        tracker.wait()
        assert client.get_run(stale).info.status == "KILLED"
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == tracker.run_id != stale
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
    """Healthy at /health, 500 on every API call: a server that breaks after the check."""

    def _answer(self):
        ok = self.path.rstrip("/") == "/health"
        self.send_response(200 if ok else 500)
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"{}")

    do_GET = do_POST = do_PATCH = _answer

    def log_message(self, *a):
        pass


def test_tracking_failure_keeps_the_result_and_log_only_logs_it_later(demo, tmp_path, monkeypatch,
                                                                     capsys, caplog):
    """The failing run goes through the CLI in-process (against a live server that fails every
    API call); --log-only then runs as the script, in a subprocess, into a working store."""
    import logging

    caplog.set_level(logging.INFO)  # what the script shows on stderr
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api500)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "out"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        code = run_cli(["--scheme-name", "fp8-balanced-10b", "--model-dir", demo[0],
                        "--calib-file", demo[1], "--output-dir", out, *QUICK])
    finally:
        server.shutdown()
    err = capsys.readouterr().err + caplog.text
    assert code == 1, err[-3000:]
    assert "safe on disk" in err and "--log-only" in err
    assert "Traceback" not in err
    doc = json.loads((out / MANIFEST_FILE).read_text())  # the whole result is there
    uri, client = store(tmp_path)
    later = subprocess.run([PY, str(SCRIPT), "--log-only", "--output-dir", str(out)],
                           capture_output=True, text=True, cwd=tmp_path, timeout=300,
                           env=subprocess_env(MLFLOW_TRACKING_URI=uri))
    assert later.returncode == 0, later.stderr[-3000:]
    assert "Traceback" not in later.stderr
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.metrics["effective_bits/achieved"] == doc["effective_bits"]["achieved"]
    assert runs[0].data.tags["logged_later_from"] == str(out.resolve())
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} >= {MANIFEST_FILE}


def test_two_processes_start_runs_on_one_fresh_sqlite_store(tmp_path):
    """The store's first-time schema creation is serialised: both processes get their run."""
    code = ("import sys\nfrom vlm_autoquant.tracking import tracked_run\n"
            "with tracked_run('e', sys.argv[1]) as t:\n    t.log_metrics({'m': 1.0})\n")
    uri, client = store(tmp_path)
    procs = [subprocess.Popen([PY, "-c", code, f"r{i}"], cwd=tmp_path, text=True,
                              stderr=subprocess.PIPE, env=subprocess_env(MLFLOW_TRACKING_URI=uri))
             for i in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    runs = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert sorted(r.data.tags["mlflow.runName"] for r in runs) == ["r0", "r1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
