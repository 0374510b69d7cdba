"""ModelOpt's plugin packages skip libraries a Qwen2 LM does not use; nothing else is touched."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_autoquant import api
from vlm_autoquant.core import lean_imports
from vlm_autoquant.core.errors import VlmAutoquantError

ROOT = Path(__file__).resolve().parents[2]

# A cold interpreter: fake `torch_geometric` and `vllm` packages (ModelOpt has plugins for both)
# record that they were imported; then ModelOpt's quantization and export packages are imported.
PROBE = """
import json, os, sys
if sys.argv[1] == "lean":
    from vlm_autoquant.core import lean_imports
    lean_imports.install()
import modelopt.torch.quantization, modelopt.torch.export
from modelopt.torch.quantization.nn import QuantModuleRegistry
import transformers.models.qwen2.modeling_qwen2 as q
during = open(os.environ["MARKS"]).read().split() if os.path.exists(os.environ["MARKS"]) else []
import torch_geometric  # outside ModelOpt's plugins: imported as usual
after = open(os.environ["MARKS"]).read().split()
print(json.dumps({"during": during, "after": after,
                  "linear": QuantModuleRegistry.get(q.torch.nn.Linear) is not None}))
"""


def _probe(tmp_path: Path, mode: str) -> dict:
    fakes = tmp_path / f"site-{mode}"
    marks = tmp_path / f"marks-{mode}.txt"
    for name in ("torch_geometric", "vllm"):
        (fakes / name).mkdir(parents=True)
        (fakes / name / "__init__.py").write_text(
            f"import os\nopen(os.environ['MARKS'], 'a').write({name!r} + '\\n')\n"
        )
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(fakes), str(ROOT / "src"), os.environ.get("PYTHONPATH")])
        ),
        "MARKS": str(marks),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_modelopt_plugins_skip_the_libraries_a_qwen2_lm_does_not_use(tmp_path):
    plain = _probe(tmp_path, "plain")
    lean = _probe(tmp_path, "lean")
    # Without the finder ModelOpt imports both fakes: the probe can see the cost it removes.
    assert sorted(plain["during"]) == ["torch_geometric", "vllm"]
    assert lean["during"] == []
    assert lean["after"] == ["torch_geometric"]  # imported normally outside the plugins
    assert lean["linear"] and plain["linear"]  # ModelOpt still quantizes nn.Linear


def _find_from(module: str, name: str):
    """`find_spec(name)` called from code whose module is `module`, as an import statement is."""
    scope = {"__name__": module, "finder": lean_imports.LeanFinder()}
    exec(f"found = finder.find_spec({name!r}, None)", scope)
    return scope["found"]


def test_only_a_modelopt_plugins_modules_own_import_of_a_listed_library_is_refused():
    with pytest.raises(ModuleNotFoundError) as err:
        _find_from("modelopt.torch.quantization.plugins.vllm", "vllm")
    assert err.value.name == "vllm"
    with pytest.raises(ModuleNotFoundError):
        _find_from("modelopt.torch.opt.plugins.mcore_dist_checkpointing", "megatron.core")
    # A library ModelOpt's plugins load (peft) imports what it likes, even inside them.
    assert _find_from("peft.tuners.lora.tp_layer", "megatron") is None
    assert _find_from("modelopt.torch.export.unified_export_megatron", "megatron") is None
    assert _find_from("__main__", "vllm") is None
    assert _find_from("modelopt.torch.quantization.plugins.huggingface", "transformers") is None


def test_only_modelopt_plugins_modules_are_counted():
    assert lean_imports.is_modelopt_plugins("modelopt.torch.quantization.plugins")
    assert lean_imports.is_modelopt_plugins("modelopt.torch.opt.plugins.huggingface")
    assert not lean_imports.is_modelopt_plugins("modelopt.torch.quantization")
    assert not lean_imports.is_modelopt_plugins("plugins.modelopt")
    assert not lean_imports.is_modelopt_plugins("vllm.plugins")


def test_install_is_idempotent_and_the_api_installs_it(tmp_path, monkeypatch):
    monkeypatch.setattr(
        sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, lean_imports.LeanFinder)]
    )
    with pytest.raises(VlmAutoquantError):
        api.quantize(tmp_path / "no-such-checkpoint", output_dir=tmp_path / "out")
    assert isinstance(sys.meta_path[0], lean_imports.LeanFinder)  # before its inputs were checked
    lean_imports.install()
    assert sum(isinstance(f, lean_imports.LeanFinder) for f in sys.meta_path) == 1
    assert isinstance(sys.meta_path[0], lean_imports.LeanFinder)


# A cold interpreter imports a causal LM class and ModelOpt's quantization package (which imports
# transformers' data collators and metrics, and ModelOpt's algorithms, which apply torch.compile);
# then it calls two of the deferred functions.
AT_CALL_PROBE = """
import json, sys
if sys.argv[1] == "lean":
    from vlm_autoquant.core import lean_imports
    lean_imports.install()
from transformers import Qwen2ForCausalLM
import modelopt.torch.quantization
import transformers.data.metrics as metrics
import transformers.generation.candidate_generator as cg
import modelopt.torch.opt.config_loader as config_loader
import modelopt.torch.quantization.config as mtq_config
import modelopt.torch.quantization.algorithms as algorithms
import torch
during = "sklearn" in sys.modules
configs = repr({n: getattr(mtq_config, n) for n in dir(mtq_config) if n.endswith("_CFG")})
out = {"during": during, "configs": configs, "yaml": type(config_loader.yaml).__name__,
       "inductor": "torch._inductor.compile_fx" in sys.modules,
       "compile": f"{torch.compile.__module__}.{torch.compile.__qualname__}",
       "compiled": getattr(algorithms._get_log_softmax_dist, "__wrapped__", None) is not None}
if cg.is_sklearn_available():  # the deferred functions, called
    fpr, tpr, thresholds = cg.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    f1 = metrics.acc_and_f1(__import__("numpy").array([1, 0, 1, 1]), __import__("numpy").array([1, 0, 0, 1]))
    out.update(checks=[cg.is_sklearn_available(), metrics.is_sklearn_available()],
               roc=[fpr.tolist(), tpr.tolist()], f1=f1["f1"], after="sklearn" in sys.modules)
print(json.dumps(out))
"""


def _at_call_probe(mode: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", AT_CALL_PROBE, mode],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
        },
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probes() -> dict:
    return {mode: _at_call_probe(mode) for mode in ("plain", "lean")}


def test_transformers_imports_scikit_learn_only_when_a_deferred_function_is_called(probes):
    pytest.importorskip("sklearn", reason="scikit-learn (MLflow's dependency) is not installed here")
    plain, lean = probes["plain"], probes["lean"]
    assert plain["during"] is True  # without the finder: the cost the finder removes
    assert lean["during"] is False
    # the functions are scikit-learn's: the same results, and the checks still say it is there
    assert lean["roc"] == plain["roc"] and lean["f1"] == plain["f1"] == pytest.approx(0.8)
    assert lean["checks"] == plain["checks"] == [True, True]
    assert lean["after"] is True


def test_modelopts_recipes_parse_with_libyaml_into_the_same_configs(probes):
    """The probe above, both ways: ModelOpt's config loader parses with libyaml under the finder,
    and every quantization config ModelOpt builds from its recipes is the same."""
    yaml = pytest.importorskip("yaml")
    if not hasattr(yaml, "CSafeLoader"):
        pytest.skip("this PyYAML was built without libyaml: the finder leaves ModelOpt's loader as it is")
    plain, lean = probes["plain"], probes["lean"]
    assert (plain["yaml"], lean["yaml"]) == ("module", "Libyaml")
    assert lean["configs"] == plain["configs"] and plain["configs"].count("_CFG'") > 10


def test_modelopts_torch_compile_waits_for_its_first_call_and_torch_compile_is_put_back(probes):
    """Without the finder, importing ModelOpt imports TorchInductor's compiler (torch.compile's
    backend lookup); with it, the compiler is not imported, ModelOpt's function is still a
    wrapper of its own, and torch.compile is torch's again once the module has loaded."""
    plain, lean = probes["plain"], probes["lean"]
    assert plain["inductor"] is True and lean["inductor"] is False
    assert lean["compile"] == plain["compile"] == "torch.compile"
    assert plain["compiled"] is True and lean["compiled"] is True


def test_a_function_given_to_the_deferred_compile_is_compiled_once_at_its_first_call():
    calls = []

    def fake_compile(model, **kwargs):
        calls.append((getattr(model, "__name__", type(model).__name__), kwargs))
        return lambda *a, **k: ("compiled", model(*a, **k))

    lazy = lean_imports.compiled_at_first_call(fake_compile)

    @lazy(dynamic=True)
    def twice(x):
        return 2 * x

    direct = lazy(twice.__wrapped__, backend="eager")
    assert calls == [] and twice.__name__ == "twice"  # nothing compiled when decorated
    assert twice(3) == ("compiled", 6) and twice(4) == ("compiled", 8)
    assert direct(5) == ("compiled", 10)
    assert calls == [("twice", {"dynamic": True}), ("twice", {"backend": "eager"})]  # once each

    class Module:
        def __call__(self, x):
            return x

    module = Module()
    assert lazy(module, mode="max-autotune")(1) == ("compiled", 1)  # not a function: at once
    assert calls[-1] == ("Module", {"mode": "max-autotune"})


def test_the_deferred_compile_gives_torch_compiles_results():
    import torch

    def f(x):
        return torch.sin(x) * 2 + 1

    lazy = lean_imports.compiled_at_first_call(torch.compile)(f, backend="eager", dynamic=True)
    x = torch.linspace(-3, 3, 17)
    assert torch.equal(lazy(x), torch.compile(f, backend="eager", dynamic=True)(x))
    assert torch.equal(lazy(x[:5]), f(x[:5]))


def test_every_modelopt_recipe_file_parses_the_same_with_both_parsers():
    import yaml
    from modelopt.torch.opt.config_loader import BUILTIN_CONFIG_ROOT

    if not hasattr(yaml, "CSafeLoader"):
        pytest.skip("this PyYAML was built without libyaml: nothing to compare")
    files = sorted(Path(str(BUILTIN_CONFIG_ROOT)).rglob("*.y*ml"))
    assert len(files) > 20, BUILTIN_CONFIG_ROOT
    fast = lean_imports.Libyaml(yaml)
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert list(fast.safe_load_all(text)) == list(yaml.safe_load_all(text)), f


def test_a_deferred_modules_import_sees_no_library_and_every_module_it_loads_keeps_the_real_check(
    tmp_path, monkeypatch
):
    """A stand-in module in the shape of transformers' (check imported, the function imported
    behind it) that imports a second module binding the same check while the first loads."""
    import transformers.utils as utils

    real = utils.is_sklearn_available
    (tmp_path / "lib_at_call.py").write_text("def roc_curve(x):\n    return sorted(x)\n")
    (tmp_path / "nested_at_call.py").write_text("from transformers.utils import is_sklearn_available\n")
    (tmp_path / "outer_at_call.py").write_text(
        "from transformers.utils import is_sklearn_available\n"
        "import nested_at_call\n"
        "SEEN = is_sklearn_available()\n"
        "if is_sklearn_available():\n"
        "    from sklearn.metrics import roc_curve\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(utils, "is_sklearn_available", lambda: True)  # as if installed
    for name in ("outer_at_call", "nested_at_call", "lib_at_call"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    spec = importlib.machinery.PathFinder.find_spec("outer_at_call", [str(tmp_path)])
    spec.loader = lean_imports.AtCallLoader(spec.loader, "is_sklearn_available", {"roc_curve": "lib_at_call"})
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "outer_at_call", module)
    spec.loader.exec_module(module)
    assert module.SEEN is False  # its own import saw no library
    checks = {
        utils.is_sklearn_available,
        module.is_sklearn_available,
        sys.modules["nested_at_call"].is_sklearn_available,
    }
    assert checks == {utils.is_sklearn_available} and utils.is_sklearn_available is not real
    assert "lib_at_call" not in sys.modules
    assert module.roc_curve([3, 1, 2]) == [1, 2, 3]  # imported and called at the first call
    assert "lib_at_call" in sys.modules
    assert module.roc_curve.__name__ == "roc_curve"


def test_every_deferred_module_still_imports_its_functions_behind_its_check():
    """transformers' source, as installed: a module renamed or changed upstream fails here, so the
    table follows transformers rather than quietly deferring nothing."""
    for name, (check, functions) in lean_imports.AT_CALL.items():
        source = Path(importlib.util.find_spec(name).origin).read_text()
        assert f"if {check}():" in source, name
        for function, library in functions.items():
            assert re.search(rf"from {re.escape(library)} import [^\n]*\b{function}\b", source), (
                name,
                function,
            )
