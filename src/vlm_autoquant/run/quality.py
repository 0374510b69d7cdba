"""Quality of a quantized LM against the same LM in BF16, on held-out captions.

The BF16 reference is the same model with every quantizer switched off, so no second copy of the
weights is needed. Per token (real tokens only, padding excluded):
KL(BF16 || quantized), top-1 next-token agreement; per target token: NLL for perplexity.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from modelopt.torch.quantization.nn import TensorQuantizer
from torch import nn


@contextlib.contextmanager
def quantizers_off(model: nn.Module) -> Iterator[None]:
    """Temporarily disable every enabled TensorQuantizer (restored on exit)."""
    enabled = [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.is_enabled]
    for m in enabled:
        m.disable()
    try:
        yield
    finally:
        for m in enabled:
            m.enable()


@torch.inference_mode()
def evaluate(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> dict:
    """KL, top-1 agreement and perplexities of `model` vs its BF16 self on the same tokens."""
    kl_sum = agree = tokens = 0.0
    nll_ref = nll_q = targets = 0.0
    for batch in batches:
        b = {k: v.to(device) for k, v in batch.items()}
        kwargs = dict(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False)
        with quantizers_off(model):
            ref = model(**kwargs).logits
        quant = model(**kwargs).logits
        real = b["real"]
        labels = b["labels"][:, 1:]
        for r in range(ref.shape[0]):  # one row at a time bounds the float32 vocab tensors
            lp_ref = F.log_softmax(ref[r].float(), dim=-1)
            lp_q = F.log_softmax(quant[r].float(), dim=-1)
            mask = real[r]
            kl = (lp_ref.exp() * (lp_ref - lp_q)).sum(-1)
            kl_sum += kl[mask].sum().item()
            agree += (lp_ref.argmax(-1) == lp_q.argmax(-1))[mask].sum().item()
            tokens += mask.sum().item()
            tgt = labels[r]
            ok = tgt != -100
            idx = tgt.clamp(min=0).unsqueeze(-1)
            nll_ref -= lp_ref[:-1].gather(-1, idx).squeeze(-1)[ok].sum().item()
            nll_q -= lp_q[:-1].gather(-1, idx).squeeze(-1)[ok].sum().item()
            targets += ok.sum().item()
    if not tokens or not targets:
        return {}
    ppl_ref, ppl_q = math.exp(nll_ref / targets), math.exp(nll_q / targets)
    return {
        "kl_mean": max(kl_sum / tokens, 0.0),
        "top1_agreement": agree / tokens,
        "ppl_ref": ppl_ref,
        "ppl_quant": ppl_q,
        "ppl_rel_change": ppl_q / ppl_ref - 1.0,
        "tokens": int(tokens),
        "targets": int(targets),
        "batches": len(batches),
    }
