"""Predict the peak GPU memory of each phase of a search before loading (placement.py picks
the batch shape that fits).

Every term is counted from the code path, not fitted (bytes per token unless said otherwise;
T = batch x seq tokens, V = vocab, H = hidden, I = intermediate, kv = KV width):
- weights: bf16 parameters of the layers placed on the device (lm_head separate when untied);
- logits, scoring: the gradient loss keeps bf16 logits (2 B x V) and fp32 log_softmax (4), and
  its backward adds the fp32 nll and log_softmax grads (4 + 4): 14 B x V, on the device where
  the model's outputs land. That is the embeddings' device, not lm_head's: the pipeline puts the
  batches on `next(model.parameters()).device` (embed_tokens), and on a split model accelerate's
  `dispatch_model` gives the top-level module an AlignDevicesHook with io_same_device=True
  (big_modeling.py, hooks.py `attach_align_device_hook_on_blocks`), which sends the outputs back
  to the inputs' device. When lm_head sits elsewhere, its device holds only its own bf16 output
  until that copy is made, and in the backward the bf16 grad of the logits arriving from the
  loss: 2 B x V there, in every phase, transiently;
- layer inputs kept by gradient checkpointing: 2 B x H per layer;
- ModelOpt's gradient searcher (algorithms.py, `auto_quantize_score_estimate_forward`) stores
  Q(Y) - Y of every scored linear, per non-BF16 format, in `module.output_diff_dict`:
  2 B x (q + k + v + o + gate + up + down outputs) = 2 x (3H + 2kv + 2I) per format and layer.
  ModelOpt never frees them (every layer's would still be held at the next step's logits peak);
  autoquant.py frees each module's once its backward has scored it, so with checkpointing only
  the layer being recomputed holds them, and without it every layer does until its backward;
- without checkpointing each layer also keeps its autograd activations, 6 B x I + 14 B x H;
- tied embeddings: the lm_head/embedding weight gradient, V x H bf16, during the backward;
- kl_div scoring: 10 B x V per token where the outputs land, plus the row-chunked KL's
  temporaries, and each layer's kept BF16 output (2 B x H) for the prefix replay (`predict`);
- calibration (forward only): bf16 logits, 2 B x V; evaluation: BF16 and quantized logits
  (4 B x V) plus one row's fp32 log-softmaxes; both where the outputs land;
- the allocator's own workspaces (cuBLAS, rounding): OVERHEAD_GIB per device.
Measured peaks (H200, torch.cuda.max_memory_allocated) are checked in tests/plan/test_memory_plan.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..search.spec import KL_CHUNK_BYTES

GIB = 1024**3
OVERHEAD_GIB = 0.25  # cuBLAS workspaces and allocator rounding (max_memory_allocated counts them)
HEADROOM = 0.90  # use at most 90% of a device: fragmentation and the CUDA context live outside
PHASES = ("load", "calibrate", "score", "evaluate")


@dataclass(frozen=True)
class Dims:
    """The LM dimensions that decide memory (from a Qwen2 text config)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, cfg) -> "Dims":
        return cls(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.vocab_size,
            bool(cfg.tie_word_embeddings),
        )

    @property
    def kv(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    def layer_params(self) -> int:
        h, i, kv = self.hidden, self.intermediate, self.kv
        attn = h * h * 2 + h * kv * 2 + (h + 2 * kv)  # q, o, k, v weights; q/k/v biases
        return attn + 3 * h * i + 2 * h  # MLP and two RMSNorms

    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def total_params(self) -> int:
        head = 0 if self.tied else self.embed_params()
        return self.layers * self.layer_params() + self.embed_params() + head + self.hidden


@dataclass(frozen=True)
class Shape:
    """What a search holds besides the weights: its batch shape and how it scores."""

    batch_size: int
    seq_len: int
    method: str = "gradient"
    grad_checkpointing: bool = True
    num_formats: int = 1  # formats searched besides BF16 (one Q(Y)-Y per format)

    def halved(self) -> "Shape":
        return dataclasses.replace(self, batch_size=self.batch_size // 2)

    def __str__(self) -> str:
        return f"{self.batch_size}x{self.seq_len}"


@dataclass
class Placement:
    """Which device holds the embeddings, each decoder layer, and lm_head (+ final norm)."""

    embed: int
    layers: list[int]
    head: int

    @classmethod
    def single(cls, num_layers: int, device: int = 0) -> "Placement":
        return cls(device, [device] * num_layers, device)

    def devices(self) -> list[int]:
        return sorted({self.embed, self.head, *self.layers})


@dataclass
class Plan:
    """Predicted peak GiB per device and phase for one batch shape."""

    batch_size: int
    seq_len: int
    method: str
    grad_checkpointing: bool
    peaks: dict[int, dict[str, float]]  # device -> phase -> GiB
    capacity: dict[int, float] = field(default_factory=dict)  # device -> usable GiB

    def peak(self, device: int) -> float:
        return max(self.peaks[device].values())

    def fits(self) -> bool:
        return all(self.peak(d) <= self.capacity.get(d, float("inf")) for d in self.peaks)

    def record(self) -> dict:
        """For the manifest: predicted per-device peaks, by phase."""
        return {
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "method": self.method,
            "grad_checkpointing": self.grad_checkpointing,
            "headroom": HEADROOM,
            "predicted_gib": {
                str(d): {k: round(v, 2) for k, v in p.items()} | {"peak": round(self.peak(d), 2)}
                for d, p in self.peaks.items()
            },
            "usable_gib": {str(d): round(c, 2) for d, c in self.capacity.items()},
        }


def predict(
    dims: Dims,
    shape: Shape,
    placement: Placement | None = None,
    capacity: dict[int, float] | None = None,
    freed_diffs: bool = True,
) -> Plan:
    """Peak GiB of every device in each phase (see the module docstring for the terms).

    Args:
        capacity: usable GiB per device, for `Plan.fits`.
        freed_diffs: the driver frees each module's Q(Y)-Y once scored (autoquant.py); False
            models ModelOpt as it is, which keeps every layer's until the next step.
    """
    place = placement or Placement.single(dims.layers)
    peaks = {d: _device_peaks(dims, shape, place, d, freed_diffs) for d in place.devices()}
    return Plan(
        shape.batch_size, shape.seq_len, shape.method, shape.grad_checkpointing, peaks, dict(capacity or {})
    )


def _device_peaks(dims: Dims, shape: Shape, place: Placement, d: int, freed_diffs: bool) -> dict[str, float]:
    """Peak GiB of device `d` in each phase."""
    t, h, v = shape.batch_size * shape.seq_len, dims.hidden, dims.vocab
    n = sum(1 for x in place.layers if x == d)
    w = n * (dims.layer_params() * 2)
    if d == place.embed:
        w += dims.embed_params() * 2
    if d == place.head:
        w += (0 if dims.tied else dims.embed_params() * 2) + h * 2
    # The logits' terms land with the inputs (embed's device); lm_head's own device, when
    # another, holds its bf16 output (forward) or the logits' grad (backward) in passing.
    lands = d == place.embed
    passing = 2 * t * v if d == place.head and place.head != place.embed else 0
    calib = w + (2 * t * v if lands else passing)
    evaluate = w + ((4 * t * v + 5 * 4 * shape.seq_len * v) if lands else passing)
    if shape.method == "gradient":
        kept, held = _gradient_terms(dims, shape, n, freed_diffs)
        score = w + n * kept + held + (14 * t * v if lands else passing)
        if dims.tied and d in (place.embed, place.head):
            score += dims.embed_params() * 2
    else:  # kl_div (forward only; algorithms.py AutoQuantizeKLDivSearcher): the BF16 logits
        # and their fp32 log-probs stay (2 + 4 B); per group the forward ends holding the
        # quantized logits and the real-token copy our forward_step returns (2 + 2), and
        # autoquant.py's row-chunked KL then adds three fp32 temporaries of KL_CHUNK_BYTES.
        # Every decoder layer's BF16 output is kept for the replay (2 B x H per token).
        score = w + n * 2 * h * t + ((10 * t * v + 3 * KL_CHUNK_BYTES) if lands else passing)
    return {
        name: (x / GIB + OVERHEAD_GIB if name != "load" else x / GIB)
        for name, x in zip(PHASES, (w, calib, score, evaluate))
    }


def _gradient_terms(dims: Dims, shape: Shape, n: int, freed_diffs: bool) -> tuple[int, int]:
    """Bytes the gradient scores keep per decoder layer (activations), and the Q(Y)-Y diffs held
    on a device with `n` decoder layers."""
    t, h, i = shape.batch_size * shape.seq_len, dims.hidden, dims.intermediate
    diffs = 2 * (3 * h + 2 * dims.kv + 2 * i) * shape.num_formats * t  # output_diff_dict per layer
    kept = 2 * h * t if shape.grad_checkpointing else (6 * i + 14 * h) * t
    held = diffs if shape.grad_checkpointing and freed_diffs else n * diffs
    return kept, held


def usable(capacities_gib: dict[int, float]) -> dict[int, float]:
    """Per-device usable GiB: total capacity times HEADROOM."""
    return {d: c * HEADROOM for d, c in capacities_gib.items()}


def plan_summary(plan: Plan, dims: Dims | None = None) -> str:
    """A few log lines: the batch shape and each device's predicted peak per phase."""
    head = (
        f"memory plan: {plan.method}, {plan.batch_size}x{plan.seq_len} batches, gradient "
        f"checkpointing {'on' if plan.grad_checkpointing else 'off'}"
    )
    if dims is not None:
        head += f", LM {dims.total_params() * 2 / GIB:.1f} GiB in BF16"
    lines = [head]
    for d, p in plan.peaks.items():
        cap = plan.capacity.get(d)
        phases = ", ".join(f"{k} {v:.1f}" for k, v in p.items())
        lines.append(
            f"  GPU {d}: peak {plan.peak(d):.1f} GiB ({phases})"
            + (f" of {cap:.1f} GiB usable" if cap is not None else "")
        )
    return "\n".join(lines)
