"""ModelOpt's plugins and transformers' load-time imports skip libraries a run does not use.

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

Two transformers modules import scikit-learn functions when they load, behind transformers'
check that scikit-learn is installed, only to call them later: assisted generation's `roc_curve`
(every causal LM class imports it) and the GLUE metrics (ModelOpt's plugins import them through
the data collators). scikit-learn comes with MLflow; importing it costs about a second at each
start on a 2-core CPU. The finder loads each module of `AT_CALL` with its check answering no for
the length of that module's own import, then puts the real check back and, for each function,
one that imports the library's at its first call: the module behaves the same, and a run that
never calls them never imports those libraries.

Importing ModelOpt's quantization package parses its built-in YAML recipes, about 400 documents,
with PyYAML's pure-Python `SafeLoader`. Where PyYAML was built with libyaml (its wheels are),
ModelOpt's config loader parses them with `CSafeLoader` instead: the same constructor and
resolver, so the same objects, over libyaml's C parser (a quarter of a second of each start on a
2-core CPU).

ModelOpt's `algorithms` module decorates a function with `torch.compile` when it loads (the
log-softmax of logits split across tensor-parallel ranks, which only Megatron models call), and
`torch.compile` looks its backend up at once: it imports TorchInductor's compiler, about 0.7 s
of each start on a 2-core CPU. While that module loads, `torch.compile` gives a function that
calls the real `torch.compile` at its own first call; `torch.compile` compiles at the first call
anyway, so only the backend's import moves there.

`install()` puts one finder at the front of `sys.meta_path`; it is idempotent. Nothing here
imports torch, transformers or ModelOpt.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

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


# transformers modules -> (the availability check they import, {function: its library module}).
# (SciPy, which transformers' detection losses import the same way, ModelOpt imports itself.)
AT_CALL = {
    "transformers.generation.candidate_generator": ("is_sklearn_available", {"roc_curve": "sklearn.metrics"}),
    "transformers.data.metrics": (
        "is_sklearn_available",
        {
            "pearsonr": "scipy.stats",
            "spearmanr": "scipy.stats",
            "f1_score": "sklearn.metrics",
            "matthews_corrcoef": "sklearn.metrics",
        },
    ),
}


# ModelOpt's YAML config loader: importing ModelOpt's quantization package parses its built-in
# recipes (about 400 documents) through it.
MODELOPT_CONFIG_LOADER = "modelopt.torch.opt.config_loader"

# ModelOpt modules that apply `torch.compile` when they load (to functions no Qwen2 LM calls).
COMPILE_AT_FIRST_CALL = frozenset({"modelopt.torch.quantization.algorithms"})


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


def at_call(module: str, name: str) -> Callable[..., Any]:
    """`module.name`, a function, imported at its first call."""

    def deferred(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    deferred.__name__ = deferred.__qualname__ = name
    return deferred


def _never() -> bool:
    return False


class WrappedLoader(importlib.abc.Loader):
    """A module's own loader, wrapped: everything is the wrapped loader's unless overridden."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, is_package, ...
        return getattr(self.loader, name)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.loader.exec_module(module)


class AtCallLoader(WrappedLoader):
    """An `AT_CALL` module's loader: the module runs with its availability check answering no,
    then gets the real check and its functions imported at their first call."""

    def __init__(self, loader: importlib.abc.Loader, check: str, functions: dict[str, str]):
        super().__init__(loader)
        self.check, self.functions = check, functions

    def exec_module(self, module: types.ModuleType) -> None:
        utils = sys.modules["transformers.utils"]
        real = getattr(utils, self.check)
        before = set(sys.modules)
        setattr(utils, self.check, _never)
        try:
            self.loader.exec_module(module)
        finally:
            setattr(utils, self.check, real)
            # every module that bound the check meanwhile, this one included, gets the real one
            for name in {module.__name__, *(set(sys.modules) - before)}:
                scope = vars(sys.modules.get(name, module))
                for key in [k for k, v in scope.items() if v is _never]:
                    scope[key] = real
        if real():
            for name, source in self.functions.items():
                vars(module).setdefault(name, at_call(source, name))


class Libyaml:
    """PyYAML with `safe_load` and `safe_load_all` parsed by libyaml (`CSafeLoader`: the same
    SafeConstructor and resolver over libyaml's C parser, where `SafeLoader` parses in Python)."""

    def __init__(self, yaml: types.ModuleType):
        self.yaml = yaml

    def __getattr__(self, name: str) -> Any:
        return getattr(self.yaml, name)

    def safe_load(self, stream: Any) -> Any:
        return self.yaml.load(stream, Loader=self.yaml.CSafeLoader)

    def safe_load_all(self, stream: Any) -> Any:
        return self.yaml.load_all(stream, Loader=self.yaml.CSafeLoader)


class LibyamlLoader(WrappedLoader):
    """`MODELOPT_CONFIG_LOADER`'s loader: once the module has run, its `yaml` parses with libyaml
    (where PyYAML was built with it)."""

    def exec_module(self, module: types.ModuleType) -> None:
        self.loader.exec_module(module)
        yaml = vars(module).get("yaml")
        if isinstance(yaml, types.ModuleType) and hasattr(yaml, "CSafeLoader"):
            module.yaml = Libyaml(yaml)


def compiled_at_first_call(compile_fn: Callable[..., Any]) -> Callable[..., Any]:
    """`compile_fn` (torch.compile) deferred: a function given to it (or to the decorator it
    returns) is compiled with the same arguments at its first call; anything else (a module) is
    compiled at once."""

    def lazy_compile(model: Any = None, **kwargs: Any) -> Any:
        if model is None:
            return lambda fn: lazy_compile(fn, **kwargs)
        if not isinstance(model, types.FunctionType):
            return compile_fn(model, **kwargs)
        compiled: list[Callable[..., Any]] = []

        @functools.wraps(model)
        def first_call_compiles(*args: Any, **kw: Any) -> Any:
            if not compiled:
                compiled.append(compile_fn(model, **kwargs))
            return compiled[0](*args, **kw)

        return first_call_compiles

    return lazy_compile


class CompileAtFirstCallLoader(WrappedLoader):
    """A `COMPILE_AT_FIRST_CALL` module's loader: while the module runs, `torch.compile` is
    `compiled_at_first_call(torch.compile)`; the real one is put back after."""

    def exec_module(self, module: types.ModuleType) -> None:
        torch = sys.modules["torch"]
        real = torch.compile
        torch.compile = compiled_at_first_call(real)
        try:
            self.loader.exec_module(module)
        finally:
            torch.compile = real


def _wrapped_spec(name: str, path: Sequence[str] | None, wrap) -> importlib.machinery.ModuleSpec | None:
    """`name`'s spec from the usual path finder, its loader wrapped by `wrap` (None: the usual
    finders decide)."""
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        return None
    spec.loader = wrap(spec.loader)
    return spec


class LeanFinder(importlib.abc.MetaPathFinder):
    """The finder `install()` puts first on `sys.meta_path`: it refuses ModelOpt's plugins their
    unneeded libraries and wraps the loaders of `AT_CALL`, `MODELOPT_CONFIG_LOADER` and
    `COMPILE_AT_FIRST_CALL`; it finds nothing else."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name.split(".")[0] in MODELOPT_PLUGINS_NOT_NEEDED:
            by = importer(sys._getframe(1))
            if by is not None and is_modelopt_plugins(by):
                raise ModuleNotFoundError(f"No module named {name!r} (not imported by {by} here)", name=name)
        if name in AT_CALL and "transformers.utils" in sys.modules:  # which AtCallLoader patches
            return _wrapped_spec(name, path, lambda loader: AtCallLoader(loader, *AT_CALL[name]))
        if name == MODELOPT_CONFIG_LOADER:
            return _wrapped_spec(name, path, LibyamlLoader)
        if name in COMPILE_AT_FIRST_CALL and "torch" in sys.modules:  # which the loader patches
            return _wrapped_spec(name, path, CompileAtFirstCallLoader)
        return None


def install() -> None:
    """Put the finder first on `sys.meta_path`, once per process."""
    if not any(isinstance(f, LeanFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, LeanFinder())
