"""Whether this interpreter compiles the stack's modules from source at every start.

Python normally caches each module's compiled bytecode (a .pyc file) on the first import and
reads it at every later start; `pip install` writes them up front. An environment that sets
PYTHONDONTWRITEBYTECODE=1 and ships no .pyc files (a common Docker practice) makes every process
compile torch, transformers and ModelOpt from source again: thousands of modules, seconds of
every run before the model loads (docs/PERFORMANCE.md, "Byte-compiled modules").

`compiled_from_source` finds that case without importing anything; `warn_if_compiled_from_source`
logs one warning per process with the two ways out. Nothing here changes the interpreter's
settings: the environment said not to write bytecode, so the tool says what it costs instead.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Sequence

# The packages whose imports make up most of a run's start (torch, transformers, ModelOpt).
STACK = ("torch", "transformers", "modelopt")

_warned: list[bool] = []


def compiled_from_source(packages: Sequence[str] = STACK) -> list[str]:
    """The installed packages among `packages` whose modules this process compiles from source:
    it may not write bytecode, and the package's own .pyc (where this interpreter looks for it,
    PYTHONPYCACHEPREFIX included) is missing. Empty when Python may write bytecode: the first
    import then leaves the .pyc files that later starts read."""
    if not sys.dont_write_bytecode:
        return []
    out = []
    for name in packages:
        try:
            spec = importlib.util.find_spec(name)  # finds the package; imports nothing
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.has_location or not (spec.origin or "").endswith(".py"):
            continue  # not installed, or not plain source
        cached = spec.cached  # where this interpreter reads the .pyc (sys.pycache_prefix included)
        if cached is None or not os.path.exists(cached):
            out.append(name)
    return out


def site_dir(package: str) -> str | None:
    """The directory that holds `package` (its site-packages), for the compileall command."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        return None
    return os.path.dirname(os.path.dirname(os.path.abspath(spec.origin)))


def advice(packages: Sequence[str]) -> str:
    where = sorted({d for d in map(site_dir, packages) if d})
    names = packages[0] if len(packages) == 1 else ", ".join(packages[:-1]) + " and " + packages[-1]
    return (
        f"Python compiles {names} from source at every start here: PYTHONDONTWRITEBYTECODE is "
        f"set and {'it has' if len(packages) == 1 else 'they have'} no .pyc files, which adds "
        "seconds to each run before the model loads. Either keep the compiled modules outside the packages "
        "(export PYTHONPYCACHEPREFIX=$HOME/.cache/pycache; unset PYTHONDONTWRITEBYTECODE: the "
        "next run writes them once), or byte-compile the packages once "
        f"(python -m compileall -q -j 0 {' '.join(where)})"
    )


def warn_if_compiled_from_source(log: logging.Logger, packages: Sequence[str] = STACK) -> bool:
    """Log `advice` once per process when `compiled_from_source` finds any; True if it did."""
    found = compiled_from_source(packages)
    if found and not _warned:
        _warned.append(True)
        log.warning("%s", advice(found))
    return bool(found)
