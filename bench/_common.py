"""Helpers shared by the benchmark scripts: run a timed process, its environment, the bare batches."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "qwen" / "qwen2_5_vl_3b_autoquant_fp8_schemes.py"
BARE = ROOT / "bench" / "bare_autoquant.py"


def sh(
    cmd: list[str], env: dict | None = None, log: Path | None = None, timeout: int = 900, cwd: Path = ROOT
) -> float:
    """Run a process; return its wall seconds (process start to exit), measured from outside."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    wall = time.perf_counter() - t
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}")
    return wall


def env_for(work: Path, src: Path = ROOT / "src") -> dict:
    """The driver's environment: the source tree (`src`) first, MLflow in a sqlite file under
    `work`, offline, and no MLflow run inherited from a caller."""
    work.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        PYTHONPATH=f"{src.resolve()}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.db'}",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONUNBUFFERED="1",
    )
    for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(key, None)
    return env


def driver_data(ckpt: Path, captions: Path, scheme: str, driver_args: list[str]) -> tuple:
    """The driver's scheme (catalog entry plus its override flags in `driver_args`) and its
    data: split and packed by the driver's own code with the scheme's seed."""
    from transformers import AutoTokenizer

    from vlm_autoquant.cli.common import OVERRIDE_FLAGS, overrides_from
    from vlm_autoquant.cli.main import main_parser
    from vlm_autoquant.core.errors import Problems
    from vlm_autoquant.plan.calib_data import build_data, load_captions
    from vlm_autoquant.plan.schemes import default_catalog, load_catalog, resolve

    ns = main_parser().parse_args(["--scheme-name", scheme, *driver_args])
    s = resolve(load_catalog(default_catalog()), scheme, overrides_from(ns), OVERRIDE_FLAGS)
    problems = Problems()
    data = build_data(AutoTokenizer.from_pretrained(ckpt), load_captions(captions), s, problems)
    problems.raise_if_any()
    return s, data


def build_batches(ckpt: Path, captions: Path, scheme: str, driver_args: list[str], target: Path) -> str:
    """The driver's own batches (same code, same seed) for the bare baseline; their fingerprint."""
    import torch

    s, data = driver_data(ckpt, captions, scheme, driver_args)
    torch.save(
        {
            "batches": data.calib.batches[: data.steps],
            "scheme": {
                "effective_bits": s.effective_bits,
                "formats": list(s.formats),
                "disabled_layers": list(s.disabled_layers),
                "cost_excluded_layers": s.excluded_from_cost,
                "num_calib_steps": s.num_calib_steps,
                "num_score_steps": s.num_score_steps,
            },
        },
        target,
    )
    return data.calib.fingerprint


def importtime_top(stderr_text: str, n: int = 15) -> list[dict]:
    """The `n` slowest cumulative imports from `python -X importtime` output (microseconds)."""
    rows = []
    for line in stderr_text.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        try:
            self_us, cum_us, name = (p.strip() for p in line.split(":", 1)[1].split("|"))
            rows.append({"module": name.strip(), "self_us": int(self_us), "cumulative_us": int(cum_us)})
        except ValueError:
            continue
    return sorted(rows, key=lambda r: -r["cumulative_us"])[:n]
