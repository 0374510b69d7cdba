"""validate.py: cheap checks first, so bad input is refused before the heavy libraries load."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from ..conftest import PY, subprocess_env

BAD = [
    ["--scheme-name", "no-such-scheme"],
    ["--effective-bits", "7"],  # the budget's range comes from the safetensors headers
    ["--num-score-steps", "0"],
]
# Each refusal in turn, in one fresh interpreter: after each, which heavy modules are loaded by
# then (so "none" after the last means none of them loaded any); its stderr ends at a marker.
PROBE = """
import json, sys
from vlm_autoquant.cli import main
for i, args in enumerate(json.loads(sys.argv[1])):
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    heavy = sorted(m for m in ("transformers", "modelopt", "mlflow") if m in sys.modules)
    print("CASE", i, "EXIT", code, "HEAVY", ",".join(heavy) or "none", flush=True)
    print(f"--- end of case {i}", file=sys.stderr, flush=True)
"""


@pytest.fixture(scope="module")
def refusals(demo, tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    """(root, [(result line, stderr)] per BAD entry): each one's output dir is root / "o<i>"."""
    root = tmp_path_factory.mktemp("refusals")
    common = ["--scheme-name", "fp8-balanced-10b", "--model-dir", demo[0], "--calib-file", demo[1]]
    cases = [[*map(str, common), "--output-dir", str(root / f"o{i}"), *bad] for i, bad in enumerate(BAD)]
    proc = subprocess.run(
        [PY, "-c", PROBE, json.dumps(cases)],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        cwd=root,
        timeout=120,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("CASE ")]
    errs = re.split(r"--- end of case \d+\n", proc.stderr)
    assert len(lines) == len(BAD), proc.stdout + proc.stderr[-3000:]
    return root, [(line.split(" ", 2)[2], err) for line, err in zip(lines, errs)]


@pytest.mark.parametrize("bad", BAD)
def test_bad_input_is_refused_before_transformers_modelopt_or_mlflow_load(bad, refusals):
    root, results = refusals
    i = BAD.index(bad)
    line, err = results[i]
    assert line == "EXIT 2 HEAVY none", (line, err[-2000:])
    assert "fix:" in err and "Traceback" not in err
    assert not (root / f"o{i}").exists()


def test_header_linear_counts_equal_the_architecture(layouts):
    """The cheap pre-check counts exactly what the meta model of the config holds."""
    from vlm_autoquant.core.errors import Problems
    from vlm_autoquant.model.checkpoint import inspect_checkpoint, linear_numels_from_headers
    from vlm_autoquant.model.lm import linear_numels, meta_model, text_config

    for name, path in layouts.items():
        info = inspect_checkpoint(path, Problems())
        assert linear_numels_from_headers(info) == linear_numels(meta_model(text_config(path))), name
