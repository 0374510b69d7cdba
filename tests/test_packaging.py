"""The install declares what the code imports, and a built wheel runs on its own.

The last test builds the wheel, installs it into a fresh venv (nothing preinstalled but the CPU
torch wheel) and runs the demo console command from a directory outside the clone.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from vlm_autoquant.tracking import DEFAULT_EXPERIMENT

from .conftest import PY, ROOT

# Declared but never imported, each for a reason the code states.
NOT_IMPORTED: dict[str, str] = {}  # every declared distribution is imported somewhere
# Imported but not declared: each only inside `try: ... except ImportError`, with a fall-back.
OPTIONAL_IMPORTS = {
    "triton": "comes with torch's CUDA builds; the fused score (search/score_reduce.py) uses it on a GPU"
}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, Requirement]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {_norm(r.name): r for r in map(Requirement, deps)}


def imported_modules(*dirs: Path) -> dict[str, set[str]]:
    """Top-level third-party modules imported anywhere under `dirs` -> the files importing them."""
    out: dict[str, set[str]] = {}
    for d in dirs:
        for path in d.rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top != "vlm_autoquant":
                        out.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return out


def test_every_import_is_declared_and_every_declaration_used():
    modules = imported_modules(ROOT / "src", ROOT / "scripts")
    assert {"torch", "transformers", "modelopt", "mlflow", "yaml"} <= set(modules)  # parser works
    dists = metadata.packages_distributions()
    have = declared()
    used: set[str] = set()
    for module, files in sorted(modules.items()):
        if module in OPTIONAL_IMPORTS:
            continue  # test_optional_imports_are_guarded
        providers = {_norm(d) for d in dists.get(module, [])}
        assert providers, f"{module} (imported in {sorted(files)}) is not installed at all"
        assert providers & set(have), (
            f"{module} (imported in {sorted(files)}) comes from "
            f"{sorted(providers)}, none declared in pyproject.toml"
        )
        used |= providers & set(have)
    assert set(have) - used == set(NOT_IMPORTED), "declared in pyproject.toml but never imported"
    assert "device_map" in (ROOT / "src" / "vlm_autoquant" / "model" / "lm.py").read_text()


def _guarded(tree: ast.AST, module: str) -> list[bool]:
    """For each import of `module` in `tree`: whether a `try` catching ImportError encloses it."""
    found: list[bool] = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if isinstance(node, ast.Try):
            catches = any(h.type is not None and "ImportError" in ast.unparse(h.type) for h in node.handlers)
            for child in node.body:
                visit(child, guarded or catches)
            for child in node.handlers + node.orelse + node.finalbody:
                visit(child, guarded)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n.split(".")[0] == module for n in names):
                found.append(guarded)
        for child in ast.iter_child_nodes(node):
            visit(child, guarded)

    visit(tree, False)
    return found


def test_optional_imports_are_guarded():
    """An undeclared import must fail softly: every one sits in a try that catches ImportError."""
    modules = imported_modules(ROOT / "src", ROOT / "scripts")
    for module in OPTIONAL_IMPORTS:
        for f in sorted(modules.get(module, ())):
            marks = _guarded(ast.parse((ROOT / f).read_text()), module)
            assert marks and all(marks), f"{f} imports {module} outside a try/except ImportError"


def test_every_subpackage_ships_in_the_wheel():
    """A subpackage missing from pyproject's list works editable and is absent from the wheel."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    src = ROOT / "src"
    on_disk = {".".join(p.parent.relative_to(src).parts) for p in src.rglob("__init__.py")}
    assert {"vlm_autoquant.core", "vlm_autoquant.cli"} <= on_disk  # the walk found them
    assert on_disk | {"vlm_autoquant.configs"} == set(tool["packages"])
    assert tool["package-dir"]["vlm_autoquant.configs"] == "configs"


def test_dependency_check_uses_pyproject_specifiers():
    from vlm_autoquant.plan import validate as deps

    have = declared()
    for name, spec in deps.REQUIRED.items():
        assert name in have, f"deps.REQUIRED checks {name}, which pyproject.toml does not declare"
        assert SpecifierSet(spec) == have[name].specifier, name


def test_missing_dependency_is_refused_before_heavy_imports(tmp_path):
    """Every entry point reports a missing package (exit 2) with torch & co. still unimported."""
    code = """
import sys
from vlm_autoquant.plan import validate as deps
real = deps.installed_versions()
deps.installed_versions = lambda: {**real, "accelerate": None, "transformers": "4.0"}
from vlm_autoquant.cli import demo_main, main, sweep_main
codes = [main(["--scheme-name", "fp8-balanced-10b", "--model-dir", "nope"]), sweep_main([]),
         demo_main([])]
heavy = sorted(m for m in ("torch", "transformers", "modelopt", "mlflow") if m in sys.modules)
print(codes, heavy)
"""
    proc = subprocess.run(
        [PY, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[2, 2, 2] []"
    assert proc.stderr.count("dependency accelerate: is not installed") == 3
    assert proc.stderr.count("pip install 'transformers>=5.14.1,<5.18'") == 3
    assert not (tmp_path / ".demo").exists()  # nothing was built


def test_default_catalog_is_the_repo_file():
    from vlm_autoquant.plan.schemes import default_catalog

    assert default_catalog().read_bytes() == (ROOT / "configs" / "schemes.yaml").read_bytes()


def _run(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert proc.returncode == 0, (
        f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


@pytest.mark.install
def test_wheel_in_fresh_venv_runs_demo_outside_the_clone(tmp_path):
    """Non-editable install from a built wheel; only the CPU torch wheel is installed first."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if not os.environ.get("CI"):
        probe = subprocess.run(
            [PY, "-m", "pip", "download", "--no-deps", "-q", "-d", str(tmp_path / "probe"), "pyyaml"],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        if probe.returncode != 0:
            pytest.skip(f"no package index reachable (not CI): {probe.stderr.strip()[-300:]}")
    t0 = time.perf_counter()
    wheels = tmp_path / "wheels"
    _run([PY, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)], 600, env=env)
    (wheel,) = wheels.glob("vlm_autoquant-*.whl")
    venv = tmp_path / "venv"
    _run([PY, "-m", "venv", str(venv)], 120, env=env)
    vpy = str(venv / "bin" / "python")
    _run([vpy, "-m", "pip", "install", "-q", "torch==2.13.0"], 900, env=env)
    _run([vpy, "-m", "pip", "install", "-q", str(wheel)], 900, env=env)
    installed = time.perf_counter() - t0

    work = tmp_path / "elsewhere"  # outside the clone: nothing can come from the source tree
    work.mkdir()
    run_env = {
        **env,
        "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    where = _run(
        [vpy, "-c", "import vlm_autoquant, sys; print(vlm_autoquant.__file__)"], 60, cwd=work, env=run_env
    ).stdout.strip()
    assert where.startswith(str(venv)), where
    listed = _run([str(venv / "bin" / "vlm-autoquant"), "--list-schemes"], 120, cwd=work, env=run_env).stdout
    assert "fp8-balanced-10b" in listed and "fp8-pcpt-10b" in listed
    t1 = time.perf_counter()
    shown = _run([str(venv / "bin" / "vlm-autoquant-demo")], 600, cwd=work, env=run_env).stdout
    demo = time.perf_counter() - t1
    quantized, exported = shown.strip().splitlines()  # the run's handoff, then the export's
    assert f"experiment '{DEFAULT_EXPERIMENT}'" in quantized and "next: vlm-autoquant-export" in quantized, (
        shown
    )
    assert exported.startswith("exported fp8-balanced-10b") and "next: mlflow ui" in exported
    # the export command the run printed, its run id filled in, works as printed
    cmd = shlex.split(quantized.split("next: ", 1)[1])
    _run([str(venv / "bin" / cmd[0]), *cmd[1:]], 600, cwd=work, env=run_env)
    assert (work / "exports" / cmd[cmd.index("--run-id") + 1] / "export_report.json").is_file()

    manifest = json.loads((work / "outputs" / "demo-fp8-balanced-10b" / "manifest.json").read_text())
    assert manifest["scheme"]["name"] == "fp8-balanced-10b"
    formats = {layer["format"] for layer in manifest["layers"]}
    assert formats == {"FP8", "BF16"}, formats  # 10 bits: a mix, lm_head in BF16
    assert (work / ".demo").is_dir()  # the demo checkpoint is built relative to the CWD
    print(f"\nwheel + fresh venv + installs: {installed:.0f} s; demo from the wheel: {demo:.0f} s")
