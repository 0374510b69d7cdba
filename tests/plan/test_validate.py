"""validate.py: cheap checks first, so bad input is refused before the heavy libraries load."""

from __future__ import annotations

import subprocess

import pytest

from ..conftest import PY, subprocess_env

PROBE = """
import sys
from vlm_autoquant.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("transformers", "modelopt", "mlflow") if m in sys.modules)
print("EXIT", code, "HEAVY", ",".join(heavy) or "none")
"""


def refused(args: list[str], cwd) -> tuple[str, str]:
    proc = subprocess.run(
        [PY, "-c", PROBE, *map(str, args)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=cwd,
        timeout=120,
    )
    return proc.stdout.strip().splitlines()[-1], proc.stderr


@pytest.mark.parametrize(
    "bad",
    [
        ["--scheme-name", "no-such-scheme"],
        ["--effective-bits", "7"],  # the budget's range comes from the safetensors headers
        ["--num-score-steps", "0"],
    ],
)
def test_bad_input_is_refused_before_transformers_modelopt_or_mlflow_load(bad, demo, tmp_path):
    args = [
        "--scheme-name",
        "fp8-balanced-10b",
        "--model-dir",
        demo[0],
        "--calib-file",
        demo[1],
        "--output-dir",
        tmp_path / "o",
        *bad,
    ]
    line, err = refused(args, tmp_path)
    assert line == "EXIT 2 HEAVY none", (line, err[-2000:])
    assert "fix:" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_header_linear_counts_equal_the_architecture(layouts):
    """The cheap pre-check counts exactly what the meta model of the config holds."""
    from vlm_autoquant.core.errors import Problems
    from vlm_autoquant.model.checkpoint import inspect_checkpoint, linear_numels_from_headers
    from vlm_autoquant.model.lm import linear_numels, meta_model, text_config

    for name, path in layouts.items():
        info = inspect_checkpoint(path, Problems())
        assert linear_numels_from_headers(info) == linear_numels(meta_model(text_config(path))), name
