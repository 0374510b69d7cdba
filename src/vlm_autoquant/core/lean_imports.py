"""ModelOpt's plugin modules do not import libraries a Qwen2 LM does not use.

ModelOpt's `plugins` packages (`modelopt.torch.quantization.plugins`, `modelopt.torch.opt.plugins`,
...) import every third-party library they have a plugin for, whenever it is installed: PyTorch
Geometric, vLLM, diffusers, Megatron, Transformer Engine, apex, ... In an environment that has
them (an NGC PyTorch container, a serving environment with vLLM) that costs seconds at every
start, and none of those libraries defines a module of a transformers Qwen2 LM.

When a ModelOpt plugins module itself imports one of `MODELOPT_PLUGINS_NOT_NEEDED`, the import
fails as if the library were not installed, which ModelOpt's `import_plugin` treats as "no
plugin". Only that direct import is refused: a library that ModelOpt's plugins do load (peft,
transformers' trainer) imports what it likes, and the same library imported from anywhere else,
before or after, is untouched; one already imported stays in use.

`install()` puts one finder at the front of `sys.meta_path`; it is idempotent. Nothing here
imports torch, transformers or ModelOpt.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
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


def importer(frame: types.FrameType | None) -> str | None:
    """The module whose code runs the import that reached `frame` (importlib's frames skipped)."""
    while frame is not None:
        name = frame.f_globals.get("__name__")
        if not frame.f_code.co_filename.startswith("<frozen importlib") and name != "importlib":
            return name
        frame = frame.f_back
    return None


class LeanFinder(importlib.abc.MetaPathFinder):
    """The finder `install()` puts first on `sys.meta_path`: it finds nothing, it only refuses."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name.split(".")[0] in MODELOPT_PLUGINS_NOT_NEEDED:
            by = importer(sys._getframe(1))
            if by is not None and is_modelopt_plugins(by):
                raise ModuleNotFoundError(f"No module named {name!r} (not imported by {by} here)", name=name)
        return None


def install() -> None:
    """Put the finder first on `sys.meta_path`, once per process."""
    if not any(isinstance(f, LeanFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, LeanFinder())
