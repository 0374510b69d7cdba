"""ModelOpt's plugin packages skip libraries a Qwen2 LM does not use; nothing else is touched."""

from __future__ import annotations

import json
import os
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
