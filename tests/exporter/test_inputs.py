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


def test_a_bad_output_dir_is_refused_before_any_weight_is_hashed(script_run, tmp_path, monkeypatch):
    """The identity hashes read every weight (minutes for a 72B): a problem found before them
    is reported at once."""
    import vlm_autoquant
    from vlm_autoquant.model import identity

    def no_hashing(*args, **kwargs):
        raise AssertionError("a weight was hashed for an export that is refused anyway")

    monkeypatch.setattr(identity, "start", no_hashing)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("not ours")
    with pytest.raises(vlm_autoquant.VlmAutoquantError) as info:
        vlm_autoquant.export(script_run[0], output_dir=theirs, mlflow=False)
    assert [p.input for p in info.value.problems] == ["--output-dir"]
    assert (theirs / "notes.txt").read_text() == "not ours"


def test_the_validate_line_names_its_parts_and_both_hashes_run_together(
    script_run, tmp_path, monkeypatch, caplog
):
    import logging
    import re

    import vlm_autoquant
    from vlm_autoquant.model import identity

    started, real_start = [], identity.start
    monkeypatch.setattr(identity, "_futures", {})  # hashed afresh, as in a new process
    monkeypatch.setattr(
        identity, "start", lambda d, vision=False: started.append(vision) or real_start(d, vision)
    )
    caplog.set_level(logging.INFO, logger="vlm_autoquant")
    vlm_autoquant.export(script_run[0], output_dir=tmp_path / "ckpt", mlflow=False)
    assert started[:2] == [True, False]  # the vision tower's hash starts before the LM's is awaited
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validate")]
    parts = dict(re.findall(r"([a-z][a-z0-9 ]*?) (\d+\.\d\d)", line.split("(", 1)[1]))
    assert {"weights sha256", "other"} <= set(parts), line
    assert sum(map(float, parts.values())) <= float(line.split()[1]) + 0.01 * len(parts)
