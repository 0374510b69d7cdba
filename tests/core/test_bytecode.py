"""A process that compiles the stack from source at every start is found, and the run says so."""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import py_compile
import subprocess
import sys

import pytest

import vlm_autoquant
from vlm_autoquant.core import bytecode
from vlm_autoquant.core.artifacts import MANIFEST_FILE

from ..conftest import PY, subprocess_env
from ..test_api import QUICK


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An importable package `vq_bytecode_probe` (source only) and an empty PYTHONPYCACHEPREFIX."""
    src = tmp_path / "src" / "vq_bytecode_probe"
    src.mkdir(parents=True)
    (src / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "pycache"))
    importlib.invalidate_caches()
    return src / "__init__.py"


@pytest.fixture
def fresh_warning(monkeypatch):
    monkeypatch.setattr(bytecode, "_warned", [])


def test_a_package_without_its_pyc_is_compiled_from_source_and_with_it_is_not(fake_package, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert bytecode.compiled_from_source(["vq_bytecode_probe"]) == ["vq_bytecode_probe"]
    # The .pyc where this interpreter looks for it (the prefix): then it is read, not compiled.
    py_compile.compile(str(fake_package), cfile=importlib.util.cache_from_source(str(fake_package)))
    assert bytecode.compiled_from_source(["vq_bytecode_probe"]) == []


def test_a_process_that_may_write_bytecode_compiles_each_module_once(fake_package, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    assert bytecode.compiled_from_source(["vq_bytecode_probe"]) == []


def test_packages_that_are_not_installed_or_not_source_are_not_reported(monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert bytecode.compiled_from_source(["vq_no_such_package_anywhere", "sys", "math"]) == []


PROBE = (
    "import json; from vlm_autoquant.core import bytecode; print(json.dumps(bytecode.compiled_from_source()))"
)


@pytest.mark.parametrize("dont_write", [True, False])
def test_the_environment_of_a_docker_image_without_pyc_files(tmp_path, dont_write):
    """PYTHONDONTWRITEBYTECODE=1 and a PYTHONPYCACHEPREFIX with nothing in it: this interpreter
    finds no .pyc for torch or transformers, so it compiles them at every start. Without
    PYTHONDONTWRITEBYTECODE the first start writes them, so nothing is reported."""
    env = subprocess_env(PYTHONPYCACHEPREFIX=str(tmp_path / "empty"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if dont_write:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    r = subprocess.run([PY, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert ({"torch", "transformers"} <= set(found)) if dont_write else (found == [])


def test_the_warning_names_the_packages_and_both_fixes_once(fake_package, monkeypatch, caplog, fresh_warning):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    log = logging.getLogger("vlm_autoquant")
    with caplog.at_level(logging.WARNING, logger="vlm_autoquant"):
        assert bytecode.warn_if_compiled_from_source(log, ["vq_bytecode_probe"])
        assert bytecode.warn_if_compiled_from_source(log, ["vq_bytecode_probe"])  # still found
    [record] = [r for r in caplog.records if "from source" in r.getMessage()]
    text = record.getMessage()
    assert "vq_bytecode_probe" in text
    assert "PYTHONPYCACHEPREFIX" in text and "unset PYTHONDONTWRITEBYTECODE" in text
    assert f"python -m compileall -q -j 0 {fake_package.parent.parent}" in text


def test_a_run_warns_once_after_its_inputs_are_valid(
    demo, tracking, tmp_path, monkeypatch, caplog, fresh_warning
):
    monkeypatch.setattr(bytecode, "compiled_from_source", lambda packages=bytecode.STACK: ["torch"])
    with caplog.at_level(logging.WARNING, logger="vlm_autoquant"):
        out = tmp_path / "q"
        vlm_autoquant.quantize(demo[0], "fp8-balanced-10b", output_dir=out, calib_file=demo[1], **QUICK)
        vlm_autoquant.export(out, output_dir=tmp_path / "ckpt", mlflow=False)
    assert (out / MANIFEST_FILE).is_file() and (tmp_path / "ckpt" / "config.json").is_file()
    assert sum("compiles torch from source" in r.getMessage() for r in caplog.records) == 1
    caplog.clear()
    monkeypatch.setattr(bytecode, "_warned", [])
    with (
        caplog.at_level(logging.WARNING, logger="vlm_autoquant"),
        pytest.raises(vlm_autoquant.VlmAutoquantError),
    ):
        vlm_autoquant.quantize(demo[0], "no-such-scheme", output_dir=tmp_path / "bad", calib_file=demo[1])
    assert not any("from source" in r.getMessage() for r in caplog.records)  # bad input: the error alone
