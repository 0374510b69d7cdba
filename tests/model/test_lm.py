"""LM-only loading: every checkpoint layout, vision tensors never materialised, exact logits."""

from __future__ import annotations

import pytest
import safetensors
import torch

from vlm_autoquant.core.errors import Problems
from vlm_autoquant.model.checkpoint import VISION_RE, inspect_checkpoint
from vlm_autoquant.model.lm import load_lm, text_config


@pytest.fixture(scope="module")
def full_vl(demo):
    from transformers import Qwen2_5_VLForConditionalGeneration

    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(demo[0], dtype=torch.bfloat16)
    return m.eval()


def test_text_config_is_1d_rope_qwen2_with_tied_head(demo):
    cfg = text_config(demo[0])
    assert cfg.model_type == "qwen2" and cfg.tie_word_embeddings
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # GQA
    assert cfg.architectures == ["Qwen2ForCausalLM"]


@pytest.mark.parametrize("layout", ["released", "save_pretrained", "legacy"])
def test_every_layout_gives_the_full_vl_models_text_logits(layouts, layout, full_vl):
    model = load_lm(layouts[layout], text_config(layouts[layout]), torch.device("cpu"))
    assert not any("visual" in k for k in model.state_dict())
    ids = torch.randint(0, 500, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        ref = full_vl(input_ids=ids).logits
    assert torch.equal(ours, ref)


def test_loaded_lm_is_frozen_bf16_with_fp32_rope(demo):
    model = load_lm(demo[0], text_config(demo[0]), torch.device("cpu"))
    assert not any(p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # loaded with dtype=, not cast
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert not model.training


def test_no_vision_bytes_are_read(layouts, monkeypatch):
    """Every tensor transformers materialises goes through a slice or get_tensor: record them."""
    read: list[str] = []
    real_open = safetensors.safe_open

    class Slice:
        def __init__(self, key, inner):
            self.key, self.inner = key, inner

        def __getitem__(self, item):
            read.append(self.key)
            return self.inner[item]

        def __getattr__(self, name):
            return getattr(self.inner, name)

    class Recording:
        def __init__(self, *args, **kwargs):
            self.f = real_open(*args, **kwargs)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_slice(self, key):
            return Slice(key, self.f.get_slice(key))

        def get_tensor(self, key):
            read.append(key)
            return self.f.get_tensor(key)

        def __getattr__(self, name):
            return getattr(self.f, name)

    import transformers.modeling_utils as mu

    monkeypatch.setattr(mu, "safe_open", Recording)
    for layout in ("released", "legacy"):
        read.clear()
        load_lm(layouts[layout], text_config(layouts[layout]), torch.device("cpu"))
        assert read, "the recorder saw no reads: the loader no longer goes through safe_open"
        assert not [k for k in read if VISION_RE.match(k)]
        info = inspect_checkpoint(layouts[layout], Problems())
        assert set(read) == set(info.lm_keys())  # each LM tensor, nothing else
        assert info.vision_keys()


def test_missing_lm_tensor_is_refused(demo, tmp_path):
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from vlm_autoquant.core.errors import RunFailed

    broken = tmp_path / "broken"
    shutil.copytree(demo[0], broken)
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    key = "model.layers.1.mlp.down_proj.weight"
    shard = broken / index["weight_map"].pop(key)
    tensors = load_file(str(shard))
    del tensors[key]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(RunFailed, match="down_proj"):
        load_lm(broken, text_config(broken), torch.device("cpu"))
