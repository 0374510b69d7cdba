"""The last line of a run, a sweep or an export: the MLflow run, the output and what comes next.

The next command is written the way this process was started: through `mlflow run`, a script
under scripts/, or a console command.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from .. import tracking

EXPORT_SCRIPT = "scripts/qwen/qwen2_5_vl_3b_autoquant_fp8_export.py"
EXPORT_CONSOLE = "vlm-autoquant-export"


def ui_command() -> str:
    """How to open the tracking store this process logged to."""
    uri = tracking.tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {shlex.quote(uri)}"


def export_command(run_id: str, model_dir: Path, experiment: str) -> str:
    """The export of `run_id`, in the form of the command that made it."""
    extra = experiment != tracking.DEFAULT_EXPERIMENT
    if os.environ.get("MLFLOW_RUN_ID"):
        cmd = [
            "mlflow",
            "run",
            ".",
            "-e",
            "export",
            "--env-manager",
            "local",
            "-P",
            f"run_id={run_id}",
            "-P",
            f"model_dir={model_dir}",
        ]
        cmd += ["-P", f"experiment={experiment}"] if extra else []
    else:
        head = ["python", EXPORT_SCRIPT] if sys.argv[0].endswith(".py") else [EXPORT_CONSOLE]
        cmd = [*head, "--run-id", run_id, "--model-dir", str(model_dir)]
        cmd += ["--experiment", experiment] if extra else []
    return shlex.join(cmd)


def line(
    what: str, run_id: str | None, experiment: str | None, out_dir: Path, next_step: str | None = None
) -> str:
    """`<what>: MLflow run R in experiment 'E'; output in D; next: C` (next defaults to the UI)."""
    if run_id is None:
        where = "not logged to MLflow"
    else:
        where = f"MLflow run {run_id} in experiment {experiment!r}"
    return f"{what}: {where}; output in {out_dir}; next: {next_step or ui_command()}"
