"""The compressed-tensors export: the run's quantized LM in the format llm-compressor writes.

The config is built from compressed-tensors' own classes (its `FP8` and `FP8_DYNAMIC` preset
schemes in a `QuantizationConfig`, written by `ModelCompressor.update_config`), and every FP8
weight is packed by its `FloatQuantizationCompressor`. One config group per FP8 format present:
- `fp8_per_tensor`: per-tensor static FP8 weights and inputs (`FP8_DEFAULT_CFG` layers);
- `fp8_per_channel`: per-channel weights, dynamic per-token inputs
  (`FP8_PER_CHANNEL_PER_TOKEN_CFG`).

Targets are explicit, one `re:` entry per layer, and `ignore` holds every BF16 linear, `lm_head`
and the vision tower. Each entry matches all the names one layer goes by: the released key
layout (`model.layers.N.x`, `visual.*`), transformers' in-memory modules
(`model.language_model.layers.N.x`, `model.visual.*`), vLLM's (`language_model.model.layers.N.x`)
and the fused projections engines load (`qkv_proj`, `gate_up_proj`). An entry written in one
naming only is silently unmatched by a loader using another, which then quantizes an ignored
layer without scales.

The compressor is given the run's own fake-quantized weight and `amax / 448`, so the stored
codes are the codes the run evaluated. The scales are stored in the dtype compressed-tensors
gives them (the weights', bf16): its fake quant returns the scale's dtype, so transformers'
loader fails on fp32 scales in a bf16 model (a float32 activation meets a bf16 weight). A bf16
scale is the run's amax / 448 to within 2^-9; vLLM reads it into fp32 exactly.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme
from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization
from compressed_tensors.utils import impl_backend
from compressed_tensors.utils.match import match_name
from safetensors.torch import save_file
from torch import nn

from ..run.manifest import LayerRecord
from . import assemble as export
from .verify import _stored_raw

if TYPE_CHECKING:
    from compressed_tensors.quantization import QuantizationScheme

CT_SUBDIR = "_compressed_tensors"
FP8_MAX = 448.0
# ModelOpt recipe -> (config group, compressed-tensors preset scheme)
GROUPS = {
    "FP8_DEFAULT_CFG": ("fp8_per_tensor", "FP8"),
    "FP8_PER_CHANNEL_PER_TOKEN_CFG": ("fp8_per_channel", "FP8_DYNAMIC"),
}
FUSED = {
    "q_proj": "qkv_proj",
    "k_proj": "qkv_proj",
    "v_proj": "qkv_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
}
# Prefixes of one LM layer across layouts: released `model.`, in-memory `model.language_model.`,
# vLLM `language_model.model.`
LM_PREFIX = r"^(.*\.)?model\.(language_model\.)?"
VISION_IGNORE = r"re:^(model\.)?visual\."
LM_HEAD_IGNORE = r"re:^(.*\.)?lm_head$"
SHARD_BYTES = 5 << 30


def layer_pattern(name: str) -> str:
    """`model.layers.3.mlp.up_proj` -> a `re:` entry matching it in every layout, fused or not."""
    rest = name.removeprefix("model.")
    head, _, proj = rest.rpartition(".")
    alt = f"({re.escape(proj)}|{re.escape(FUSED[proj])})" if proj in FUSED else re.escape(proj)
    return f"re:{LM_PREFIX}{re.escape(head)}\\.{alt}$"


def quantization_config(layers: list[LayerRecord]) -> QuantizationConfig:
    """compressed-tensors' QuantizationConfig for the manifest's per-layer formats."""
    targets: dict[str, list[str]] = {}
    ignore = [VISION_IGNORE, LM_HEAD_IGNORE]
    for row in layers:
        if row.name == "lm_head":
            continue
        if row.format == "FP8":
            targets.setdefault(_recipe(row), []).append(layer_pattern(row.name))
        else:
            ignore.append(layer_pattern(row.name))
    groups = {GROUPS[r][0]: preset_name_to_scheme(GROUPS[r][1], t) for r, t in targets.items()}
    for scheme in groups.values():
        scheme.format = "float-quantized"
        if scheme.input_activations is not None:
            scheme.input_activations.observer = None  # calibration is done; nothing observes
    return QuantizationConfig(
        config_groups=groups, ignore=ignore, format="float-quantized", quantization_status="compressed"
    )


def _recipe(row: LayerRecord) -> str:
    recipe = row.quant_config
    if recipe not in GROUPS:
        raise ValueError(
            f"{row.name}: FP8 recipe {recipe!r} has no compressed-tensors group (known: {', '.join(GROUPS)})"
        )
    return recipe


def _scales_like(module: nn.Linear, scheme: QuantizationScheme) -> dict[str, torch.Tensor]:
    """The scales compressed-tensors gives this layer (its own initialisation, on meta)."""
    holder = nn.Linear(
        module.in_features, module.out_features, bias=False, device="meta", dtype=module.weight.dtype
    )
    initialize_module_for_quantization(holder, scheme, force_zero_point=False)
    return {n: p for n, p in holder.named_parameters() if n.endswith("_scale")}


def scale_of(amax: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """amax / 448 in fp32, then in the shape and dtype compressed-tensors gives the scale."""
    return (amax.detach().float().cpu() / FP8_MAX).reshape(like.shape).to(like.dtype)


@contextlib.contextmanager
def eager_quantize() -> Iterator[None]:
    """compressed-tensors' eager PyTorch quantize (its CT_ENFORCE_EAGER) in this block: the same
    arithmetic on the CPU and on a GPU, where it would otherwise dispatch (on Hopper) to a Triton
    kernel compiled for this use alone."""
    saved = impl_backend.ENFORCE_EAGER
    impl_backend.ENFORCE_EAGER = True
    try:
        yield
    finally:
        impl_backend.ENFORCE_EAGER = saved


@torch.no_grad()
def compressed_layer(module: nn.Module, scheme: QuantizationScheme) -> dict[str, torch.Tensor]:
    """One FP8 layer packed by compressed-tensors' compressor from the run's quantizers, on the
    layer's own device (IEEE division and round-to-nearest-even: the same bytes on the CPU and
    on a GPU)."""
    wq, iq = module.weight_quantizer, module.input_quantizer
    like = _scales_like(module, scheme)
    device = module.weight.device
    # the run's fake quant (codes x scale in bf16), divided in fp32: rounds back to its codes
    state = {
        "weight": wq(module.weight).float(),
        "weight_scale": scale_of(wq.amax, like["weight_scale"]).to(device),
    }
    if "input_scale" in like:
        state["input_scale"] = scale_of(iq.amax, like["input_scale"]).to(device)
    if getattr(module, "bias", None) is not None:
        state["bias"] = module.bias.detach()
    with eager_quantize():
        return FloatQuantizationCompressor.compress(state, scheme)


def fp8_schemes(layers: list[LayerRecord], qcfg: QuantizationConfig) -> dict[str, QuantizationScheme]:
    """{FP8 layer: its compressed-tensors QuantizationScheme}."""
    return {r.name: qcfg.config_groups[GROUPS[r.quant_config][0]] for r in layers if r.format == "FP8"}


def lm_tensors(
    model: nn.Module, layers: list[LayerRecord], qcfg: QuantizationConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the LM under its released name, on the host, in name order; each FP8
    layer compressed when the iteration reaches it, so only the tensors a caller keeps stay."""
    fp8 = fp8_schemes(layers, qcfg)
    modules = dict(model.named_modules())
    tied = getattr(model.config, "tie_word_embeddings", False)
    state = model.state_dict()
    # An FP8 layer's keys all start with "<layer>." and no other key does, so in name order
    # they sit together exactly where "<layer>." sorts among the other keys.
    units = {f"{name}.": name for name in fp8}
    for key in state:
        layer = key.rpartition(".")[0]
        if layer not in fp8 and "_quantizer" not in key and not (tied and key == "lm_head.weight"):
            units[key] = None
    for unit in sorted(units):
        layer = units[unit]
        if layer is None:
            yield unit, state[unit].detach().cpu()
            continue
        packed = compressed_layer(modules[layer], fp8[layer])
        for k in sorted(packed):
            yield f"{layer}.{k}", packed.pop(k).cpu()


def _save_shards(tensors: Iterable[tuple[str, torch.Tensor]], target: Path) -> None:
    """safetensors shards of at most SHARD_BYTES (a larger tensor alone), each written as soon as
    it is full, so the host holds one shard's tensors at a time (and safetensors' copy of their
    bytes while it writes them); an index when there is more than one."""
    parts: list[list[str]] = []
    shard: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        part = target / f".part-{len(parts)}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(part), metadata={"format": "pt"})
        parts.append(list(shard))
        shard.clear()

    for key, tensor in tensors:
        n = tensor.numel() * tensor.element_size()
        if shard and size + n > SHARD_BYTES:
            flush()
            size = 0
        shard[key] = tensor
        size += n
    if shard or not parts:
        flush()
    names = (
        ["model.safetensors"]
        if len(parts) == 1
        else [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    )
    for i, name in enumerate(names):
        os.replace(target / f".part-{i}.safetensors", target / name)
    if len(parts) > 1:
        (target / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {k: n for keys, n in zip(parts, names) for k in keys}})
        )


def write_checkpoint(
    model: nn.Module, layers: list[LayerRecord], base_dir: Path, out: Path, lm_only: bool
) -> dict:
    """The compressed-tensors checkpoint in `out`; returns config.json's quantization_config."""
    qcfg = quantization_config(layers)
    work = out / CT_SUBDIR
    work.mkdir()
    _save_shards(lm_tensors(model, layers, qcfg), work)
    export.assemble(base_dir, work, out, lm_only)
    shutil.rmtree(work)
    if lm_only:  # the text-only Qwen2 config is the only truthful one for an LM alone
        model.config.to_json_file(out / "config.json")
    else:
        shutil.copyfile(base_dir / "config.json", out / "config.json")
    ModelCompressor(quantization_config=qcfg).update_config(str(out))
    for name in export.BASE_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out / name)
    return json.loads((out / "config.json").read_text(encoding="utf-8"))["quantization_config"]


def declared(qcfg: dict, names: list[str]) -> dict:
    """The config's per-layer formats as export_verify.check_formats reads them (ModelOpt's
    MIXED_PRECISION shape: {layer: quant_algo}, unquantized layers absent)."""
    algo = {
        g: "FP8" if g == GROUPS["FP8_DEFAULT_CFG"][0] else "FP8_PER_CHANNEL_PER_TOKEN"
        for g in qcfg["config_groups"]
    }
    layers = {}
    for name in names:
        if any(match_name(name, t) for t in qcfg.get("ignore") or []):
            continue
        group = next(
            (g for g, s in qcfg["config_groups"].items() if any(match_name(name, t) for t in s["targets"])),
            None,
        )
        if group is not None:
            layers[name] = {"quant_algo": algo[group]}
    return {"quantization": {"quant_algo": "MIXED_PRECISION", "quantized_layers": layers}}


def layouts(name: str) -> list[str]:
    """One LM layer's name in the released layout, transformers' modules and vLLM's, plus the
    fused name engines load it under."""
    rest = name.removeprefix("model.")
    names = [name, f"model.language_model.{rest}", f"language_model.model.{rest}"]
    head, _, proj = name.rpartition(".")
    return names + ([f"{head}.{FUSED[proj]}"] if proj in FUSED else [])


def check_names(qcfg: dict, layers: list[LayerRecord]) -> dict:
    """Every layer is matched as the manifest says under every naming a loader uses: FP8 layers
    by their group's targets and not by `ignore`, BF16 layers, lm_head and the vision tower by
    `ignore`."""
    ignore = qcfg.get("ignore") or []
    errors = []
    for row in layers:
        if row.name == "lm_head":
            continue
        want = GROUPS[row.quant_config][0] if row.format == "FP8" else None
        for name in layouts(row.name):
            ignored = any(match_name(name, t) for t in ignore)
            groups = [
                g for g, s in qcfg["config_groups"].items() if any(match_name(name, t) for t in s["targets"])
            ]
            if (want is None) != ignored or (want is not None and groups != [want]):
                errors.append(f"{name}: targets {groups}, ignored {ignored}; manifest {want or 'BF16'}")
    for name in (
        "lm_head",
        "language_model.lm_head",
        "visual.blocks.0.attn.qkv",
        "model.visual.blocks.0.attn.qkv",
        "visual.merger.mlp.0",
    ):
        if not any(match_name(name, t) for t in ignore):
            errors.append(f"{name}: not in ignore")
    return {"passed": not errors, "layers": len(layers), "errors": errors[:20]}


def check_scales(out: Path, amax: dict[str, torch.Tensor], weight_amax: dict[str, torch.Tensor]) -> dict:
    """Every stored scale is the run's amax / 448 in the dtype it is stored in (bf16)."""
    errors, counts = [], {}
    for kind, run in (("input_scale", amax), ("weight_scale", weight_amax)):
        stored = _stored_raw(out, f".{kind}")
        counts[f"{kind}s"] = len(stored)
        for layer, s in stored.items():
            want = run.get(layer)
            if want is None or want.numel() != s.numel() or not torch.equal(scale_of(want, s), s):
                errors.append(f"{layer}: {kind} is not the run's amax / 448 in {s.dtype}")
    return {"passed": not errors, **counts, "errors": errors[:20]}
