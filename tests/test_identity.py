"""identity.py: the LM digest reads every LM byte (chunked, threaded, reused buffers) and no other."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture
def shard(tmp_path):
    """One shard: LM tensors of several sizes (one over many chunks) and a vision tensor."""
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(300, 40, generator=g).bfloat16(),
               "model.layers.0.mlp.up_proj.weight": torch.randn(64, 16, generator=g).bfloat16(),
               "model.norm.weight": torch.randn(7, generator=g).bfloat16(),
               "visual.blocks.0.attn.qkv.weight": torch.randn(8, 8, generator=g).bfloat16()}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("workers,background", [(1, False), (3, True)])
def test_each_tensor_digest_is_the_sha256_of_its_bytes(shard, monkeypatch, workers, background):
    from vlm_autoquant.model import identity

    monkeypatch.setattr(identity, "CHUNK", 1000)  # the embedding spans 24 chunks
    got = identity.tensor_digests(shard.parent, lambda n: not n.startswith("visual."), workers,
                                  background)
    raw = shard.read_bytes()
    want = {f"{k}:{dt}:{list(shape)}": hashlib.sha256(raw[s:e]).hexdigest()
            for k, (dt, shape, s, e) in identity.shard_layout(shard).items()
            if not k.startswith("visual.")}
    assert got == want


def test_one_changed_value_changes_the_identity_and_vision_is_not_read(shard, monkeypatch):
    from vlm_autoquant.model import identity

    monkeypatch.setattr(identity, "CHUNK", 1000)
    before = identity.lm_weights_sha256(shard.parent)
    layout = identity.shard_layout(shard)
    data = bytearray(shard.read_bytes())
    vs, _ = layout["visual.blocks.0.attn.qkv.weight"][2:]
    data[vs] ^= 0xFF  # a vision value: the identity must not move
    shard.write_bytes(bytes(data))
    assert identity.lm_weights_sha256(shard.parent) == before
    es, ee = layout["model.embed_tokens.weight"][2:]
    data[ee - 1] ^= 0x01  # the last byte of the largest LM tensor, in its last chunk
    shard.write_bytes(bytes(data))
    assert identity.lm_weights_sha256(shard.parent, workers=2, background=True) != before
