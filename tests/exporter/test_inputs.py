"""exporter/inputs.py: an export's bad input is refused before torch, transformers or ModelOpt load."""

from __future__ import annotations

import subprocess

import pytest

from ..conftest import PY, subprocess_env

PROBE = """
import sys
from vlm_autoquant.cli.export import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "transformers", "modelopt") if m in sys.modules)
print("EXIT", code, "HEAVY", ",".join(heavy) or "none")
"""


@pytest.mark.parametrize("case", ["no such folder", "a folder without a run", "an unknown run id"])
def test_bad_export_source_is_refused_before_the_heavy_libraries_load(case, demo, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    source = {
        "no such folder": ["--artifacts-dir", tmp_path / "missing"],
        "a folder without a run": ["--artifacts-dir", empty],
        "an unknown run id": ["--run-id", "0123456789abcdef0123456789abcdef"],
    }[case]
    args = [*source, "--model-dir", demo[0], "--output-dir", tmp_path / "out"]
    env = subprocess_env(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}")
    proc = subprocess.run(
        [PY, "-c", PROBE, *map(str, args)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120
    )
    assert proc.stdout.strip().splitlines()[-1] == "EXIT 2 HEAVY none", proc.stderr[-2000:]
    assert "fix:" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
