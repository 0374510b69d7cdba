"""The quality metrics of a quantized LM against its BF16 self."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from vlm_autoquant.model.lm import load_lm, text_config
from vlm_autoquant.plan.calib_data import pack, split_captions
from vlm_autoquant.run import quality

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def batches(demo):
    tok = AutoTokenizer.from_pretrained(demo[0])
    caps = demo[1].read_text().splitlines()
    return pack(tok, split_captions(caps, 64, 0, 0).calib, 64, 2, 0).batches[:1]


def test_an_unquantized_lm_agrees_with_itself(demo, batches):
    q = quality.evaluate(load_lm(demo[0], text_config(demo[0]), CPU), batches, CPU)
    assert q["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    assert q["top1_agreement"] == 1.0 and q["ppl_rel_change"] == pytest.approx(0.0, abs=1e-9)
    assert q["tokens"] == int(batches[0]["real"].sum()) and q["batches"] == 1


def test_a_quantized_lm_differs_and_keeps_its_quantizers_on(demo, batches):
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer

    model = load_lm(demo[0], text_config(demo[0]), CPU)
    ids = batches[0]["input_ids"]
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, lambda m: m(input_ids=ids))
    on = [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.is_enabled]
    q = quality.evaluate(model, batches, CPU)
    assert q["kl_mean"] > 0 and q["ppl_quant"] != q["ppl_ref"]
    assert on and all(m.is_enabled for m in on)  # quantizers_off restored every one
