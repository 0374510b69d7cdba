"""A third-party loader proves the compressed-tensors export: transformers' own from_pretrained.

transformers (with the `compressed-tensors` package) loads the checkpoint compressed, and on the
first forward decompresses each FP8 weight to codes x weight_scale in bf16. Its forward then
fake-quantizes the activations too (`compressed_tensors.quantization.lifecycle.forward.
set_forward_quantized`: static per-tensor from `input_scale`, dynamic per token for the
per-channel group), so it computes W8A8 like the engines, emulated in bf16 arithmetic: x /
input_scale rounded to bf16, then to E4M3, then times input_scale. The engines round x x
(1 / input_scale) in fp32. `use_optimized_inference=True` on an SM89+ GPU runs real FP8 kernels
instead; this check uses the default path.

That arithmetic differs from the run's (ModelOpt's fp32 fake quant) and from the engines', so
the check compares like with like: the loaded model's KL against BF16 and the run's model in
the loader's arithmetic (`run_in_loader_arithmetic`: compressed-tensors' own forward, with the
codes and scales computed from the run's quantizers in memory, not read from the file), on the
same held-out captions, one caption per row. The run's own KL is reported beside them.
transformers' Qwen2.5-VL builds no block-diagonal mask from restarting position ids, so
packed rows would not be the captions the run measured.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
from compressed_tensors.quantization import QuantizationStatus
from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization
from modelopt.torch.quantization.nn import TensorQuantizer
from PIL import Image
from torch import nn
from transformers import AutoProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from ..run.manifest import LayerRecord
from ..run.quality import quantizers_off
from . import ct as export_ct

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)
KL_REL_LIMIT = 0.05  # the loaded model's KL vs BF16 within 5% of the run's
MAX_CAPTIONS = 64
LOADER_ARITHMETIC = (
    "W8A8 fake quant in bf16 (compressed-tensors' forward: weights decompressed "
    "to codes x weight_scale, activations quantized from input_scale or per "
    "token)"
)


def captions_of(batches: list[dict], limit: int = MAX_CAPTIONS) -> dict[str, torch.Tensor]:
    """The packed rows' captions, one per row, right-padded: input_ids and attention_mask."""
    captions = []
    for b in batches:
        for ids, pos in zip(b["input_ids"], b["position_ids"]):
            starts = (pos == 0).nonzero().flatten().tolist() + [len(pos)]
            captions += [ids[s:e] for s, e in zip(starts, starts[1:]) if e - s > 1]
    captions = captions[:limit]
    width = max(len(c) for c in captions)
    ids = torch.zeros(len(captions), width, dtype=torch.long)
    mask = torch.zeros(len(captions), width, dtype=torch.long)
    for i, c in enumerate(captions):
        ids[i, : len(c)], mask[i, : len(c)] = c, 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.inference_mode()
def logits_of(model: nn.Module, rows: dict, device: torch.device) -> torch.Tensor:
    """`model`'s logits on the caption rows, as it returns them."""
    return model(**{k: v.to(device) for k, v in rows.items()}, use_cache=False).logits


@torch.inference_mode()
def kl_against(reference: torch.Tensor, candidate: nn.Module, rows: dict, device: torch.device) -> dict:
    """Mean per-token KL(reference || candidate) and top-1 agreement over the real tokens;
    `reference`: the reference model's logits on `rows` (`logits_of`)."""
    ref = reference.float()
    cand = logits_of(candidate, rows, device).float().to(ref.device)
    mask = rows["attention_mask"].to(ref.device).bool()
    lp_r, lp_c = F.log_softmax(ref, -1), F.log_softmax(cand, -1)
    kl = (lp_r.exp() * (lp_r - lp_c)).sum(-1)[mask]
    agree = (lp_r.argmax(-1) == lp_c.argmax(-1))[mask]
    return {
        "kl_mean": max(kl.mean().item(), 0.0),
        "top1_agreement": agree.float().mean().item(),
        "tokens": int(mask.sum()),
    }


def load(out: Path, device: torch.device, lm_only: bool) -> nn.Module:
    """The export as transformers loads it (compressed-tensors' quantizer), in bf16."""
    cls = Qwen2ForCausalLM if lm_only else Qwen2_5_VLForConditionalGeneration
    return cls.from_pretrained(out, dtype=torch.bfloat16, device_map={"": device}).eval()


def image_inputs(out: Path, image: Image.Image, prompt: str) -> tuple[dict, str]:
    """Processor inputs for one image and a prompt, and which processor built them.

    AutoProcessor needs torchvision (Qwen2-VL's video processor imports it); without it the
    processor's two halves are used directly: the PIL image processor and the tokenizer's chat
    template, with `<|image_pad|>` repeated once per merged patch as the processor does.
    """
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    try:
        processor = AutoProcessor.from_pretrained(out)
    except ImportError:
        pixels = Qwen2VLImageProcessorPil.from_pretrained(out)(images=[image], return_tensors="pt")
        tok = AutoTokenizer.from_pretrained(out)
        template = json.loads((out / "chat_template.json").read_text())["chat_template"]
        text = tok.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        merged = (
            int(pixels["image_grid_thw"].prod())
            // json.loads((out / "preprocessor_config.json").read_text()).get("merge_size", 2) ** 2
        )
        text = text.replace("<|image_pad|>", "<|image_pad|>" * merged, 1)
        return {**tok([text], return_tensors="pt"), **pixels}, "image processor + tokenizer"
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    return processor(text=[text], images=[image], return_tensors="pt"), "AutoProcessor"


@torch.inference_mode()
def generate_with_image(model: nn.Module, out: Path, device: torch.device) -> dict:
    """One generation with a generated two-colour image (vision tower + mrope load and run)."""
    image = Image.new("RGB", (56, 56))
    image.paste((200, 30, 30), (0, 0, 28, 56))
    inputs, built_by = image_inputs(out, image, "Describe the image.")
    inputs = {k: v.to(device) for k, v in inputs.items()}
    new = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    return {
        "image_tokens": int((inputs["input_ids"] == model.config.image_token_id).sum()),
        "new_tokens": int(new.shape[1]),
        "processor": built_by,
    }


@torch.no_grad()
def run_in_loader_arithmetic(reference: nn.Module, layers: list[LayerRecord]) -> nn.Module:
    """A copy of the run's model that computes as transformers' compressed-tensors loader does:
    each FP8 layer gets compressed-tensors' scheme and forward, its weight decompressed from the
    codes and scales `export_ct.compressed_layer` packs from the run's quantizers.

    The copy shares every tensor of the run's model but the FP8 weights, which it replaces, and
    packs them where they are (`export_ct.compressed_layer`); the run's model is not changed."""
    schemes = export_ct.fp8_schemes(layers, export_ct.quantization_config(layers))
    theirs = dict(reference.named_modules())
    replaced = {id(theirs[n].weight) for n in schemes}
    memo = {
        id(p): nn.Parameter(torch.empty_like(p), requires_grad=p.requires_grad) if id(p) in replaced else p
        for p in reference.parameters()
    }
    model = copy.deepcopy(reference, memo)
    for q in model.modules():  # this copy computes only through compressed-tensors
        if isinstance(q, TensorQuantizer):
            q.disable()
    modules = dict(model.named_modules())
    for name, scheme in schemes.items():
        m = modules[name]
        initialize_module_for_quantization(m, scheme, force_zero_point=False)
        packed = export_ct.compressed_layer(theirs[name], scheme)
        m.weight.copy_(FloatQuantizationCompressor.decompress(packed, scheme)["weight"])
        for key in ("weight_scale", "input_scale"):
            if key in packed:
                getattr(m, key).data = packed[key].to(m.weight.device)
        m.quantization_status = QuantizationStatus.DECOMPRESSED
    return model


def check(
    out: Path,
    reference: nn.Module,
    layers: list[LayerRecord],
    batches: list[dict],
    device: torch.device,
    lm_only: bool,
) -> dict:
    """transformers loads the export; its KL vs BF16 is the run's in the loader's arithmetic
    within KL_REL_LIMIT; with the vision tower, one image-plus-text generation runs."""
    rows = captions_of(batches)
    with quantizers_off(reference):  # BF16: every comparison's reference, run once
        bf16 = logits_of(reference, rows, device)
    run = kl_against(bf16, reference, rows, device)
    emulated = run_in_loader_arithmetic(reference, layers)
    like = kl_against(bf16, emulated, rows, device)
    del emulated
    loaded = load(out, device, lm_only)
    got = kl_against(bf16, loaded, rows, device)
    rel = abs(got["kl_mean"] - like["kl_mean"]) / max(like["kl_mean"], 1e-12)
    result = {
        "passed": rel <= KL_REL_LIMIT,
        "class": type(loaded).__name__,
        "loaded": got,
        "run_in_loader_arithmetic": like,
        "run": run,
        "kl_rel_diff": rel,
        "kl_rel_limit": KL_REL_LIMIT,
        "arithmetic": LOADER_ARITHMETIC,
        "captions": int(rows["input_ids"].shape[0]),
    }
    if not lm_only:
        result["image_generation"] = generate_with_image(loaded, out, device)
    del loaded
    return result
