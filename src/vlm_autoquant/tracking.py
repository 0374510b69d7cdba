"""MLflow, behind one small class. Nothing else in the package imports mlflow."""

from __future__ import annotations

import logging
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from .errors import Problems

log = logging.getLogger(__name__)


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else MLflow's own default (sqlite:///mlflow.db, artifacts in ./mlruns)."""
    import mlflow

    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def check_reachable(problems: Problems) -> None:
    """Fail before any model is loaded when the tracking store cannot be reached."""
    uri = tracking_uri()
    fix = ("start the server, fix MLFLOW_TRACKING_URI, or unset it to use the local "
           "store (sqlite:///mlflow.db with artifacts under ./mlruns)")
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
        except Exception as exc:  # any failure means the same thing to the user
            problems.add("MLFLOW_TRACKING_URI", f"tracking server {uri} is unreachable ({exc})", fix)
    elif uri.startswith("sqlite:///"):
        folder = Path(uri[len("sqlite:///"):]).resolve().parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            problems.add("MLFLOW_TRACKING_URI", f"cannot write the SQLite store in {folder} "
                         f"({exc.strerror})", fix)


class Tracker:
    """One MLflow run (or a nested child). All logging calls go through here."""

    def __init__(self, experiment: str, run_name: str, nested: bool = False,
                 parent: "Tracker | None" = None):
        import mlflow

        self._mlflow = mlflow
        launched = bool(os.environ.get("MLFLOW_RUN_ID")) and mlflow.active_run() is None
        if parent is None and not launched:
            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or experiment)
        # Under `mlflow run`, MLFLOW_RUN_ID is set and start_run() attaches to that run (in the
        # experiment `mlflow run` chose).
        self.run = mlflow.start_run(run_name=None if launched else run_name, nested=nested)
        if launched:
            mlflow.set_tag("mlflow.runName", run_name)
        self.run_id = self.run.info.run_id
        self._existing = dict(self.run.data.params)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log params not yet on the run; never re-log one with a different value."""
        fresh = {k: str(v) for k, v in params.items() if k not in self._existing}
        for k, v in params.items():
            if k in self._existing and self._existing[k] != str(v):
                log.warning("param %s already logged as %r; keeping it (now %r)", k,
                            self._existing[k], v)
        if fresh:
            self._mlflow.log_params(fresh, run_id=self.run_id)
            self._existing.update(fresh)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        if clean:
            self._mlflow.log_metrics(clean, step=step, run_id=self.run_id)

    def log_series(self, series: dict[str, list[tuple[int, float]]]) -> None:
        """Metrics with a step axis (e.g. one point per decoder layer), in batches of 1000."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, step) for k, pts in series.items() for step, v in pts]
        client = self._mlflow.MlflowClient()
        for i in range(0, len(points), 1000):
            client.log_batch(self.run_id, metrics=points[i:i + 1000])

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self._mlflow.MlflowClient().log_batch(
            self.run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])

    def log_artifact(self, path: Path, subdir: str | None = None) -> None:
        self._mlflow.log_artifact(str(path), artifact_path=subdir, run_id=self.run_id)

    def log_table(self, rows: list[dict], name: str) -> None:
        columns = {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}
        self._mlflow.log_table(data=columns, artifact_file=name, run_id=self.run_id)

    def log_figure(self, fig, name: str) -> None:
        self._mlflow.MlflowClient().log_figure(self.run_id, fig, name)

    def end(self, status: str = "FINISHED", reason: str | None = None) -> None:
        if reason:
            self.set_tags({"failure_reason": reason})
        client = self._mlflow.MlflowClient()
        active = self._mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            self._mlflow.end_run(status=status)
        else:
            client.set_terminated(self.run_id, status=status)


# --- export (issue #9): reading a source run, linking runs, the Model Registry ---------------

def source_run(run_id: str) -> dict | None:
    """{status, experiment_id, tags, artifact_uri} of a run in the current store; None if absent."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        return None
    return {"status": run.info.status, "experiment_id": run.info.experiment_id,
            "tags": dict(run.data.tags), "artifact_uri": run.info.artifact_uri}


def download_run_files(run_id: str, names: list[str], dst: Path) -> dict[str, Path | None]:
    """Download the named artifacts of a run into `dst`; None for each one the run lacks."""
    import mlflow
    from mlflow.exceptions import MlflowException

    present = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}
    out: dict[str, Path | None] = {}
    for name in names:
        if name not in present:
            out[name] = None
            continue
        try:
            out[name] = Path(mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=name, dst_path=str(dst)))
        except (MlflowException, OSError):
            out[name] = None
    return out


def tag_run(run_id: str, tags: dict[str, Any]) -> None:
    """Tags on another run (e.g. the source run of an export)."""
    import mlflow

    client = mlflow.MlflowClient()
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v)[:5000])


def log_dir(tracker: Tracker, local_dir: Path, subdir: str | None = None) -> None:
    """Every file of `local_dir` as artifacts of the tracker's run."""
    tracker._mlflow.log_artifacts(str(local_dir), artifact_path=subdir, run_id=tracker.run_id)


def register_checkpoint(tracker: Tracker, local_dir: Path, name: str, alias: str,
                        tags: dict[str, str]) -> dict:
    """Log `local_dir` as an MLflow 3 LoggedModel of the run, register it as `name`, alias it."""
    mlflow = tracker._mlflow
    client = mlflow.MlflowClient()
    model = client.create_logged_model(experiment_id=tracker.run.info.experiment_id, name=name,
                                       source_run_id=tracker.run_id, tags=tags,
                                       model_type="safetensors-checkpoint")
    try:
        client.log_model_artifacts(model.model_id, str(local_dir))
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    version = mlflow.register_model(f"models:/{model.model_id}", name, tags=tags)
    client.set_registered_model_alias(name, alias, version.version)
    return {"model_id": model.model_id, "name": name, "version": version.version, "alias": alias,
            "uri": f"models:/{name}@{alias}"}
