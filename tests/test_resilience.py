"""Resilience: interruption and resume, atomic writes under injected failures, disk full, and the
MLflow run status after each of them.

- SIGINT while ModelOpt scores: exit 130, the calibrated search checkpoint is kept (and verified
  by its sha256 record), no manifest, no temporary files, the MLflow run is KILLED. A rerun
  restores the calibration and only scores; a third run with --overwrite restores both.
- SIGTERM while calibrating: exit 130, the MLflow run is KILLED, nothing partial is left.
- A failure injected between a temporary write and its rename (artifacts._before_rename) keeps
  the previous file byte-for-byte and removes the temporary file; the MLflow run is FAILED.
- Disk full (RLIMIT_FSIZE in the child, so writes past N bytes fail with EFBIG): exit 1 with a
  "no space" message naming the file and a fix, no traceback, no partial artifacts, the MLflow
  run FAILED (never RUNNING).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from vlm_autoquant.core import artifacts
from vlm_autoquant.core.artifacts import (
    LAYERS_FILE,
    MANIFEST_FILE,
    QUANT_STATE_FILE,
    SCHEME_FILE,
    SEARCH_CHECKPOINT,
    SEARCH_DIR,
    SEARCH_RECORD,
    sha256_file,
)
from vlm_autoquant.core.errors import RunFailed

from .conftest import PY, QUICK, SCRIPT, run_cli, subprocess_env
from .forked import popen_script

SCHEME = "fp8-balanced-10b"
# Enough scoring work (6 batches of 8x128, about 1-2 s each on 2 CPU cores) that a signal sent
# when scoring starts (its INFO line) reliably lands before scoring ends.
SCORING_HEAVY = [
    "--num-calib-samples",
    "1024",
    "--num-calib-steps",
    "2",
    "--num-score-steps",
    "6",
    "--num-eval-samples",
    "64",
    "--seq-len",
    "128",
    "--batch-size",
    "8",
]
SCORING_BAR = "score: started"
CALIB_BAR = "calibrate: started"
WATCHDOG_S = 240  # a hung child is killed (and the test fails) rather than hanging the suite


# ----------------------------------------------------------------------------- helpers


def script_cmd(demo, out: Path, *extra: str, args=SCORING_HEAVY) -> list[str]:
    return [
        PY,
        str(SCRIPT),
        "--scheme-name",
        SCHEME,
        "--model-dir",
        str(demo[0]),
        "--output-dir",
        str(out),
        "--calib-file",
        str(demo[1]),
        *args,
        *extra,
    ]


def run_script(
    cmd: list[str],
    env: dict,
    cwd: Path,
    trigger: str | None = None,
    sig: signal.Signals = signal.SIGINT,
    preexec_fn=None,
) -> tuple[int, str, bool]:
    """Run the script in its own process (forked from this warm one: tests/forked.py), reading
    stderr line by line; send `sig` once a line contains `trigger`.

    Returns (exit code, stderr, whether the signal was sent). Text mode turns tqdm's carriage
    returns into line ends, so each progress update arrives as its own line.
    """
    proc = popen_script(cmd, env, cwd, preexec_fn)
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        proc.kill()

    watchdog = threading.Timer(WATCHDOG_S, kill)
    watchdog.start()
    lines, sent = [], False
    try:
        for line in proc.stderr:
            lines.append(line)
            if trigger is not None and not sent and trigger in line:
                proc.send_signal(sig)
                sent = True
        rc = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = "".join(lines)
    assert not fired.is_set(), f"the script ran past {WATCHDOG_S} s and was killed:\n{stderr[-3000:]}"
    return rc, stderr, sent


def run_in_process(args: list[str], uri: str, cwd: Path) -> tuple[int, str]:
    """conftest.run_cli with its own store and cwd; returns (exit code, stderr and INFO log).

    Under pytest the root logger already has handlers, so the CLI's logging.basicConfig adds no
    stderr handler: the log lines are collected by a handler of our own."""
    import contextlib
    import io
    import logging

    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(buf):
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            for leftover in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
                mp.delenv(leftover, raising=False)  # also removes what MLflow sets during the run
            mp.chdir(cwd)
            rc = run_cli(args)
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(level)
    return rc, buf.getvalue()


def leftovers(root: Path) -> list[str]:
    """Temporary files of atomic writes: `.<name>.XXXX.tmp` (artifacts) and `<name>.tmp-<pid>`
    (the search checkpoint)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name)


def files_under(root: Path) -> set[str]:
    """Files under `root`, less our bookkeeping: lock, ownership marker, run id (artifacts.py)."""
    bookkeeping = {artifacts.LOCK_FILE, artifacts.MARKER_FILE, artifacts.RUN_ID_FILE}
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in bookkeeping}


def mlflow_runs(uri: str) -> list:
    """Every run in the store, oldest first."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], order_by=["attributes.start_time ASC"]
    )
    return sorted(runs, key=lambda r: r.info.start_time)


def checkpoint_state(out: Path) -> dict:
    ckpt = out / SEARCH_DIR / SEARCH_CHECKPOINT
    record = out / SEARCH_DIR / SEARCH_RECORD
    return {
        "exists": ckpt.is_file(),
        "record_exists": record.is_file(),
        "record": json.loads(record.read_text()) if record.is_file() else None,
        "sha256": sha256_file(ckpt) if ckpt.is_file() else None,
    }


def skip_unless_posix_limits() -> None:
    if not hasattr(signal, "SIGXFSZ") or not hasattr(resource, "RLIMIT_FSIZE"):
        pytest.skip("needs POSIX RLIMIT_FSIZE and SIGXFSZ to simulate a full disk")


def file_size_limit(n: int):
    """preexec_fn: writes past `n` bytes of any file fail with EFBIG (SIGXFSZ ignored)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))

    return limit


# ---------------------------------------------------- SIGINT while scoring, then resume twice


@pytest.fixture(scope="module")
def interrupted(demo, tmp_path_factory) -> dict:
    """SIGINT during scoring (the script, in its own process), then a rerun and a rerun with
    --overwrite (the CLI in-process); a snapshot after each step.

    Snapshots are taken right after each step because the later steps change the same
    --output-dir and MLflow store.
    """
    root = tmp_path_factory.mktemp("sigint")
    out = root / "out"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    result: dict = {"out": out, "uri": uri, "root": root}

    rc, err, sent = run_script(script_cmd(demo, out), env, root, trigger=SCORING_BAR, sig=signal.SIGINT)
    result["stop"] = {
        "rc": rc,
        "stderr": err,
        "sent": sent,
        "files": files_under(out),
        "leftovers": leftovers(out),
        "manifest": (out / MANIFEST_FILE).exists(),
        "checkpoint": checkpoint_state(out),
        "runs": mlflow_runs(uri),
    }

    # The reruns go through the same entry point in-process (the stop above is the process
    # that exit codes and signals need); the rerun with the same command resumes.
    rc, err = run_in_process(script_cmd(demo, out)[2:], uri, root)
    result["resume"] = {
        "rc": rc,
        "stderr": err,
        "leftovers": leftovers(out),
        "checkpoint": checkpoint_state(out),
        "manifest": json.loads((out / MANIFEST_FILE).read_text()) if (out / MANIFEST_FILE).exists() else None,
    }

    rc, err = run_in_process(script_cmd(demo, out, "--overwrite")[2:], uri, root)
    result["overwrite"] = {
        "rc": rc,
        "stderr": err,
        "leftovers": leftovers(out),
        "checkpoint": checkpoint_state(out),
        "manifest": json.loads((out / MANIFEST_FILE).read_text()) if (out / MANIFEST_FILE).exists() else None,
    }
    result["runs"] = mlflow_runs(uri)
    return result


@pytest.mark.slow
def test_sigint_during_scoring_exits_130_with_resume_hint(interrupted):
    s = interrupted["stop"]
    assert s["sent"], "scoring never started:\n" + s["stderr"][-3000:]
    assert s["rc"] == 130, s["stderr"][-3000:]
    err = s["stderr"]
    assert "SIGINT received: stopping at the next batch or phase" in err
    assert "stopped (stopped by SIGINT)" in err
    assert "rerun the same command to resume" in err
    assert "Traceback" not in err
    # scoring was cut short: the search never reached the solver
    assert "scores ran, formats" not in err


@pytest.mark.slow
def test_sigint_keeps_verified_calibrated_checkpoint_and_nothing_partial(interrupted):
    s = interrupted["stop"]
    assert s["rc"] == 130
    assert not s["manifest"], "a manifest marks a finished run; the run was stopped"
    assert s["leftovers"] == [], s["leftovers"]
    ck = s["checkpoint"]
    assert ck["exists"] and ck["record_exists"], s["files"]
    assert ck["record"]["stage"] == "calibrated"
    assert ck["record"]["sha256"] == ck["sha256"]
    assert ck["record"]["written_by"] == "vlm_autoquant"
    # nothing but the search checkpoint and its record: no state, yaml, csv or figure
    assert s["files"] == {f"{SEARCH_DIR}/{SEARCH_CHECKPOINT}", f"{SEARCH_DIR}/{SEARCH_RECORD}"}


@pytest.mark.slow
def test_sigint_marks_mlflow_run_killed(interrupted):
    runs = interrupted["stop"]["runs"]
    assert len(runs) == 1
    assert runs[0].info.status == "KILLED"
    reason = runs[0].data.tags.get("failure_reason", "")
    assert "SIGINT" in reason and "Interrupted" in reason, reason


@pytest.mark.slow
def test_rerun_after_sigint_restores_calibration_and_scores(interrupted):
    r = interrupted["resume"]
    assert r["rc"] == 0, r["stderr"][-3000:]
    assert "resuming: calibrated search checkpoint" in r["stderr"]
    assert ": calibration restored, scores ran" in r["stderr"]
    assert CALIB_BAR not in r["stderr"]  # the calibration forward passes did not run again
    assert SCORING_BAR in r["stderr"]
    m = r["manifest"]
    assert m is not None
    assert m["search"]["calibration"] == "restored"
    assert m["search"]["scores"] == "ran"
    assert m["search"]["resumed_from"] == "calibrated"
    ck = r["checkpoint"]
    assert ck["record"]["stage"] == "scored" and ck["record"]["sha256"] == ck["sha256"]
    assert m["search"]["checkpoint_sha256"] == ck["sha256"]
    assert r["leftovers"] == []


@pytest.mark.slow
def test_overwrite_rerun_restores_calibration_and_scores(interrupted):
    o, r = interrupted["overwrite"], interrupted["resume"]
    assert o["rc"] == 0, o["stderr"][-3000:]
    m = o["manifest"]
    assert m["search"]["calibration"] == "restored"
    assert m["search"]["scores"] == "restored"
    assert m["search"]["resumed_from"] == "scored"
    assert SCORING_BAR not in o["stderr"]  # no scoring redone
    assert CALIB_BAR not in o["stderr"]
    assert ": calibration restored, scores restored" in o["stderr"]
    # the checkpoint was reused as it was, not rewritten
    assert o["checkpoint"]["sha256"] == r["checkpoint"]["sha256"]
    assert m["search"]["checkpoint_sha256"] == r["manifest"]["search"]["checkpoint_sha256"]
    assert o["leftovers"] == []


@pytest.mark.slow
def test_mlflow_runs_after_interrupt_and_resumes_never_stay_running(interrupted):
    statuses = [r.info.status for r in interrupted["runs"]]
    assert statuses == ["KILLED", "FINISHED", "FINISHED"], statuses


# ------------------------------------------------------------------ SIGTERM while calibrating


@pytest.mark.slow
def test_sigterm_during_calibration_exits_130_and_marks_run_killed(demo, tmp_path):
    out = tmp_path / "out"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [*SCORING_HEAVY]
    args[args.index("--num-calib-steps") + 1] = (
        "12"  # room to stop inside calibration, even on a busy machine
    )
    rc, err, sent = run_script(
        script_cmd(demo, out, args=args),
        subprocess_env(MLFLOW_TRACKING_URI=uri),
        tmp_path,
        trigger=CALIB_BAR,
        sig=signal.SIGTERM,
    )
    assert sent, "calibration never started:\n" + err[-3000:]
    assert rc == 130, err[-3000:]
    assert "SIGTERM received" in err and "stopped (stopped by SIGTERM)" in err
    assert "rerun the same command to resume" in err
    assert "Traceback" not in err
    assert SCORING_BAR not in err  # stopped before scoring
    # stopped before the first checkpoint: the run's own empty output dir is removed
    assert not out.exists() or (files_under(out) == set() and leftovers(out) == []), files_under(out)
    assert not (out / MANIFEST_FILE).exists()
    runs = mlflow_runs(uri)
    assert [r.info.status for r in runs] == ["KILLED"]
    assert "SIGTERM" in runs[0].data.tags.get("failure_reason", "")


# ----------------------------------------------- atomic writes: failure between write and rename


class Injected(Exception):
    pass


def test_atomic_write_json_keeps_old_content_when_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "d" / "m.json"
    artifacts.write_json(target, {"v": 1})
    old = target.read_bytes()
    seen = {}

    def boom(tmp: Path, tgt: Path) -> None:
        seen.update(tmp=tmp, target=tgt, content=json.loads(tmp.read_text()))
        raise Injected("between write and rename")

    monkeypatch.setattr(artifacts, "_before_rename", boom)
    with pytest.raises(Injected):
        artifacts.write_json(target, {"v": 2})
    assert seen["target"] == target
    assert seen["tmp"].parent == target.parent  # same directory: the rename is atomic
    assert seen["content"] == {"v": 2}  # the temporary file was complete before the rename
    assert target.read_bytes() == old
    assert not seen["tmp"].exists()
    assert os.listdir(target.parent) == ["m.json"]


def test_atomic_path_new_target_not_created_when_rename_fails(tmp_path, monkeypatch):
    target = tmp_path / "new.bin"
    monkeypatch.setattr(
        artifacts,
        "_before_rename",
        lambda tmp, tgt: (_ for _ in ()).throw(OSError(errno.EIO, "injected I/O error")),
    )
    with pytest.raises(OSError, match="injected I/O error"):
        with artifacts.atomic_path(target) as tmp:
            tmp.write_bytes(b"x" * 1000)
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_write_with_failing_writer_leaves_old_file(tmp_path):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old complete file")

    def half_then_fail(f) -> None:
        f.write(b"partial" * 100)
        f.flush()
        raise Injected("writer died half-way")

    with pytest.raises(Injected):
        artifacts.write_with(target, half_then_fail)
    assert target.read_bytes() == b"old complete file"
    assert os.listdir(tmp_path) == ["state.pt"]


FILE_TOO_LARGE = """
import resource, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from vlm_autoquant.core import artifacts
from vlm_autoquant.core.errors import RunFailed
from vlm_autoquant.search import resume
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # "File too large" past 1 MiB
big = {"x": torch.zeros(1 << 20)}
out = Path(sys.argv[1])


def weights():  # quant_state.save_weights' write
    with artifacts.atomic_path(out / "lm_weights.safetensors") as tmp:
        save_file(big, str(tmp))


writes = {
    "torch.save (quantized_state.pt)": lambda: artifacts.write_with(
        out / "quantized_state.pt", lambda f: torch.save(big, f)),
    "safetensors (lm_weights)": weights,
    "search checkpoint": lambda: resume.save_with_record(
        out / "search" / "s.pth", {}, "calibrated", lambda tmp: torch.save(big, tmp)),
}
for name, write in writes.items():
    try:
        write()
        print(name, "WROTE")
    except RunFailed as exc:
        print(name, "FULL" if "no space left" in str(exc) else "OTHER: " + str(exc))
    except Exception as exc:
        print(name, "RAW", type(exc).__name__, exc)
"""


def test_file_too_large_is_a_full_disk_for_every_writer_of_quantize(tmp_path):
    """RLIMIT_FSIZE: torch's C++ writer and safetensors' Rust writer report "File too large"
    without an errno; each is still told as a full disk, with the fix."""
    proc = subprocess.run(
        [PY, "-c", FILE_TOO_LARGE, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=subprocess_env(),
    )
    lines = [x for x in proc.stdout.splitlines() if x]
    assert len(lines) == 3 and all(x.endswith("FULL") for x in lines), proc.stdout + proc.stderr[-2000:]
    assert not [p for p in tmp_path.rglob("*") if p.is_file()], "a partial file was left"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EFBIG])
def test_atomic_write_disk_full_becomes_clear_run_failed(tmp_path, monkeypatch, code):
    target = tmp_path / "layers.csv"
    artifacts.write_text(target, "old\n")

    def full(tmp: Path, tgt: Path) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(artifacts, "_before_rename", full)
    with pytest.raises(RunFailed) as info:
        artifacts.write_text(target, "new\n")
    msg = str(info.value)
    assert "no space left to write" in msg and str(target) in msg
    assert "--output-dir" in msg and "free disk space" in msg
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["layers.csv"]


def _base_args(demo, out: Path) -> list:
    return [
        "--scheme-name",
        SCHEME,
        "--model-dir",
        demo[0],
        "--output-dir",
        out,
        "--calib-file",
        demo[1],
        *QUICK,
    ]


def test_injected_failure_before_manifest_rename_keeps_previous_run(
    demo, tmp_path, tracking, monkeypatch, capsys
):
    out = tmp_path / "o"
    assert run_cli(_base_args(demo, out)) == 0
    before = (out / MANIFEST_FILE).read_bytes()
    renamed: list[str] = []

    def fail_manifest(tmp: Path, target: Path) -> None:
        renamed.append(target.name)
        if target.name == MANIFEST_FILE:
            raise OSError(errno.EIO, "injected I/O error before the manifest rename")

    monkeypatch.setattr(artifacts, "_before_rename", fail_manifest)
    capsys.readouterr()
    rc = run_cli([*_base_args(demo, out), "--overwrite"])
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    assert "injected I/O error before the manifest rename" in err
    assert "Traceback" not in err
    # the failure really came last: the other artifacts were written before the manifest
    assert renamed[-1] == MANIFEST_FILE
    assert {QUANT_STATE_FILE, SCHEME_FILE, LAYERS_FILE} <= set(renamed)
    assert (out / MANIFEST_FILE).read_bytes() == before
    assert leftovers(out) == []
    runs = mlflow_runs(tracking)
    assert [r.info.status for r in runs] == ["FINISHED", "FAILED"]
    reason = runs[1].data.tags.get("failure_reason", "")
    assert "OSError" in reason and "injected I/O error" in reason, reason


# ---------------------------------------------------------------- MLflow run after a failure


def test_failure_in_evaluation_marks_mlflow_run_failed(demo, tmp_path, tracking, monkeypatch, capsys):
    from vlm_autoquant.run import pipeline

    def broken(*a, **k):
        raise RuntimeError("injected evaluation failure")

    monkeypatch.setattr(pipeline.quality, "evaluate", broken)
    out = tmp_path / "o"
    rc = run_cli(_base_args(demo, out))
    err = capsys.readouterr().err
    assert rc == 1, err[-3000:]
    assert "error: RuntimeError: injected evaluation failure" in err
    assert "--debug" in err and "Traceback" not in err
    assert not (out / MANIFEST_FILE).exists()
    assert not out.exists() or leftovers(out) == []
    runs = mlflow_runs(tracking)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert runs[0].data.tags.get("failure_reason") == "RuntimeError: injected evaluation failure"


# -------------------------------------------------------------------------------- disk full
#
# RLIMIT_FSIZE makes every write past N bytes of *any* file fail with EFBIG, the same path
# through the code as ENOSPC. MLflow's SQLite store cannot work under it: the database is
# ~1 MB after MLflow creates its tables, and SQLite rewrites pages past any small N. So these
# runs track into MLflow's file store (MLFLOW_ALLOW_FILE_STORE=true), whose files (meta.yaml,
# one small file per tag) all stay far below N: the MLflow run is still made and ended, and
# the only write that fails is the one the test aims at.

DISK_LIMIT = 30_000  # bytes: scheme.yaml, the manifest (~16 KB) and MLflow files fit;
#                      quantized_state.pt (~40 KB) and the search checkpoint (~80 KB) do not


def _file_store(tmp_path: Path, monkeypatch) -> tuple[str, dict]:
    uri = (tmp_path / "mlruns_files").as_uri()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the queries in this process
    return uri, subprocess_env(MLFLOW_TRACKING_URI=uri, MLFLOW_ALLOW_FILE_STORE="true")


def _assert_clean_disk_full_failure(rc: int, err: str, out: Path, uri: str, filename: str):
    assert rc == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "no space left to write" in err and filename in err, err[-1500:]
    assert "free disk space" in err or "--output-dir" in err  # how to fix it
    assert not out.exists() or leftovers(out) == [], leftovers(out)
    assert not (out / MANIFEST_FILE).exists()
    assert not (out / QUANT_STATE_FILE).exists()  # no truncated state
    runs = mlflow_runs(uri)
    assert len(runs) == 1, [r.info.status for r in runs]
    assert runs[0].info.status == "FAILED"
    assert "no space left" in runs[0].data.tags.get("failure_reason", "")


@pytest.mark.slow
def test_disk_full_writing_quantized_state(demo, interrupted, tmp_path, monkeypatch):
    """The search is restored from a finished checkpoint (same settings), so the first large
    write is quantized_state.pt, which the limit cuts off."""
    skip_unless_posix_limits()
    out = tmp_path / "out"
    shutil.copytree(interrupted["out"] / SEARCH_DIR, out / SEARCH_DIR)
    shutil.copy(interrupted["out"] / artifacts.MARKER_FILE, out)  # a dir of ours
    ckpt_sha = sha256_file(out / SEARCH_DIR / SEARCH_CHECKPOINT)
    uri, env = _file_store(tmp_path, monkeypatch)
    rc, err, _ = run_script(script_cmd(demo, out), env, tmp_path, preexec_fn=file_size_limit(DISK_LIMIT))
    assert "scores restored" in err, err[-3000:]  # the limit hit the save
    _assert_clean_disk_full_failure(rc, err, out, uri, QUANT_STATE_FILE)
    # nothing else was written, and the search checkpoint is untouched and still verifiable
    assert files_under(out) == {f"{SEARCH_DIR}/{SEARCH_CHECKPOINT}", f"{SEARCH_DIR}/{SEARCH_RECORD}"}
    assert sha256_file(out / SEARCH_DIR / SEARCH_CHECKPOINT) == ckpt_sha
    assert json.loads((out / SEARCH_DIR / SEARCH_RECORD).read_text())["sha256"] == ckpt_sha


@pytest.mark.slow
def test_disk_full_writing_search_checkpoint(demo, tmp_path, monkeypatch):
    """A fresh --output-dir: the first large write is ModelOpt's calibrated search checkpoint.

    ModelOpt writes it with torch.save(path) (C++ streams), which reports a full disk as a
    RuntimeError without errno; the run must still say "no space" and name the file.
    """
    skip_unless_posix_limits()
    out = tmp_path / "out"
    uri, env = _file_store(tmp_path, monkeypatch)
    # The datasets text loader caches the caption file as Arrow; build that cache first (the
    # child shares HF_DATASETS_CACHE) so the size limit hits the search checkpoint, not the cache.
    from vlm_autoquant.plan.calib_data import load_captions

    load_captions(demo[1])
    rc, err, _ = run_script(script_cmd(demo, out), env, tmp_path, preexec_fn=file_size_limit(DISK_LIMIT))
    assert SCORING_BAR not in err  # it failed at the calibrated checkpoint, before scoring
    _assert_clean_disk_full_failure(rc, err, out, uri, SEARCH_CHECKPOINT)
    # no truncated checkpoint that a rerun could mistake for a good one
    assert not (out / SEARCH_DIR / SEARCH_CHECKPOINT).exists()
    assert not (out / SEARCH_DIR / SEARCH_RECORD).exists()
