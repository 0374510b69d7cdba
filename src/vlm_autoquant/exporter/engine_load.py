"""What a serving engine does to an exported per-tensor FP8 checkpoint at load, in PyTorch.

vLLM fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` (Qwen2's
`packed_modules_mapping`). For per-tensor FP8, its ModelOpt linear
(`ModelOptFp8LinearMethod.process_weights_after_loading`,
vllm/model_executor/layers/quantization/modelopt.py) then keeps one weight scale and one input
scale per fused layer, the largest of the siblings'. Where the siblings' weight scales differ it
re-quantizes every sibling to that scale (`requantize_with_max_scale`,
vllm/model_executor/layers/quantization/utils/w8a8_utils.py):
- `per_tensor_dequantize`: the codes as float16, times the sibling's own scale (a float16
  product: torch casts the fp32 scale to the float16 tensor's dtype);
- `ops.scaled_fp8_quant(weight_dq, max_scale)`: its CUDA kernel multiplies by `1.0f / scale` in
  fp32, clamps to +-448 and rounds to E4M3.
SGLang's ModelOpt FP8 linear (python/sglang/srt/layers/quantization/modelopt_quant.py) calls the
same function without vLLM's equal-scales shortcut (`always=True` here); TensorRT-LLM's PyTorch
FP8 linear (`FP8QDQLinearMethod.rescale_fused_weights`) also takes both maxima. Per-channel
weight scales (one per output row) are concatenated, not re-quantized, and dynamic per-token
inputs have no stored scale: a per-channel group is left as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model.checkpoint import VISION_RE
from ..model.fused import fused_layer_groups
from ..model.identity import weight_files
from ..run.manifest import Manifest

E4M3_MAX = 448.0


def requantize_with_max_scale(
    codes: list[torch.Tensor], scales: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """vLLM's `requantize_with_max_scale` on one fused group: (max scale, re-quantized codes)."""
    max_scale = scales.max()
    inverse = torch.reciprocal(max_scale.float())  # the kernel's `1.0f / scale`
    out = []
    for c, s in zip(codes, scales):
        dequantized = c.to(torch.float16) * s  # per_tensor_dequantize: a float16 product
        x = (dequantized.float() * inverse).clamp(-E4M3_MAX, E4M3_MAX)
        out.append(x.to(torch.float8_e4m3fn))
    return max_scale, out


def served_tensors(
    tensors: dict[str, torch.Tensor], always: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The exported LM tensors as the engine serves them, still one entry per sibling.

    Each per-tensor FP8 fused group gets the group's largest `weight_scale` and `input_scale`;
    its codes are re-quantized to that scale where the scales differ (vLLM), or always
    (`always`: SGLang). Returns the new tensors (the inputs are not changed) and counts:
    groups seen, groups re-quantized, weight bytes that changed.
    """
    out = dict(tensors)
    layers = {k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale")}
    stats = {"groups": 0, "requantized": 0, "bytes_changed": 0}
    for group in fused_layer_groups(layers):
        scales = torch.stack([tensors[f"{n}.weight_scale"].float().reshape(-1) for n in group])
        if scales.shape[1] != 1:  # per-channel weights: concatenated as they are
            continue
        stats["groups"] += 1
        scales = scales.reshape(-1)
        if always or not bool((scales == scales[0]).all()):
            codes = [tensors[f"{n}.weight"] for n in group]
            max_scale, requantized = requantize_with_max_scale(codes, scales)
            stats["requantized"] += 1
            for n, old, new in zip(group, codes, requantized):
                changed = old.view(torch.uint8) != new.view(torch.uint8)
                stats["bytes_changed"] += int(changed.sum())
                out[f"{n}.weight"] = new
        else:
            max_scale = scales.max()
        inputs = [tensors.get(f"{n}.input_scale") for n in group]
        shared_input = max(inputs, key=float) if all(s is not None for s in inputs) else None
        for n in group:
            own = tensors[f"{n}.weight_scale"]
            out[f"{n}.weight_scale"] = max_scale.reshape(own.shape).to(own.dtype).clone()
            if shared_input is not None:
                out[f"{n}.input_scale"] = shared_input.clone()
    return out, stats


def fused_scales_warning(manifest: Manifest) -> str | None:
    """The export's warning for a run that kept per-module scales."""
    rule = manifest.export.fused_scales
    per_tensor = [name for name, config in manifest.fp8_layers().items() if config == "FP8_DEFAULT_CFG"]
    if rule == "shared-max" or not fused_layer_groups(per_tensor):
        return None
    return (
        "the run kept per-module FP8 scales for q/k/v and gate/up (fused_scales: "
        f"{rule}): vLLM, SGLang and TensorRT-LLM re-quantize those groups to their largest "
        "scale at load, so the served model is not the one the run measured; rerun with "
        "--fused-scales shared-max to serve what was searched"
    )


def write_served(export_dir: Path, target: Path, always: bool = False) -> dict[str, int]:
    """Write the export's LM tensors as the engine serves them to `target/model.safetensors`
    (the vision tower left out); return `served_tensors`' counts."""
    tensors = {}
    for f in weight_files(export_dir):
        with safe_open(str(f), framework="pt", device="cpu") as st:
            tensors.update({k: st.get_tensor(k) for k in st.keys() if not VISION_RE.match(k)})
    served, stats = served_tensors(tensors, always)
    target.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in served.items()},
        str(target / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return stats
