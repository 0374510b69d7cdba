"""Small helpers the benchmark scripts share: run a process and time it, a clean environment."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env_for(work: Path) -> dict:
    """The project on PYTHONPATH, offline, a fresh MLflow store in `work`, no inherited run."""
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", PYTHONUNBUFFERED="1")
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(key, None)
    return env


def sh(cmd: list[str], env: dict | None = None, log: Path | None = None, timeout: int = 900,
       cwd: Path = ROOT) -> float:
    """Run a process; return its wall seconds (process start to exit); exit on failure."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    wall = time.perf_counter() - t
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        print(proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}")
    return wall
