"""ModelOpt's plugin packages do not import libraries a Qwen2 LM does not use.

ModelOpt's `plugins` packages (`modelopt.torch.quantization.plugins`, `modelopt.torch.opt.plugins`,
...) import every third-party library they have a plugin for, whenever it is installed: PyTorch
Geometric, vLLM, diffusers, Megatron, Transformer Engine, apex, ... In an environment that has
them (an NGC PyTorch container, a serving environment with vLLM) that costs seconds at every
start, and none of those libraries defines a module of a transformers Qwen2 LM.

While a ModelOpt `plugins` package executes, importing one of `MODELOPT_PLUGINS_NOT_NEEDED`
fails as if it were not installed, which ModelOpt's `import_plugin` treats as "no plugin". The
block is per thread and only inside those packages: the same library imported anywhere else,
before or after, is untouched, and one already imported stays in use.

`install()` puts one finder at the front of `sys.meta_path`; it is idempotent. Nothing here
imports torch, transformers or ModelOpt.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
import types
from collections.abc import Sequence

# Libraries that ModelOpt has plugins for and that no transformers Qwen2 LM module comes from.
# Not listed: accelerate, transformers and huggingface_hub (the LM's own stack), and peft and
# datasets, which transformers itself imports from inside ModelOpt's plugin packages.
MODELOPT_PLUGINS_NOT_NEEDED = frozenset(
    {
        "apex",
        "diffusers",
        "fairscale",
        "fastvideo",
        "megatron",
        "torch_geometric",
        "transformer_engine",
        "trl",
        "vllm",
    }
)


def is_modelopt_plugins(name: str) -> bool:
    """A ModelOpt plugins package or one of its modules."""
    parts = name.split(".")
    return parts[0] == "modelopt" and "plugins" in parts[1:]


class _CountingLoader(importlib.abc.Loader):
    """The real loader of a ModelOpt plugins module, counting the thread's depth inside them."""

    def __init__(self, real: importlib.abc.Loader, depth: threading.local) -> None:
        self.real = real
        self.depth = depth

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.depth.value = getattr(self.depth, "value", 0) + 1
        try:
            self.real.exec_module(module)
        finally:
            self.depth.value -= 1

    def __getattr__(self, item: str):  # get_code, get_source, is_package, ...: the real loader's
        return getattr(self.real, item)


class LeanFinder(importlib.abc.MetaPathFinder):
    """The finder `install()` puts first on `sys.meta_path`."""

    def __init__(self) -> None:
        self.depth = threading.local()  # how many ModelOpt plugins modules this thread is executing

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if getattr(self.depth, "value", 0) and name.split(".")[0] in MODELOPT_PLUGINS_NOT_NEEDED:
            raise ModuleNotFoundError(
                f"No module named {name!r} (not imported by ModelOpt's plugins here)", name=name
            )
        if not is_modelopt_plugins(name):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _CountingLoader(spec.loader, self.depth)
                return spec
        return None


def install() -> None:
    """Put the finder first on `sys.meta_path`, once per process."""
    if not any(isinstance(f, LeanFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, LeanFinder())
