"""Effective-bits accounting on the real 3B layout (meta device: shapes only, no memory)."""

from __future__ import annotations

import pytest

from vlm_autoquant.model.demo import QWEN25_VL_3B, released_config
from vlm_autoquant.plan import cost


@pytest.fixture(scope="module")
def numels_3b(tmp_path_factory):
    import json

    from vlm_autoquant.model.lm import linear_numels, meta_model, text_config

    d = tmp_path_factory.mktemp("cfg3b")
    ids = {
        t: 151643 + i
        for i, t in enumerate(
            [
                "<|endoftext|>",
                "<|im_start|>",
                "<|im_end|>",
                "<|vision_start|>",
                "<|vision_end|>",
                "<|vision_pad|>",
                "<|image_pad|>",
                "<|video_pad|>",
            ]
        )
    }
    (d / "config.json").write_text(json.dumps(released_config(QWEN25_VL_3B, 151936, ids)))
    return linear_numels(meta_model(text_config(d)))


def test_3b_inventory_matches_the_released_model(numels_3b):
    assert len(numels_3b) == 253  # 36 layers x 7 projections + lm_head
    assert abs(sum(numels_3b.values()) / 1e9 - 3.086) < 0.001


def test_excluding_the_disabled_head_makes_8_bits_reachable(numels_3b):
    with_exclusion = cost.bits_range(numels_3b, ["*lm_head*"], ["*lm_head*"], 8)
    without = cost.bits_range(numels_3b, ["*lm_head*"], [], 8)
    assert with_exclusion.low == pytest.approx(8.0)
    # ModelOpt counts a disabled layer at 16 bits: the 3B cannot go below ~8.8.
    assert without.low == pytest.approx(8.0 + 8.0 * numels_3b["lm_head"] / sum(numels_3b.values()))
    assert 8.7 < without.low < 8.9
    assert not without.contains(8.5) and with_exclusion.contains(8.5)


def test_effective_bits_and_bytes():
    numels = {"a": 100, "b": 300, "lm_head": 600}
    bits = {"a": 8, "b": 16, "lm_head": 16}
    assert cost.effective_bits(numels, bits, ["*lm_head*"]) == pytest.approx((800 + 4800) / 400)
    assert cost.weight_bytes(numels, bits) == 100 + 600 + 1200
    assert cost.bits_range(numels, [], ["*"], 8).counted_weights == 0
