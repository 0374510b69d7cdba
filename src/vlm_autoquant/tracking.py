"""MLflow, behind one small module. Nothing else in the package imports mlflow.

A run is a context manager (`tracked_run`) that ends FINISHED, KILLED (interrupted) or FAILED in
one place. Its start is a real write to the store; it runs in a background thread so that it
overlaps with loading and searching, and the first logging call waits for it. Importing mlflow
(~2 s) and closing a stale run also happen in that thread, never on the main one.

A scheme's run (`tracked_run(..., separate=True)`, or a sweep's child run) goes one step further
beside a free core: the whole Tracker lives in a child process (`RemoteTracker`), which imports
mlflow, starts the run, samples the system metrics and draws and logs the report, so that none of
that Python work holds the search process's interpreter lock while it launches GPU kernels.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from .core.artifacts import RUN_ID_FILE
from .core.errors import Interrupted, Problems, RunFailed
from .tracking_store import (  # noqa: F401 - the store's checks, re-exported for callers
    DEFAULT_EXPERIMENT,
    DEFAULT_URI,
    StoreBuild,
    active_experiment,
    check_store,
    child_env,
    create_store,
    ensure_store,
    has_core_to_spare,
    is_server,
    log_to_stderr,
    redact,
    schema_problem,
    shown_uri,
    sqlite_file,
    store_building,
    store_lock,
    tracking_uri,
)

log = logging.getLogger(__name__)

# Metric keys (stable; listed in the README and in --help).
M_BITS_ACHIEVED = "effective_bits/achieved"
M_BITS_TARGET = "effective_bits/target"
M_BITS_ALL = "effective_bits/all_linears"
M_LAYERS_FP8 = "layers/fp8"
M_LAYERS_BF16 = "layers/bf16"
M_KL = "quality/kl_mean"
M_PPL_REF = "quality/ppl_ref"
M_PPL_QUANT = "quality/ppl_quant"
M_PPL_REL = "quality/ppl_rel_change"
M_TOP1 = "quality/top1_agreement"
M_WEIGHT_BYTES = "size/weight_bytes"
M_WEIGHT_BYTES_BF16 = "size/weight_bytes_bf16"
M_COMPRESSION = "size/compression_ratio"
M_PADDING = "data/padding_fraction"
M_CALIB_TOKENS = "data/calib_tokens"
M_PEAK_GPU = "memory/peak_gpu_gib"
M_PEAK_RSS = "memory/peak_rss_gib"
M_PREDICTED_LOSS = "search/predicted_loss"
M_SPEARMAN = "sweep/spearman_predicted_vs_kl"
TIME_PREFIX = "time/"  # time/<phase>_s, one per phase
SENSITIVITY_PREFIX = "sensitivity/"  # sensitivity/<format>/<projection>, step = decoder layer index
FORMAT_PREFIX = "fp8/"  # fp8/<projection>: 1 if FP8 else 0, step = decoder layer index

METRICS = {
    M_BITS_ACHIEVED: "effective bits over the layers the search may quantize (cost-counted)",
    M_BITS_TARGET: "the effective-bits budget",
    M_BITS_ALL: "effective bits over all LM linears, lm_head included",
    M_LAYERS_FP8: "LM linear modules in FP8",
    M_LAYERS_BF16: "LM linear modules left in BF16",
    M_KL: "mean per-token KL(BF16 || quantized) on the held-out captions",
    M_PPL_REF: "perplexity of the BF16 LM on the held-out captions",
    M_PPL_QUANT: "perplexity of the quantized LM on the same tokens",
    M_PPL_REL: "ppl_quant / ppl_ref - 1",
    M_TOP1: "fraction of tokens whose top-1 next token matches BF16",
    M_WEIGHT_BYTES: "LM linear weight bytes after quantization (FP8 = 1 byte, BF16 = 2)",
    M_WEIGHT_BYTES_BF16: "LM linear weight bytes in BF16",
    M_COMPRESSION: "weight_bytes_bf16 / weight_bytes",
    M_PADDING: "padding tokens / all tokens in the calibration batches",
    M_CALIB_TOKENS: "real (non-padding) tokens in the calibration batches",
    M_PEAK_GPU: "peak CUDA memory allocated (GiB; 0 on CPU)",
    M_PEAK_RSS: "peak host resident memory (GiB)",
    TIME_PREFIX + "<phase>_s": "wall time per phase: startup, validate, import, load, calibrate, "
    "score, search_setup, solve, evaluate, save, log",
    SENSITIVITY_PREFIX + "<format>/<projection>": "summed sensitivity score, step = decoder layer",
    FORMAT_PREFIX + "<projection>": "1 when that layer's projection is FP8, step = decoder layer",
    M_PREDICTED_LOSS: "sum of the chosen candidates' sensitivity scores (the solver's objective)",
    M_SPEARMAN: "(sweep parent) rank correlation of predicted loss and measured KL over the "
    "schemes of the most common method; .../<method> for each method",
}

# Bounded retries against a server: a few tries within ~30 s, then give up (the result is on disk).
RETRY_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
# System metrics every 2 s (MLflow's default is 10): a sample is published only when the next
# interval ends, so a 30 s run got two points and lost the last; stop() does not wait for the
# interval (it sets an event), so a short interval costs no time at the end. Env wins.
SYSTEM_METRICS_INTERVAL_S = 2.0


class TrackingFailed(RunFailed):
    """Logging to MLflow failed after the result was written to disk."""


class TrackerGone(TrackingFailed):
    """A `RemoteTracker`'s child process ended before the run was logged."""


def check_reachable(problems: Problems, experiment: str | None = None) -> None:
    """Fail before any model is loaded when the tracking store would fail the run's logging."""
    check_store(problems, experiment)


def bounded_retries() -> None:
    """A dead server costs seconds, not MLflow's default of minutes of retries (env wins)."""
    for key, value in RETRY_ENV.items():
        os.environ.setdefault(key, value)


class Tracker:
    """One MLflow run (or a nested child), started in the background. All logging goes here."""

    def __init__(
        self,
        experiment: str | None,
        run_name: str,
        parent: "Tracker | str | None" = None,
        system_metrics: bool = False,
        out_dir: Path | None = None,
        draws: bool = True,
    ) -> None:
        """`parent`: the run this one is a child of, as a tracker or (in a RemoteTracker's
        child process) its run id. `draws`: the run will draw a figure and log captions (a
        scheme's or a sweep's, not an export's), so their imports are made beside the main
        thread once the run exists."""
        bounded_retries()
        self.name = run_name
        self._draws = draws and out_dir is not None
        self.experiment = active_experiment(experiment)  # None: MLFLOW_EXPERIMENT_ID chooses
        self._error: BaseException | None = None
        self._out_dir = out_dir  # where the run id is recorded once the run exists
        self._thread = threading.Thread(
            target=self._start,
            name="mlflow-start",
            daemon=True,
            args=(experiment, run_name, parent, system_metrics),
        )
        self._thread.start()

    def _start(
        self, experiment: str | None, run_name: str, parent: "Tracker | str | None", system_metrics: bool
    ) -> None:
        try:
            if self._out_dir is not None:
                wait_closed(self._out_dir)  # the stale run's id is read before ours replaces it
            ensure_store()
            import mlflow  # mlflow: imported on first use, off the refusal path

            self._mlflow = mlflow
            parent_id = parent.wait().run_id if isinstance(parent, Tracker) else parent
            with store_lock():
                self.run, inherited = _open_run(mlflow, experiment, run_name, parent_id)
            self.run_id = self.run.info.run_id
            self.experiment_name = mlflow.MlflowClient().get_experiment(self.run.info.experiment_id).name
            _experiment_names[self.run_id] = self.experiment_name
            if self._out_dir is not None:
                remember(self._out_dir, self.run_id)
            self._existing = dict(self.run.data.params) | inherited
            self._monitor = None
            if system_metrics:
                from mlflow.system_metrics.system_metrics_monitor import (  # mlflow: off the refusal path
                    SystemMetricsMonitor,
                )

                self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S)
                self._monitor.start()
        except BaseException as exc:  # noqa: BLE001 - reported on first use
            self._error = exc
            return
        if self._draws:
            _prewarm_report_imports()

    def wait(self) -> "Tracker":
        """Block until the run exists; raise TrackingFailed if it could not be started."""
        if threading.current_thread() is not self._thread:
            self._thread.join()
        if self._error is not None:
            db = sqlite_file(tracking_uri())
            state = schema_problem(db) if db is not None and db.is_file() else None
            hint = f". {state[0]}.\n    fix: {state[1]}" if state else ""
            raise TrackingFailed(
                f"the MLflow run could not be started at {shown_uri()} "
                f"({type(self._error).__name__}: {redact(self._error)}){hint}"
            )
        return self

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params not yet on the run; never re-log one with a different value."""
        self.wait()
        fresh = {k: str(v) for k, v in params.items() if k not in self._existing}
        for k, v in params.items():
            if k in self._existing and self._existing[k] != str(v):
                log.warning("param %s already logged as %r; keeping it (now %r)", k, self._existing[k], v)
        if fresh:
            self._mlflow.log_params(fresh, run_id=self.run_id)
            self._existing.update(fresh)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            self.wait()._mlflow.log_metrics(clean, step=step, run_id=self.run_id)

    def log_series(self, series: dict[str, list[tuple[int, float]]]) -> None:
        """Metrics with a step axis (e.g. one point per decoder layer), in batches of 1000."""
        from mlflow.entities import Metric  # mlflow: imported on first use, off the refusal path

        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, step) for k, pts in series.items() for step, v in pts]
        client = self.wait()._mlflow.MlflowClient()
        for i in range(0, len(points), 1000):
            client.log_batch(self.run_id, metrics=points[i : i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag  # mlflow: imported on first use, off the refusal path

        self.wait()._mlflow.MlflowClient().log_batch(
            self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()]
        )

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self.wait()._mlflow.MlflowClient().log_artifact(self.run_id, str(path), subdir)

    def log_table(self, rows: list[dict], name: str) -> None:
        columns = {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}
        self.wait()._mlflow.log_table(data=columns, artifact_file=name, run_id=self.run_id)

    def log_figure(self, fig, name: str) -> None:
        self.wait()._mlflow.MlflowClient().log_figure(self.run_id, fig, name)

    def log_captions(self, captions: list[str], source: Path, name: str, context: str) -> None:
        """Log a caption split as an MLflow dataset input (digest, source, context)."""
        import datasets  # datasets: imported on first use, off the refusal path
        import mlflow.data  # mlflow: off the refusal path

        ds = mlflow.data.from_huggingface(
            datasets.Dataset.from_dict({"text": captions}), path=str(source), name=name
        )
        self.wait()._mlflow.MlflowClient().log_inputs(self.run_id, datasets=[_dataset_input(ds, context)])

    def log_with(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(self, *args)`: logging code that runs wherever the tracker lives."""
        return fn(self, *args)

    def end(self, status: str = "FINISHED", reason: str | None = None) -> None:
        if self._thread.is_alive() or self._error is not None:
            self._thread.join(timeout=60)
            if self._error is not None or not hasattr(self, "run_id"):
                return
        if self._monitor is not None:
            self._monitor.finish()
        if reason:
            self.set_tags({"failure_reason": reason[:4000]})
        self._mlflow.MlflowClient().set_terminated(self.run_id, status=status)
        _ended.add(self.run_id)


def _prewarm_report_imports() -> None:
    """A scheme's run ends by drawing a figure and logging its captions as datasets: import
    matplotlib and mlflow.data here, while the main thread loads and searches, not after it."""
    try:
        import datasets  # noqa: F401 - prewarmed in a thread (log_captions; a RemoteTracker's child has none yet)
        import matplotlib.figure  # noqa: F401 - prewarmed in a thread: what run/figures.py draws with
        import matplotlib.patches  # noqa: F401 - prewarmed in a thread
        import matplotlib.ticker  # noqa: F401 - prewarmed in a thread
        import mlflow.data.huggingface_dataset  # noqa: F401 - prewarmed in a thread
    except Exception as exc:  # noqa: BLE001 - only a head start; report.py imports them again
        log.debug("could not pre-import the report's modules: %s", exc)


_SERVE = "import sys, vlm_autoquant.tracking as t; t.serve(int(sys.argv[1]))"


def tracker_in_child() -> bool:
    """Whether a scheme's tracker goes to a child process: only beside a free core, by the same
    rule as the new store's migration (`tracking_store.has_core_to_spare`)."""
    return has_core_to_spare()


class RemoteTracker:
    """A `Tracker` in a child process, with the same calls: each is sent to the child and waits
    for its answer, so errors and ordering are as in-process. Logging code that needs the
    tracker itself (figures, datasets) runs there through `log_with(fn, *args)`.

    The child ignores SIGINT (the run is ended KILLED from here); when this process dies, the
    child sees the pipe close and exits, and the run left RUNNING is closed by the next run
    into the same output dir (`close_stale`), as for an in-process tracker."""

    def __init__(
        self,
        experiment: str | None,
        run_name: str,
        system_metrics: bool = False,
        out_dir: Path | None = None,
        parent: "Tracker | RemoteTracker | None" = None,
    ) -> None:
        """`parent`: the run this one is a child of (its run id is sent to the child)."""
        parent_id = None if parent is None else parent.wait().run_id  # may raise: before the child
        self.name = run_name
        self.experiment = active_experiment(experiment)
        here, there = multiprocessing.Pipe()
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _SERVE, str(there.fileno())],
            pass_fds=(there.fileno(),),
            env=child_env(),
            stdin=subprocess.DEVNULL,
        )
        there.close()
        self._conn = here
        self._info: tuple[str, str] | None = None
        debug = logging.getLogger().getEffectiveLevel() <= logging.DEBUG
        self._call_nowait(("start", (experiment, run_name, system_metrics, out_dir, debug, parent_id)))

    def _call_nowait(self, message: tuple) -> None:
        try:
            self._conn.send(message)
        except OSError as exc:
            raise self._gone(exc) from None

    def _gone(self, exc: BaseException) -> TrackingFailed:
        return TrackerGone(
            f"the MLflow process ended unexpectedly (exit code {self._proc.poll()}, {type(exc).__name__})"
        )

    def _call(self, method: str, *args: Any) -> Any:
        if self._conn.closed:
            raise TrackingFailed("the MLflow run has ended")
        self._call_nowait((method, args))
        try:
            ok, value = self._conn.recv()
        except (EOFError, OSError) as exc:
            raise self._gone(exc) from None
        if not ok:
            raise TrackingFailed(value)
        return value

    def wait(self) -> "RemoteTracker":
        if self._info is None:
            self._info = self._call("wait")
            _experiment_names[self._info[0]] = self._info[1]
        return self

    @property
    def run_id(self) -> str:
        return self.wait()._info[0]  # type: ignore[index]

    @property
    def experiment_name(self) -> str:
        return self.wait()._info[1]  # type: ignore[index]

    def log_params(self, params: dict[str, Any]) -> None:
        self._call("log_params", params)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._call("log_metrics", metrics, step)

    def log_series(self, series: dict[str, list[tuple[int, float]]]) -> None:
        self._call("log_series", series)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._call("set_tags", tags)

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self._call("log_artifact", path, subdir)

    def log_table(self, rows: list[dict], name: str) -> None:
        self._call("log_table", rows, name)

    def log_captions(self, captions: list[str], source: Path, name: str, context: str) -> None:
        self._call("log_captions", captions, source, name, context)

    def log_with(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(tracker, *args)` in the child, with its Tracker (`fn` is pickled by name)."""
        return self._call("log_with", fn, *args)

    def end(self, status: str = "FINISHED", reason: str | None = None) -> None:
        try:
            ended = self._call("end", status, reason)
            if ended is not None:
                self._info = ended  # run_id and experiment_name stay readable after the end
                _ended.add(ended[0])
                _experiment_names[ended[0]] = ended[1]
        finally:
            self._conn.close()
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()


def serve(fd: int) -> None:
    """The child of a `RemoteTracker`: one Tracker, answering its parent's calls in order."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent ends the run KILLED on Ctrl-C
    conn = multiprocessing.connection.Connection(fd)
    _, (experiment, run_name, system_metrics, out_dir, debug, parent_id) = conn.recv()
    log_to_stderr(debug)  # the parent's format and warnings, on the stderr they share
    if out_dir is not None:
        close_stale(out_dir)  # read before this run's id replaces it; the Tracker waits for it
    tracker = Tracker(experiment, run_name, parent_id, system_metrics, out_dir)
    while True:
        try:
            method, args = conn.recv()
        except EOFError:
            return  # the parent is gone; its run is closed by the next run into its output dir
        try:
            if method == "wait":
                tracker.wait()
                value: Any = (tracker.run_id, tracker.experiment_name)
            elif method == "end":
                tracker.end(*args)
                run_id = getattr(tracker, "run_id", None)
                value = None if run_id is None else (run_id, tracker.experiment_name)
            else:
                value = getattr(tracker, method)(*args)
            reply = (True, value)
        except BaseException as exc:  # noqa: BLE001 - sent to the parent, raised there
            reply = (
                False,
                str(exc) if isinstance(exc, TrackingFailed) else f"{type(exc).__name__}: {redact(exc)}",
            )
        conn.send(reply)
        if method == "end":
            return


def experiment_id(mlflow, experiment: str | None) -> str:
    """The experiment a run goes to (created if absent): `experiment` (--experiment), else
    MLFLOW_EXPERIMENT_NAME, else MLFLOW_EXPERIMENT_ID unless it is "0", else DEFAULT_EXPERIMENT.
    "0" is MLflow's "Default", which `mlflow run` passes when it was given no experiment."""
    env_id = os.environ.get("MLFLOW_EXPERIMENT_ID", "")
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name is None and env_id not in ("", "0"):
        return env_id
    name = name or DEFAULT_EXPERIMENT
    found = mlflow.get_experiment_by_name(name)
    return found.experiment_id if found else mlflow.create_experiment(name)


def _launcher_run(client) -> Any:
    """The RUNNING run `mlflow run` made for this process (MLFLOW_RUN_ID), else None."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return None
    run = client.get_run(run_id)
    return run if run.info.status == "RUNNING" else None


def _open_run(
    mlflow, experiment: str | None, run_name: str, parent_id: str | None
) -> tuple[Any, dict[str, str]]:
    """(run, params it already has). A child goes under its parent. Under `mlflow run`, the
    launcher's run is used when it is in the chosen experiment; otherwise (it put the run in
    "Default") a run is made in the chosen one and takes over the launcher's params and tags,
    and the launcher's run is left as a pointer to it."""
    client = mlflow.MlflowClient()
    if parent_id is not None:
        tags = {"mlflow.runName": run_name, "mlflow.parentRunId": parent_id}
        exp_id = client.get_run(parent_id).info.experiment_id
        return client.create_run(exp_id, tags=tags, run_name=run_name), {}
    exp_id = experiment_id(mlflow, experiment)
    launcher = _launcher_run(client)
    if launcher is not None and launcher.info.experiment_id == exp_id:
        client.set_tag(launcher.info.run_id, "mlflow.runName", run_name)
        return client.get_run(launcher.info.run_id), {}
    run = client.create_run(exp_id, tags={"mlflow.runName": run_name}, run_name=run_name)
    if launcher is None:
        return run, {}
    return run, _take_over(client, launcher, run, run_name)


def _take_over(client, launcher, run, run_name: str) -> dict[str, str]:
    """Copy the launcher's params and tags onto `run`, and turn the launcher's run into an
    ended pointer to it (`mlflow run` itself ends it again when this process exits, so it
    cannot be deleted here). Returns the params copied."""
    from mlflow.entities import Param, RunTag  # mlflow: off the refusal path

    params = dict(launcher.data.params)
    tags = {k: v for k, v in launcher.data.tags.items() if k != "mlflow.runName"}
    client.log_batch(
        run.info.run_id,
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    experiment = client.get_experiment(run.info.experiment_id).name
    note = (
        f"`mlflow run` was given no experiment; this run continued as run "
        f"{run.info.run_id} in experiment {experiment!r}. Pass `--experiment-name "
        f"{experiment}` to mlflow run to have a single run."
    )
    client.log_batch(
        launcher.info.run_id,
        tags=[
            RunTag("mlflow.runName", f"{run_name} (moved to {experiment})"),
            RunTag("continued_in_run", run.info.run_id),
            RunTag("mlflow.note.content", note),
        ],
    )
    client.set_terminated(launcher.info.run_id, status="FINISHED")
    log.info(
        "mlflow run put its run in experiment %s; logging to %r instead (run %s)",
        launcher.info.experiment_id,
        experiment,
        run.info.run_id,
    )
    return params


def _dataset_input(ds, context: str):
    from mlflow.entities import DatasetInput, InputTag  # mlflow: imported on first use, off the refusal path
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT  # mlflow: off the refusal path

    return DatasetInput(
        dataset=ds._to_mlflow_entity(), tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
    )


@contextlib.contextmanager
def tracked_run(
    experiment: str | None,
    name: str,
    parent: Tracker | None = None,
    system_metrics: bool = False,
    out_dir: Path | None = None,
    separate: bool = False,
) -> Iterator[Tracker]:
    """A run that ends FINISHED, KILLED (interrupted) or FAILED (with the reason as a tag).

    With `out_dir`, the run's id is recorded there (see `close_stale`). `separate`: a scheme's
    own run (no parent); a stale run recorded in `out_dir` is closed first. A separate run, or a
    child of `parent`, lives beside a free core in a child process (`RemoteTracker`), which does
    that closing too."""
    remote = separate or parent is not None
    tracker = _remote(experiment, name, system_metrics, out_dir, parent) if remote else None
    if tracker is None:
        if separate and out_dir is not None:
            close_stale(out_dir)
        tracker = Tracker(experiment, name, parent, system_metrics, out_dir)
    try:
        yield tracker
    except (Interrupted, KeyboardInterrupt) as exc:
        _end_quietly(tracker, "KILLED", f"{type(exc).__name__}: {exc}")
        raise
    except BaseException as exc:
        _end_quietly(tracker, "FAILED", f"{type(exc).__name__}: {exc}")
        raise
    tracker.end("FINISHED")


def _remote(
    experiment: str | None, name: str, system_metrics: bool, out_dir: Path | None, parent: Tracker | None
) -> Tracker | None:
    """A RemoteTracker beside a free core; None on fewer cores or when no process can start."""
    if not tracker_in_child():
        return None
    try:
        return RemoteTracker(experiment, name, system_metrics, out_dir, parent)  # type: ignore[return-value]
    except OSError as exc:
        log.warning("could not start the MLflow process (%s); tracking from this one", exc)
        return None


def _end_quietly(tracker: Tracker, status: str, reason: str) -> None:
    try:
        tracker.end(status, redact(reason))
    except Exception as exc:  # noqa: BLE001 - the original error matters more
        log.warning("could not mark MLflow run %s: %s", status, redact(exc))


def remember(out_dir: Path, run_id: str) -> None:
    """Record the run writing into `out_dir`, so a rerun can close it if this process is killed.

    The directory's identity (device, inode, path) is recorded beside the id: a copy of the
    directory holds the same file, and must never close the original's live run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RUN_ID_FILE).write_text(f"{run_id}\n{json.dumps(_dir_identity(out_dir))}\n", encoding="utf-8")


def _dir_identity(out_dir: Path) -> dict:
    st = os.stat(out_dir)
    return {"dir": os.path.realpath(out_dir), "dev": st.st_dev, "ino": st.st_ino}


def recorded_run(out_dir: Path) -> tuple[str, dict | None] | None:
    """(run id, the identity of the directory it was recorded in) from `out_dir`, if any."""
    try:
        lines = (out_dir / RUN_ID_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines or not lines[0].strip():
        return None
    try:
        where = json.loads(lines[1]) if len(lines) > 1 else None
    except ValueError:
        where = None
    return lines[0].strip(), where if isinstance(where, dict) else None


_closers: dict[Path, threading.Thread] = {}
_ended: set[str] = set()  # runs this process ended (any status)
_experiment_names: dict[str, str] = {}  # run id -> experiment name, for runs tracked here


def ended_here(out_dir: Path) -> bool:
    """Whether the run recorded in `out_dir` was ended by this process: its record is then
    no longer needed to close it (a run that could not be ended keeps its record for
    `close_stale`)."""
    got = recorded_run(out_dir)
    return got is None or got[0] in _ended


def close_stale(out_dir: Path) -> threading.Thread | None:
    """Mark the run a killed process left RUNNING in `out_dir` as KILLED, with a reason tag.

    Only a run recorded in this very directory (same device and inode) is closed: the record in
    a copy names the original's run, which may still be live. The run id is read now; mlflow is
    imported and the store updated in a background thread (returned; None when there is
    nothing to close). The next run started with this `out_dir` waits for it, and so does the
    interpreter's exit (not a daemon)."""
    got = recorded_run(out_dir)
    if got is None:
        return None
    run_id, where = got
    here = _dir_identity(out_dir)
    if where is None or (where.get("dev"), where.get("ino")) != (here["dev"], here["ino"]):
        log.info(
            "not closing MLflow run %s: it was recorded in %s, not in %s (a copy?)",
            run_id,
            (where or {}).get("dir", "another directory"),
            here["dir"],
        )
        return None
    thread = threading.Thread(target=_close_stale, args=(out_dir, run_id), name="mlflow-close-stale")
    _closers[Path(out_dir).resolve()] = thread
    thread.start()
    return thread


def wait_closed(out_dir: Path) -> None:
    """Block until a `close_stale(out_dir)` still under way has finished."""
    thread = _closers.pop(Path(out_dir).resolve(), None)
    if thread is not None:
        thread.join()


def _close_stale(out_dir: Path, run_id: str) -> None:
    try:
        ensure_store()
        import mlflow  # mlflow: imported on first use, off the refusal path

        client = mlflow.MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_tag(
                run_id, "failure_reason", f"the process was killed (found RUNNING by a rerun in {out_dir})"
            )
            client.set_terminated(run_id, status="KILLED")
            log.info("closed MLflow run %s, left RUNNING by a killed process, as KILLED", run_id)
    except Exception as exc:  # noqa: BLE001 - another store, or the run is gone: nothing to close
        log.debug("no stale run %s to close: %s", run_id, exc)


# --- export: reading a source run, linking runs, the Model Registry ---------------


def source_run(run_id: str) -> dict | None:
    """{status, experiment_id, tags, artifact_uri} of a run in the current store; None if absent."""
    bounded_retries()
    db = sqlite_file(tracking_uri())
    if db is not None and not db.exists():
        return None  # no store, no run (and no store made by reading one)
    import mlflow  # mlflow: imported on first use, off the refusal path
    from mlflow.exceptions import MlflowException  # mlflow: off the refusal path

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    return {
        "status": run.info.status,
        "experiment_id": run.info.experiment_id,
        "tags": dict(run.data.tags),
        "artifact_uri": run.info.artifact_uri,
    }


def download_run_files(run_id: str, names: list[str], dst: Path) -> dict[str, Path | None]:
    """Download the named artifacts of a run into `dst`; None for each one the run lacks."""
    import mlflow  # mlflow: imported on first use, off the refusal path
    from mlflow.exceptions import MlflowException  # mlflow: off the refusal path

    present = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    out: dict[str, Path | None] = {}
    for name in names:
        if name not in present:
            out[name] = None
            continue
        try:
            out[name] = Path(
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=str(dst))
            )
        except (MlflowException, OSError):
            out[name] = None
    return out


def experiment_of(run_id: str) -> str:
    """The name of the experiment holding `run_id`."""
    if run_id in _experiment_names:  # a run this process tracked: no need to import mlflow
        return _experiment_names[run_id]
    import mlflow  # mlflow: off the refusal path

    client = mlflow.MlflowClient()
    return client.get_experiment(client.get_run(run_id).info.experiment_id).name


def mark_launch_failed(experiment: str | None, run_name: str, reason: str) -> str | None:
    """Under `mlflow run`, a failure before any tracked run began (bad input): the launcher's
    run (or its successor in the chosen experiment, as `_open_run`) gets `run_name`, a
    failure_reason tag and FAILED. Returns its id; None outside `mlflow run`, when the run has
    already ended, or when the store cannot be written (the failure is reported anyway)."""
    if not os.environ.get("MLFLOW_RUN_ID"):
        return None
    try:
        import mlflow  # mlflow: off the refusal path

        client = mlflow.MlflowClient()
        with store_lock():
            if _launcher_run(client) is None:
                return None
            run, _ = _open_run(mlflow, experiment, run_name, None)
        client.set_tag(run.info.run_id, "failure_reason", reason[:4000])
        client.set_terminated(run.info.run_id, status="FAILED")
        return run.info.run_id
    except Exception as exc:  # noqa: BLE001 - the original failure is what the user must see
        log.debug("could not mark the mlflow run FAILED: %s", exc)
        return None


def tag_run(run_id: str, tags: dict[str, Any]) -> None:
    """Tags on another run (e.g. the source run of an export)."""
    import mlflow  # mlflow: imported on first use, off the refusal path

    client = mlflow.MlflowClient()
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v)[:5000])


def log_dir(tracker: Tracker, local_dir: Path, subdir: str | None = None) -> None:
    """Every file of `local_dir` as artifacts of the tracker's run."""
    tracker.wait()._mlflow.log_artifacts(str(local_dir), artifact_path=subdir, run_id=tracker.run_id)


GENERATOR_REQUIREMENTS = ("torch", "transformers", "accelerate", "compressed-tensors", "safetensors")


def _checkpoint_generator() -> Any:
    """An MLflow pyfunc that loads a checkpoint with transformers and generates text.

    Defined here so that MLflow pickles the class by value: loading it needs transformers (and
    compressed-tensors for that format), not this package.
    """
    import mlflow.pyfunc  # mlflow: off the refusal path

    class CheckpointGenerator(mlflow.pyfunc.PythonModel):
        """predict(["a prompt", ...], params={"max_new_tokens": n}) -> the generated texts."""

        # No type hints on these two: MLflow derives a model's input schema from predict's
        # hints, and this model's signature is given explicitly in _save_pyfunc.
        def load_context(self, context):
            import json  # in the serving process: the pickled class carries its own imports

            import torch  # in the serving process: the pickled class carries its own imports
            import transformers  # in the serving process: the pickled class carries its own imports

            path = context.artifacts["checkpoint"]
            with open(f"{path}/config.json", encoding="utf-8") as f:
                arch = json.load(f)["architectures"][0]
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
            self.model = (
                getattr(transformers, arch)
                .from_pretrained(path, dtype=torch.bfloat16, device_map="auto")
                .eval()
            )

        def predict(self, context, model_input, params=None):
            import torch  # in the serving process: the pickled class carries its own imports

            prompts = model_input.iloc[:, 0].tolist() if hasattr(model_input, "iloc") else list(model_input)
            new_tokens = int((params or {}).get("max_new_tokens", 32))
            texts = []
            for prompt in prompts:
                ids = self.tokenizer(prompt, return_tensors="pt").to(self.model.device)
                with torch.inference_mode():
                    out = self.model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
                texts.append(
                    self.tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
                )
            return texts

    return CheckpointGenerator()


def _save_pyfunc(local_dir: Path, target: Path) -> None:
    """An MLmodel directory in `target`: the generator pyfunc with `local_dir` as its checkpoint."""
    import mlflow.pyfunc  # mlflow: off the refusal path
    from mlflow.models import ModelSignature  # mlflow: off the refusal path
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema  # mlflow: off the refusal path

    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 32)]),
    )
    mlflow.pyfunc.save_model(
        path=str(target),
        python_model=_checkpoint_generator(),
        artifacts={"checkpoint": str(local_dir)},
        signature=signature,
        pip_requirements=[f"{p}=={metadata.version(p)}" for p in GENERATOR_REQUIREMENTS],
    )


@dataclass
class Registration:
    """How an exported checkpoint is registered (export_track.log_export fills it)."""

    name: str
    alias: str
    tags: dict[str, str]
    source_run_id: str | None  # the quantization run, when known
    metrics: dict[str, float] = field(default_factory=dict)  # attached to the model
    pyfunc: bool = True  # an MLmodel that generates text with transformers


def register_checkpoint(tracker: Tracker, local_dir: Path, reg: Registration) -> dict:
    """Log `local_dir` as an MLflow 3 LoggedModel, register it as `reg.name` with `reg.alias`,
    and attach `reg.metrics` to it. With `reg.pyfunc` the model is an MLmodel that generates
    text with transformers (a compressed-tensors checkpoint); else the folder as written
    (ModelOpt's format, which transformers cannot run).

    The model's `source_run_id` is the quantization run when known, else the export run; its
    metrics are logged on the export run with the model's id.
    """
    name, alias, tags, source_run_id, metrics, pyfunc = (
        reg.name,
        reg.alias,
        reg.tags,
        reg.source_run_id,
        reg.metrics,
        reg.pyfunc,
    )
    mlflow = tracker.wait()._mlflow
    client = mlflow.MlflowClient()
    model = client.create_logged_model(
        experiment_id=tracker.run.info.experiment_id,
        name=name,
        source_run_id=source_run_id or tracker.run_id,
        tags=tags,
        model_type="pyfunc" if pyfunc else "safetensors-checkpoint",
    )
    try:
        if pyfunc:
            with tempfile.TemporaryDirectory(prefix="vlm-mlmodel-") as tmp:
                _save_pyfunc(local_dir, Path(tmp) / "model")
                client.log_model_artifacts(model.model_id, str(Path(tmp) / "model"))
        else:
            client.log_model_artifacts(model.model_id, str(local_dir))
        for key, value in metrics.items():
            mlflow.log_metric(key, float(value), run_id=tracker.run_id, model_id=model.model_id)
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    version = mlflow.register_model(f"models:/{model.model_id}", name, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    return {
        "model_id": model.model_id,
        "name": name,
        "version": version.version,
        "alias": alias,
        "uri": f"models:/{name}@{alias}",
    }
