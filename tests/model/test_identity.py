"""identity.py: the LM digest reads every LM byte (chunked, threaded, reused buffers) and no other."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

TENSORS = {
    "model.embed_tokens.weight": (300, 40),
    "model.layers.0.mlp.up_proj.weight": (64, 16),
    "model.norm.weight": (7,),
    "visual.blocks.0.attn.qkv.weight": (8, 8),
}


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(*shape, generator=g).bfloat16() for k, shape in TENSORS.items()}


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's bytes as safetensors stores them (little-endian, row-major): from the tensor
    itself, not from any offset in the file."""
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.fixture
def shard(tmp_path):
    """One shard: LM tensors of several sizes (one over many chunks) and a vision tensor."""
    path = tmp_path / "model.safetensors"
    save_file(_tensors(), str(path))
    return path


def _span(path, name: str) -> tuple[int, int]:
    """Where a tensor's bytes lie in the file, found by searching for them."""
    raw, want = path.read_bytes(), _raw(_tensors()[name])
    start = raw.find(want)
    assert start > 0 and raw.find(want, start + 1) == -1
    return start, start + len(want)


@pytest.mark.parametrize("workers,background", [(1, False), (3, True)])
def test_each_tensor_digest_is_the_sha256_of_its_bytes(shard, monkeypatch, workers, background):
    from vlm_autoquant.model import identity

    monkeypatch.setattr(identity, "CHUNK", 1000)  # the embedding spans 24 chunks
    got = identity.tensor_digests(shard.parent, lambda n: not n.startswith("visual."), workers, background)
    want = {
        f"{k}:BF16:{list(t.shape)}": hashlib.sha256(_raw(t)).hexdigest()
        for k, t in _tensors().items()
        if not k.startswith("visual.")
    }
    assert got == want


def test_one_changed_value_changes_the_identity_and_vision_is_not_read(shard, monkeypatch):
    from vlm_autoquant.model import identity

    monkeypatch.setattr(identity, "CHUNK", 1000)
    before = identity.lm_weights_sha256(shard.parent)
    vision_before = identity.vision_weights_sha256(shard.parent)
    data = bytearray(shard.read_bytes())
    vs, _ = _span(shard, "visual.blocks.0.attn.qkv.weight")
    es, ee = _span(shard, "model.embed_tokens.weight")
    data[vs] ^= 0xFF  # a vision value: the LM identity must not move, the vision one must
    shard.write_bytes(bytes(data))
    assert identity.lm_weights_sha256(shard.parent) == before
    assert identity.vision_weights_sha256(shard.parent) not in (vision_before, None)
    data[ee - 1] ^= 0x01  # the last byte of the largest LM tensor, in its last chunk
    shard.write_bytes(bytes(data))
    assert identity.lm_weights_sha256(shard.parent, workers=2, background=True) != before
    assert identity.vision_weights_sha256(shard.parent) != vision_before


def test_an_export_onto_another_vision_tower_is_refused(script_run, demo, tmp_path):
    """The run records its base's vision identity; a model dir with one vision value changed
    fails the export's identity check (and passes with --lm-only, which exports no vision)."""
    import json
    import shutil

    from vlm_autoquant.core.errors import Problems
    from vlm_autoquant.exporter import inputs as export_inputs
    from vlm_autoquant.model import identity

    out = script_run[0]
    recorded = json.loads((out / "manifest.json").read_text())["model"]["vision_sha256"]
    assert recorded == identity.vision_weights_sha256(demo[0])
    other = Path(shutil.copytree(demo[0], tmp_path / "other"))
    for shard in sorted(other.glob("*.safetensors")):  # one value of the first vision tensor
        with safe_open(str(shard), framework="pt") as f:  # the largest: its bytes are unique
            vision = [f.get_tensor(k) for k in f.keys() if k.startswith("visual.")]
        raw = _raw(max(vision, key=lambda t: t.numel())) if vision else None
        if raw:
            data = bytearray(shard.read_bytes())
            start = data.find(raw)
            assert data.find(raw, start + 1) == -1
            data[start + len(raw) // 2] ^= 0x01
            shard.write_bytes(bytes(data))
            break
    assert identity.lm_weights_sha256(other) == identity.lm_weights_sha256(demo[0])
    for lm_only, refused in ((False, True), (True, False)):
        problems = Problems()
        opts = export_inputs.ExportOptions(
            output_dir=tmp_path / f"o{lm_only}", artifacts_dir=out, model_dir=other, lm_only=lm_only
        )
        export_inputs.gather(opts, tmp_path, problems)
        hit = [p for p in problems.items if "vision tower" in p.message]
        assert bool(hit) == refused, problems.items


def test_a_cancelled_digest_stops_within_a_chunk_and_a_later_one_hashes_afresh(shard, monkeypatch):
    """`cancel` ends a background digest before it reads another chunk (a refused export or a
    failed run does not wait for the hashing of every weight); the next `result` is complete."""
    import threading
    import time

    from vlm_autoquant.model import identity

    monkeypatch.setattr(identity, "CHUNK", 1000)
    monkeypatch.setattr(identity, "_futures", {})
    want = identity.lm_weights_sha256(shard.parent)
    reads, first_read, real_range = [], threading.Event(), identity.sha256_range

    def held_range(path, start, end, stop=None):
        reads.append(start)
        first_read.set()
        assert stop is not None and stop.wait(10)  # held until cancelled
        return real_range(path, start, end, stop)

    monkeypatch.setattr(identity, "sha256_range", held_range)
    future = identity.start(shard.parent)
    assert first_read.wait(10)
    t0 = time.perf_counter()
    identity.cancel(shard.parent)
    with pytest.raises(identity.Cancelled):
        future.result(timeout=10)
    assert time.perf_counter() - t0 < 5
    assert identity._futures == {}
    monkeypatch.setattr(identity, "sha256_range", real_range)
    assert identity.result(shard.parent) == want
    identity.cancel()  # every digest: none left running
    assert identity._futures == {}
