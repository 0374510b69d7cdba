"""Checkpoint inspection: every broken-directory case is reported, naming the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vlm_autoquant.core.errors import Problems
from vlm_autoquant.model.checkpoint import inspect_checkpoint


def copy(demo, tmp_path) -> Path:
    return Path(shutil.copytree(demo[0], tmp_path / "ckpt"))


def problems_for(path: Path) -> str:
    problems = Problems()
    inspect_checkpoint(path, problems)
    return "\n".join(str(p) for p in problems.items)


def test_released_and_saved_layouts_are_clean(layouts):
    for path in layouts.values():
        p = Problems()
        info = inspect_checkpoint(path, p)
        assert not p, p.items
        assert info.lm_keys() and info.vision_keys()
        assert info.bytes_of(info.vision_keys()) > 0


def test_missing_dir(tmp_path):
    assert "does not exist" in problems_for(tmp_path / "nope")


def test_not_a_dir(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    assert "not a directory" in problems_for(f)


def test_no_config(demo, tmp_path):
    d = copy(demo, tmp_path)
    (d / "config.json").unlink()
    assert "no config.json" in problems_for(d)


@pytest.mark.parametrize(
    "model_type,arch,said",
    [
        ("qwen2", "Qwen2ForCausalLM", "config.json has model_type 'qwen2' (Qwen2ForCausalLM);"),
        ("llava", "LlavaForConditionalGeneration", "model_type 'llava' (LlavaForConditionalGeneration)"),
        ("llama", None, "config.json has model_type 'llama'; this tool needs 'qwen2_5_vl'"),
        (None, None, "config.json has no model_type; this tool needs 'qwen2_5_vl'"),
    ],
)
def test_wrong_model_type(demo, tmp_path, model_type, arch, said):
    d = copy(demo, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type=model_type, architectures=[arch] if arch else None)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (d / "config.json").write_text(json.dumps(cfg))
    text = problems_for(d)
    assert said in text and "(?)" not in text and "None" not in text


def test_missing_shard_named_by_index(demo, tmp_path):
    d = copy(demo, tmp_path)
    (d / "model-00002-of-00002.safetensors").unlink()
    text = problems_for(d)
    assert "names model-00002-of-00002.safetensors" in text and "re-download" in text


def test_truncated_shard(demo, tmp_path):
    d = copy(demo, tmp_path)
    shard = d / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    text = problems_for(d)
    assert "model-00001-of-00002.safetensors cannot be read" in text and "truncated" in text


def test_no_tokenizer(demo, tmp_path):
    d = copy(demo, tmp_path)
    (d / "tokenizer.json").unlink()
    assert "no tokenizer files" in problems_for(d)


def test_problems_are_collected_together(demo, tmp_path):
    d = copy(demo, tmp_path)
    (d / "tokenizer.json").unlink()
    (d / "model-00002-of-00002.safetensors").unlink()
    problems = Problems()
    inspect_checkpoint(d, problems)
    assert len(problems.items) == 2


def test_the_inspection_reads_the_headers_without_importing_torch(demo):
    """A bad --model-dir is refused in the time its headers take to read: the inspection gives
    every LM and vision tensor's dtype and shape, and torch is not imported for it."""
    import subprocess

    from ..conftest import PY, subprocess_env

    probe = (
        "import sys; from pathlib import Path\n"
        "from vlm_autoquant.core.errors import Problems\n"
        "from vlm_autoquant.model.checkpoint import inspect_checkpoint\n"
        "problems = Problems(); info = inspect_checkpoint(Path(sys.argv[1]), problems)\n"
        "print(len(info.lm_keys()), len(info.vision_keys()), bool(problems), 'torch' in sys.modules)\n"
    )
    proc = subprocess.run(
        [PY, "-c", probe, str(demo[0])], capture_output=True, text=True, env=subprocess_env(), timeout=120
    )
    lm, vision, refused, torch_imported = proc.stdout.split()
    assert int(lm) > 0 and int(vision) > 0 and refused == "False", proc.stderr[-2000:]
    assert torch_imported == "False"
    from safetensors import safe_open  # the same header as torch's framework reads

    with safe_open(str(next(demo[0].glob("*.safetensors"))), framework="pt") as f:
        key = next(iter(f.keys()))
        want = (str(f.get_slice(key).get_dtype()), tuple(f.get_slice(key).get_shape()))
    got = inspect_checkpoint(demo[0], Problems()).tensors[key]
    assert (got.dtype, got.shape) == want
