"""Dependency checks that run before torch, transformers or ModelOpt are imported.

Versions are read from the installed distributions' metadata (importlib.metadata), so a missing
or out-of-range package is reported as a Problem with its install command instead of an
ImportError traceback half-way through a run. The CLI calls `require` before anything heavy.
"""

from __future__ import annotations

from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .errors import Problems

# The same specifiers as pyproject.toml (tests/test_packaging.py checks it).
REQUIRED = {
    "torch": ">=2.6,<2.15",
    "transformers": ">=5.14.1,<5.18",
    "nvidia-modelopt": ">=0.47.0,<0.48",
    "datasets": ">=5.0,<6",
    "mlflow": ">=3.13,<3.18",
    # Not imported by this package, but transformers needs it for lm.py's device_map.
    "accelerate": ">=1.0",
}


# A distribution that provides the same importable package.
ALTERNATIVES = {"mlflow": ("mlflow-skinny",)}


def installed_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in REQUIRED:
        out[name] = None
        for dist in (name, *ALTERNATIVES.get(name, ())):
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def check(problems: Problems, versions: dict[str, str | None] | None = None) -> None:
    """Add a problem for each missing or out-of-range dependency, with the install command."""
    versions = installed_versions() if versions is None else versions
    for name, spec in REQUIRED.items():
        found = versions.get(name)
        install = f"pip install '{name}{spec}'"
        if name == "torch":
            install = "pip install torch==2.13.0 (or any torch" + spec + ")"
        if found is None:
            problems.add(f"dependency {name}", "is not installed", install)
        elif Version(Version(found).base_version) not in SpecifierSet(spec):
            problems.add(f"dependency {name}", f"version {found} is outside {spec}", install)


def require() -> None:
    """Raise one UsageError listing every missing or out-of-range dependency."""
    problems = Problems()
    check(problems)
    problems.raise_if_any()
