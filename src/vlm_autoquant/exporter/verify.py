"""The export's checks: (a) formats, (b) vision bytes, (c) numerics, (d) loadability.

(c) reads the exported safetensors by its own path: FP8 codes are dequantized and the inputs of
each FP8 layer quantized from their stored scales (dynamic per token where no `input_scale` is
stored). Its logits are compared with the restored fake-quant model's on held-out captions,
twice:
- in the arithmetic of the fake quant the run used (x * 448 / amax, `fp8_kernel`), with the
  run's amax, which `check_scales` ties to the stored scales: the check, KL <= 1e-4. It is 0.0
  when every exported byte and scale is the run's;
- in a serving kernel's arithmetic (x * 1 / scale, codes x weight_scale): reported, not
  checked. The two break exact E4M3 rounding ties of bf16 activations differently (about one
  value in a hundred), which no export can change; a random-init 36-layer 3B amplifies that to
  KL ~1e-3 to 2e-3.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoTokenizer, PretrainedConfig, Qwen2_5_VLForConditionalGeneration, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from ..core.artifacts import sha256_file
from ..model.checkpoint import VISION_RE
from ..model.demo import make_captions
from ..model.fused import fused_layer_groups
from ..model.identity import shard_layout, tensor_digests, weight_files
from ..plan.calib_data import load_captions, pack, split_captions
from ..run.manifest import Manifest
from ..search.fp8_kernel import FP8_MAX, divides, e4m3_codes, fake_quant, fake_quant_scale, weight_codes
from .assemble import vision_name

log = logging.getLogger(__name__)
KL_LIMIT = 1e-4
# The served arithmetic (x * 1/input_scale, codes * weight_scale) rounds exact E4M3 ties of bf16
# activations differently from the fake quant, so it cannot match the run bit for bit. Its
# distance from the run's model is bounded by the run's own distance from BF16 (what the
# quantization itself costs), and never below a floor that covers last-bit differences growing
# through deep random-init models; a wrong scale or code costs orders of magnitude more.
ENGINE_KL_FACTOR = 1.0
ENGINE_KL_FLOOR = 5e-3
HOLDOUT_BATCHES = 2  # held-out batches for the numerics check (the scheme's batch shape)
SCALE_SUFFIXES = ("weight_scale", "input_scale", "weight_scale_2", "k_scale", "v_scale")


def algo_of(quant_config: str | None) -> str | None:
    """ModelOpt recipe name -> the quant_algo its export records (FP8_DEFAULT_CFG -> FP8)."""
    if not quant_config:
        return None
    return quant_config.removesuffix("_CFG").removesuffix("_DEFAULT")


def stored_algos(hf_quant: dict, names: list[str]) -> dict[str, str | None]:
    """quant_algo each LM linear is declared with in hf_quant_config.json (None = unquantized)."""
    q = hf_quant["quantization"]
    if q.get("quant_algo") == "MIXED_PRECISION":
        layers = q.get("quantized_layers", {})
        return {n: layers.get(n, {}).get("quant_algo") for n in names}
    excluded = q.get("exclude_modules") or []
    return {n: None if any(fnmatch.fnmatch(n, p) for p in excluded) else q.get("quant_algo") for n in names}


def check_formats(manifest: Manifest, out: Path, hf_quant: dict) -> dict:
    """(a) every LM linear is stored, and declared, in the format the manifest says."""
    tensors = {k: v for f in weight_files(out) for k, v in shard_layout(f).items()}
    rows = manifest.layers
    declared = stored_algos(hf_quant, [r.name for r in rows])
    errors = []
    for r in rows:
        name, want = r.name, algo_of(r.quant_config) if r.format == "FP8" else None
        w = tensors.get(f"{name}.weight")
        if w is None:
            if not (name == "lm_head" and want is None):  # a tied BF16 head is stored once
                errors.append(f"{name}: no weight stored")
            continue
        if declared[name] != want:
            errors.append(f"{name}: declared {declared[name]}, manifest {want}")
        dtype = w[0]
        if want is None and dtype != "BF16":
            errors.append(f"{name}: stored {dtype}, manifest BF16")
        if want is not None and (dtype != "F8_E4M3" or f"{name}.weight_scale" not in tensors):
            errors.append(f"{name}: stored {dtype} without weight_scale, manifest {want}")
        if want == "FP8" and f"{name}.input_scale" not in tensors:
            errors.append(f"{name}: FP8 per-tensor layer without input_scale")
    fp8 = sum(r.format == "FP8" for r in rows)
    return {
        "passed": not errors,
        "layers": len(rows),
        "fp8": fp8,
        "bf16": len(rows) - fp8,
        "errors": errors[:20],
    }


def check_vision(base_dir: Path, out: Path) -> dict:
    """(b) every vision tensor's bytes equal the base's (sha256 per tensor)."""
    base = {
        vision_name(k.split(":", 1)[0]) + ":" + k.split(":", 1)[1]: d
        for k, d in tensor_digests(base_dir, lambda n: bool(VISION_RE.match(n))).items()
    }
    got = tensor_digests(out, lambda n: bool(VISION_RE.match(n)))
    differ = sorted(k for k in base if got.get(k) != base[k])
    extra = sorted(set(got) - set(base))
    return {
        "passed": bool(base) and not differ and not extra,
        "tensors": len(base),
        "differ": differ[:20],
        "unexpected": extra[:20],
    }


def _e4m3_engine(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A serving kernel's static or dynamic FP8 input: x * (1 / scale) to E4M3, times scale."""
    return (e4m3_codes(x, 1.0 / scale).float() * scale).to(x.dtype)


def _input_quant_hook(
    scale: torch.Tensor | None,
    arithmetic: str,
    amax: torch.Tensor | None = None,
    run_kernel: str | None = None,
):
    """Quantize a layer's input from its stored `input_scale` (None: dynamic per token).

    `arithmetic` "modelopt" rounds as the run's fake quant did (448 / amax; `amax` when given,
    else 448 x scale), "engine" as a serving kernel does (1 / scale). They differ at exact E4M3
    rounding ties, which bf16 activations hit about once in a hundred values.
    """

    def hook(_module, args):
        x = args[0]
        if scale is None:  # dynamic: each token's own amax
            a = x.abs().amax(dim=-1, keepdim=True).float()
            q = (
                fake_quant(x, a, divides(run_kernel, a))
                if arithmetic == "modelopt"
                else _e4m3_engine(x, a.clamp(min=1e-12) / FP8_MAX)
            )
        elif arithmetic == "modelopt":
            a = amax if amax is not None else scale * FP8_MAX
            q = fake_quant(x, a, divides(run_kernel, a))
        else:
            q = _e4m3_engine(x, scale)
        return (q, *args[1:])

    return hook


class ExportedLM:
    """The export's LM tensors (the vision tower left out), each read once from its shard, in
    its stored dtype, on one device: what the checks that read the LM share.

    Every function that reads the LM takes this or the export's directory; a directory is read
    on its own, tensor by tensor, as each check needs it."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    @classmethod
    def read(cls, out: Path, device: torch.device) -> ExportedLM:
        """Every LM tensor of the export in `out`, loaded straight onto `device`."""
        return cls(dict(_named(out, lambda k: True, device)))


def _named(
    out: Path | ExportedLM, keep: Callable[[str], bool], device: torch.device | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for the export's LM tensors whose name `keep` accepts, shard by shard in
    the shards' key order; from a directory only those are read (on `device`, default CPU)."""
    if isinstance(out, ExportedLM):
        yield from ((k, t) for k, t in out.tensors.items() if keep(k))
        return
    for f in weight_files(out):
        with safe_open(str(f), framework="pt", device=str(device or "cpu")) as st:
            for k in st.keys():
                if keep(k) and not VISION_RE.match(k):
                    yield k, st.get_tensor(k)


def _dequantized_state(
    out: Path | ExportedLM, weight_amax: dict[str, torch.Tensor] | None = None, run_kernel: str | None = None
) -> tuple[dict, dict]:
    """The export's LM tensors, FP8 weights dequantized to bf16; layer -> input_scale.

    A layer in `weight_amax` (the run's weight amax) is dequantized as the fake quant does,
    codes x 1 / (448 / amax); any other as a serving engine does, codes x weight_scale. The two
    multipliers differ in the last fp32 bit for about a third of the layers, which moves about
    one layer in a hundred one bf16 ulp; `check_scales` proves weight_scale is amax / 448.
    The dequantization runs where the tensors are; an `ExportedLM` is left as it was read.
    """
    state, fp8 = dict(_named(out, lambda k: True)), {}
    for k in [k for k in state if k.endswith(".weight_scale")]:
        layer = k.removesuffix(".weight_scale")
        w, s = state[f"{layer}.weight"].float(), state.pop(k).float()
        amax = (weight_amax or {}).get(layer)
        if amax is not None:  # the multiplier in the fake quant's arithmetic, on the host as it was made
            s = (1 / fake_quant_scale(amax, divides(run_kernel, amax))).to(w.device)
        state[f"{layer}.weight"] = (w * (s.reshape(-1, 1) if s.numel() > 1 else s.reshape(()))).to(
            torch.bfloat16
        )
        fp8[layer] = state.pop(f"{layer}.input_scale", None)
    return state, fp8


@dataclass(frozen=True)
class RunScales:
    """What the run's own fake quant rounded with: its calibrated amax per layer (inputs and
    weights; `quantizer_amax`) and its kernel (the manifest's `search.fp8_kernel`)."""

    input_amax: dict[str, torch.Tensor] = field(default_factory=dict)
    weight_amax: dict[str, torch.Tensor] = field(default_factory=dict)
    kernel: str | None = None


def dequantized_lm(
    out: Path | ExportedLM,
    cfg: PretrainedConfig,
    device: torch.device,
    arithmetic: str = "modelopt",
    reference: nn.Module | None = None,
    run: RunScales | None = None,
) -> nn.Module:
    """The exported LM rebuilt from its safetensors alone, FP8 applied by hand (not ModelOpt).

    `out`: the export's directory (read onto `device`) or its `ExportedLM`, which is not
    changed: the model's BF16 tensors are its tensors, the FP8 weights new ones.
    `run.input_amax` (layer -> the run's input amax) lets the "modelopt" arithmetic use the
    run's exact amax, which 448 x input_scale does not give back bit for bit for about 7% of
    values; `run.weight_amax` does the same for the weights' dequantization
    (`_dequantized_state`), and `run.kernel` picks how 448 / amax is rounded; `check_scales`
    proves each stored scale is that amax / 448. `reference` gives the buffers no checkpoint
    holds (RoPE's inverse frequencies): built here they would be computed on `device` (CUDA's
    pow is not correctly rounded, and one ulp in RoPE moves a random-init 36-layer model's
    logits by KL ~2e-3), so they are taken from the restored model instead.
    """
    run = run or RunScales()
    exported = out if isinstance(out, ExportedLM) else ExportedLM.read(out, device)
    state, fp8 = _dequantized_state(exported, run.weight_amax, run.kernel)
    model = _lm_of(cfg, state, device)
    if reference is not None:
        theirs = dict(reference.named_buffers())
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name not in state and name in theirs and theirs[name].shape == buf.shape:
                    buf.copy_(theirs[name])
    modules = dict(model.named_modules())
    for layer, s in fp8.items():
        run_amax = run.input_amax.get(layer) if s is not None else None
        modules[layer].register_forward_pre_hook(
            _input_quant_hook(
                None if s is None else s.float().to(device),
                arithmetic,
                None if run_amax is None else run_amax.float().to(device),
                run.kernel,
            )
        )
    return model.eval()


def _lm_of(cfg: PretrainedConfig, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    """A Qwen2 LM whose parameters are `state`'s tensors (in the parameters' dtype, bf16), its
    buffers (fp32 RoPE, as loaded) computed on `device`; no weight is initialised or copied."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with init_empty_weights(include_buffers=False), torch.device(device):
            model = Qwen2ForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    params = model.state_dict()
    state = {k: v.to(device, params[k].dtype) if k in params else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(
            f"exported LM does not fit its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


def quantizer_amax(reference: nn.Module, which: str) -> dict[str, torch.Tensor]:
    """The restored run's calibrated amax per layer, of its "input" or "weight" quantizer
    (static ones only: a dynamic quantizer keeps none)."""
    out = {}
    for name, m in reference.named_modules():
        q = getattr(m, f"{which}_quantizer", None)
        if q is not None and q.is_enabled and getattr(q, "amax", None) is not None:
            a = q.amax.detach().float().cpu()
            out[name] = a.reshape(()) if a.numel() == 1 else a.reshape(-1)
    return out


def _stored_raw(out: Path | ExportedLM, suffix: str) -> dict[str, torch.Tensor]:
    """{layer: tensor} of the LM tensors named `<layer><suffix>`, in their stored dtype."""
    return {k.removesuffix(suffix): t for k, t in _named(out, lambda k: k.endswith(suffix))}


def _stored(out: Path | ExportedLM, suffix: str) -> dict[str, torch.Tensor]:
    """As `_stored_raw`, in fp32 on the host, beside the run's amax."""
    return {k: v.float().cpu() for k, v in _stored_raw(out, suffix).items()}


def _scale_errors(kind: str, stored: dict[str, torch.Tensor], amax: dict[str, torch.Tensor]) -> list[str]:
    errors = []
    for layer, s in stored.items():
        want = amax.get(layer)
        if want is None:
            errors.append(f"{layer}: {kind} stored, no calibrated amax in the run")
        elif s.numel() != want.numel() or not torch.allclose(
            s.reshape(want.shape), want / FP8_MAX, rtol=2.5e-7, atol=0
        ):
            errors.append(
                f"{layer}: {kind} {s.flatten()[0].item():.9g}, run amax/448 "
                f"{(want / FP8_MAX).flatten()[0].item():.9g}"
            )
    return errors


def check_scales(
    out: Path | ExportedLM, amax: dict[str, torch.Tensor], weight_amax: dict[str, torch.Tensor] | None = None
) -> dict:
    """Every stored static input_scale (and, given the run's weight amax, every weight_scale) is
    the run's amax / 448 (to fp32 rounding)."""
    inputs = _stored(out, ".input_scale")
    errors = _scale_errors("input_scale", inputs, amax)
    result = {"input_scales": len(inputs)}
    if weight_amax is not None:
        weights = _stored(out, ".weight_scale")
        errors += _scale_errors("weight_scale", weights, weight_amax)
        result["weight_scales"] = len(weights)
    return {"passed": not errors, **result, "errors": errors[:20]}


# A weight's amax against the weight itself. ModelOpt's max calibration sets it to max|w| (of
# the tensor, or of each output channel), so a run's amax/max|w| is 1. A factor of 2 either way
# is one binade of E4M3: above it the top binade of codes is never used (a bit lost on every
# weight), below it more than half of the largest weights are clipped. Calibration never gives
# either, and other weights of the same model (--allow-other-weights) move max|w| far less.
WEIGHT_AMAX_RATIO = (0.5, 2.0)
# An input amax has no tensor to compare with, only the number formats: a static scale
# amax / 448 must be a normal fp32 number, and no bf16 activation exceeds bf16's largest value.
INPUT_AMAX_RANGE = (FP8_MAX * torch.finfo(torch.float32).tiny, torch.finfo(torch.bfloat16).max)


def _weight_amax_errors(
    name: str, amax: torch.Tensor, weight: torch.Tensor, group_max: torch.Tensor | None = None
) -> list[str]:
    """`group_max`: max|w| over the fused group of a per-tensor weight (`_fused_weight_max`),
    the amax a `fused_scales: shared-max` run gives every member; the weight's own max|w| is
    the per-module one."""
    amax = amax.detach().float().reshape(-1).cpu()
    w = weight.detach().abs()  # on its device, in its dtype: a max is exact in any of them
    w_max = (w.amax().reshape(1) if amax.numel() == 1 else w.reshape(amax.numel(), -1).amax(-1)).float().cpu()
    if group_max is not None and amax.numel() == 1 and bool(group_max > 0):
        shared = amax / group_max.float().cpu().reshape(1)
        if WEIGHT_AMAX_RATIO[0] <= shared.item() <= WEIGHT_AMAX_RATIO[1]:
            w_max = group_max.float().cpu().reshape(1)
    if not bool(torch.isfinite(amax).all()) or bool((amax <= 0).any()):
        return [
            f"{name}: weight amax {amax.min().item():.6g}..{amax.max().item():.6g} is not a "
            "finite positive number"
        ]
    live = w_max > 0  # an all-zero channel codes as 0 whatever its scale
    ratio = amax[live] / w_max[live]
    lo, hi = WEIGHT_AMAX_RATIO
    if ratio.numel() and (ratio.min() < lo or ratio.max() > hi):
        worst = ratio.max() if ratio.max() > hi else ratio.min()
        return [
            f"{name}: weight amax is {worst.item():.6g} x max|weight| (calibration gives 1; "
            f"plausible {lo:g}..{hi:g})"
        ]
    return []


def _fused_weight_max(reference: nn.Module) -> dict[str, torch.Tensor]:
    """{layer: max|w| over its fused group} for the groups (q/k/v, gate/up) whose members all
    hold a per-tensor weight amax."""
    modules = dict(reference.named_modules())
    out = {}
    for group in fused_layer_groups(list(modules)):
        quantizers = [getattr(modules[n], "weight_quantizer", None) for n in group]
        if all(
            q is not None and q.is_enabled and getattr(q, "amax", None) is not None and q.amax.numel() == 1
            for q in quantizers
        ):
            top = torch.stack([modules[n].weight.detach().abs().amax().float().cpu() for n in group]).max()
            out.update(dict.fromkeys(group, top))
    return out


def implausible_scales(reference: nn.Module) -> list[str]:
    """Every static amax of the restored run, checked against what could have produced it:
    weight amax against max|w| (WEIGHT_AMAX_RATIO), input amax against the number formats
    (INPUT_AMAX_RANGE). Both must be finite and positive."""
    errors = []
    group_max = _fused_weight_max(reference)
    for name, m in reference.named_modules():
        wq, iq = getattr(m, "weight_quantizer", None), getattr(m, "input_quantizer", None)
        if wq is not None and wq.is_enabled and getattr(wq, "amax", None) is not None:
            errors += _weight_amax_errors(name, wq.amax, m.weight, group_max.get(name))
        if iq is not None and iq.is_enabled and getattr(iq, "amax", None) is not None:
            a = iq.amax.detach().float().cpu()
            lo, hi = INPUT_AMAX_RANGE
            if not bool(torch.isfinite(a).all()) or bool((a < lo).any()) or bool((a > hi).any()):
                errors.append(
                    f"{name}: input amax {a.min().item():.6g}..{a.max().item():.6g} "
                    f"is outside {lo:.3g}..{hi:.3g} (finite, positive, bf16)"
                )
    return errors


@torch.no_grad()
def check_weight_codes(out: Path | ExportedLM, reference: nn.Module) -> dict:
    """Every stored FP8 weight holds, byte for byte, the E4M3 codes of ModelOpt's own fake quant
    of the base weight (the reference's weight quantizer, run here in the run's arithmetic):
    the weights the search scored and the run evaluated. The codes are read back from the fake
    quant's output, codes x 1 / scale in bf16, which keeps them apart: neighbouring E4M3 codes
    are at least 1/16 apart, bf16 rounding moves a value by at most 1/512."""
    modules = dict(reference.named_modules())
    layers = [k.removesuffix(".weight_scale") for k, _ in _named(out, lambda k: k.endswith(".weight_scale"))]
    wanted = set(layers)
    stored = dict(_named(out, lambda k: k.endswith(".weight") and k.removesuffix(".weight") in wanted))
    checked = differ = 0
    errors = []
    for layer in layers:
        m = modules.get(layer)
        q = getattr(m, "weight_quantizer", None)
        if q is None or getattr(q, "amax", None) is None:
            errors.append(f"{layer}: FP8 in the export, no calibrated weight in the run")
            continue
        got = stored.get(f"{layer}.weight")
        if got is None:
            errors.append(f"{layer}: weight_scale stored without its weight")
            continue
        want = weight_codes(q(m.weight), q.amax.detach())
        checked += 1
        n = int((got.to(want.device).view(torch.uint8) != want.view(torch.uint8)).sum())
        if n:
            differ += 1
            errors.append(f"{layer}: {n} of {got.numel()} codes differ from the run's")
    return {
        "passed": not errors and checked > 0,
        "layers": checked,
        "layers_differing": differ,
        "errors": errors[:20],
    }


def held_out_batches(manifest: Manifest, tokenizer_dir: Path) -> tuple[list[dict], str]:
    """The run's held-out captions when its caption file is here (same split), else generated."""
    s, cal = manifest.scheme, manifest.calibration
    path, captions = Path(cal.file), []
    if path.is_file() and sha256_file(path) == cal.sha256:
        split = split_captions(load_captions(path), s.num_calib_samples, max(s.num_eval_samples, 1), s.seed)
        captions, source = split.eval, f"held-out split of {path} (seed {s.seed})"
    if not captions:
        captions, source = (
            make_captions(512, seed=s.seed + 7),
            "generated captions (the run's caption file is not on this machine)",
        )
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    packed = pack(tok, captions, s.seq_len, s.batch_size, s.seed)
    return packed.batches[:HOLDOUT_BATCHES], source


@dataclass
class HeldOut:
    """The held-out batches (`held_out_batches`) and the restored run's logits on each, filled by
    the first comparison and reused by every later one with the same reference."""

    batches: list[dict]
    source: str
    reference_logits: list[torch.Tensor] = field(default_factory=list)


def engine_kl_limit(run_kl: float | None) -> float:
    """The largest KL(run's model || served arithmetic) the export accepts (see ENGINE_KL_*)."""
    return max(ENGINE_KL_FACTOR * run_kl, ENGINE_KL_FLOOR) if run_kl is not None else ENGINE_KL_FLOOR


@torch.inference_mode()
def compare_logits(
    reference: nn.Module,
    candidate: nn.Module,
    batches: list[dict],
    device: torch.device,
    reference_logits: list[torch.Tensor] | None = None,
) -> dict:
    """Mean per-token KL(reference || candidate) and top-1 agreement over real tokens.

    `reference_logits`: the reference's logits on these batches, one per batch, as far as
    computed: a batch not yet in it is run and appended, so several candidates compared with
    one reference on the same batches run the reference once per batch."""
    kl_sum = agree = tokens = 0.0
    for i, b in enumerate(batches):
        kw = dict(
            input_ids=b["input_ids"].to(device), position_ids=b["position_ids"].to(device), use_cache=False
        )
        if reference_logits is not None and i < len(reference_logits):
            ref = reference_logits[i]
        else:
            ref = reference(**kw).logits
            if reference_logits is not None:
                reference_logits.append(ref)
        cand = candidate(**kw).logits
        for r in range(ref.shape[0]):
            lp_r, lp_c = F.log_softmax(ref[r].float(), -1), F.log_softmax(cand[r].float(), -1)
            mask = b["real"][r].to(device)
            kl_sum += (lp_r.exp() * (lp_r - lp_c)).sum(-1)[mask].sum().item()
            agree += (lp_r.argmax(-1) == lp_c.argmax(-1))[mask].sum().item()
            tokens += mask.sum().item()
    kl = max(kl_sum / tokens, 0.0) if tokens else float("nan")
    return {
        "passed": tokens > 0 and kl <= KL_LIMIT,
        "kl_mean": kl,
        "kl_limit": KL_LIMIT,
        "top1_agreement": agree / tokens if tokens else float("nan"),
        "tokens": int(tokens),
    }


@torch.inference_mode()
def first_divergence(
    reference: nn.Module, candidate: nn.Module, batch: dict, device: torch.device
) -> dict | None:
    """Where the candidate's computation first leaves the reference's, for a failed numerics
    check: the first module (in the reference's execution order, among the modules both have)
    whose output is not bit-identical, with its largest difference. None if none differs."""
    outputs: dict[str, dict[str, torch.Tensor]] = {"ref": {}, "cand": {}}
    order: list[str] = []
    names = {n for n, _ in candidate.named_modules()} & {n for n, _ in reference.named_modules()}
    handles = []
    for side, model in (("ref", reference), ("cand", candidate)):
        for name, module in model.named_modules():
            if name and name in names:

                def keep(_m, _a, out, side=side, name=name):
                    t = out[0] if isinstance(out, tuple) else out
                    if isinstance(t, torch.Tensor) and name not in outputs[side]:
                        outputs[side][name] = t.detach()
                        if side == "ref":
                            order.append(name)

                handles.append(module.register_forward_hook(keep))
    try:
        kw = dict(
            input_ids=batch["input_ids"][:1, :64].to(device),  # one row's start is enough
            position_ids=batch["position_ids"][:1, :64].to(device),
            use_cache=False,
        )
        reference(**kw)
        candidate(**kw)
    finally:
        for h in handles:
            h.remove()
    for name in order:
        a, b = outputs["ref"][name], outputs["cand"].get(name)
        if b is not None and a.shape == b.shape and not torch.equal(a, b):
            return {
                "module": name,
                "max_abs_diff": (a.float() - b.float()).abs().max().item(),
                "max_abs": a.float().abs().max().item(),
                "differing_fraction": (a != b).float().mean().item(),
            }
    return None


def check_loadable(out: Path, lm_only: bool) -> dict:
    """(d) transformers builds the model from the export with no missing key (meta device)."""
    cls = Qwen2ForCausalLM if lm_only else Qwen2_5_VLForConditionalGeneration
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its "unknown quantization type modelopt" line is expected
    try:
        _, info = cls.from_pretrained(out, device_map="meta", output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    missing = sorted(info["missing_keys"])
    unexpected = sorted(info["unexpected_keys"])
    odd = [k for k in unexpected if not k.endswith(SCALE_SUFFIXES)]
    return {
        "passed": not missing and not odd,
        "class": cls.__name__,
        "missing": missing[:20],
        "unexpected_non_scale": odd[:20],
        "unexpected_scales": len(unexpected) - len(odd),
    }
