"""Place the LM on one or more GPUs: `--gpus`, `--max-gpu-memory`, `--parallel`.

Two ways to use several GPUs. Replicas (replicas.py): when the whole LM and its activations fit
one GPU, each GPU holds a copy and searches part of the batches, so none waits (the default,
`--parallel auto`, picks them then). Layers: otherwise

the LM is split by whole decoder layers with accelerate's `infer_auto_device_map` on the meta
model (the mechanism transformers and ModelOpt's hf_ptq use). Each device's weight budget leaves
room for what the memory plan says its layers need while scoring, and for the logits where the
plan puts them: the loss terms on the embeddings' device (where accelerate returns the outputs),
lm_head's passing bf16 output on its own. Everything here takes the device list and capacities
as inputs, so it runs on a CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from accelerate import infer_auto_device_map
from torch import nn

from ..core.errors import Problem, Problems, UsageError
from ..model.lm import meta_model
from .memory_plan import GIB, OVERHEAD_GIB, Dims, Placement, Plan, Shape, plan_summary, predict, usable

NO_SPLIT = ["Qwen2DecoderLayer"]
# `--parallel auto` replicates an LM only from this size (BF16 weights): below it, the second
# process's start, the group and the per-module reductions cost what halving the search saves.
# Measured on two H200s, replicas / one GPU or layers, whole process: 3B 1.00 (one scheme) and
# 1.16 (the catalog sweep), 7B 1.02, 32B 0.85 (docs/PERFORMANCE.md).
REPLICAS_MIN_LM_GIB = 24.0
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(GiB|GB|MiB|MB)?\s*$", re.IGNORECASE)
_UNIT = {"gib": 1.0, "gb": 1e9 / GIB, "mib": 1 / 1024, "mb": 1e6 / GIB}


def parse_gpus(text: str | None, available: int, problems: Problems) -> list[int]:
    """`--gpus`: "all", "0,1", or None (= GPU 0 only, the previous behaviour)."""
    if text is None or text.strip() == "":
        return [0] if available else []
    if text.strip().lower() == "all":
        return list(range(available))
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        problems.add("--gpus", f"{text!r} is not a list of GPU indices", "e.g. --gpus 0,1 or all")
        return []
    bad = [i for i in ids if not 0 <= i < available]
    if bad or len(set(ids)) != len(ids) or not ids:
        problems.add(
            "--gpus",
            f"{text!r}: this machine has {available} GPU(s) (0..{available - 1})"
            + (f"; {bad} do not exist" if bad else "; each GPU once"),
            "list visible GPUs, e.g. --gpus 0,1, or --gpus all",
        )
        return []
    return ids


def parse_max_memory(
    text: str | None, gpus: list[int], totals_gib: dict[int, float], problems: Problems
) -> dict[int, float]:
    """`--max-gpu-memory`: one size for every GPU ("120GiB") or one per GPU ("120GiB,100GiB").

    Returns GiB per GPU, never more than the device has; None means the devices' totals.
    """
    if text is None or text.strip() == "":
        return {g: totals_gib[g] for g in gpus}
    parts = [p for p in text.split(",") if p.strip()]
    sizes = []
    for p in parts:
        m = _SIZE.match(p)
        if not m:
            problems.add("--max-gpu-memory", f"{p!r} is not a size", "e.g. 120GiB or 120GiB,100GiB")
            return {}
        sizes.append(float(m.group(1)) * _UNIT[(m.group(2) or "GiB").lower()])
    if len(sizes) == 1:
        sizes = sizes * len(gpus)
    if len(sizes) != len(gpus):
        problems.add(
            "--max-gpu-memory",
            f"{len(sizes)} sizes for {len(gpus)} GPUs {gpus}",
            "give one size for all GPUs or one per GPU in --gpus order",
        )
        return {}
    return {g: min(s, totals_gib[g]) for g, s in zip(gpus, sizes)}


def device_of(device_map: dict[str, int | str], name: str) -> int | str:
    """The device of module `name` under a (possibly compressed) accelerate device_map."""
    best = max(
        (k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None
    )
    if best is None:
        raise KeyError(name)
    return device_map[best]


@dataclass
class LMPlacement:
    """The device_map/max_memory for `from_pretrained`, and the plan they were checked with."""

    device_map: dict[str, int]
    max_memory: dict[int, int]  # bytes of weights accelerate may put on each GPU
    placement: Placement
    plan: Plan
    replicas: tuple[int, ...] = ()  # data-parallel: GPUs each holding the whole LM (rank order)
    note: str = ""  # why several GPUs asked for were not used (logged once per run: families.plan)

    @property
    def mode(self) -> str:
        """ "replicas", "layers" (one LM split across GPUs) or "single" (one GPU)."""
        return "replicas" if self.replicas else "layers" if len(self.placement.devices()) > 1 else "single"

    def record(self) -> dict:
        """For the manifest: `placement` and `memory_plan` (with replicas, every GPU's plan is
        the one shown for the first: each holds the same LM and the same batch shape)."""
        p = self.placement
        return {
            "placement": {
                "mode": self.mode,
                "replicas": list(self.replicas),
                "gpus": list(self.replicas) or p.devices(),
                "embed_tokens": p.embed,
                "lm_head": p.head,
                "device_map": dict(self.device_map),
                "layers": {str(d): [i for i, x in enumerate(p.layers) if x == d] for d in p.devices()},
                "max_memory_weights_gib": {str(d): round(b / GIB, 2) for d, b in self.max_memory.items()},
            },
            "memory_plan": self.plan.record(),
        }

    def summary(self, dims: Dims | None = None) -> str:
        lines = [plan_summary(self.plan, dims)]
        if self.replicas:
            lines.append(
                f"  data-parallel replicas on GPUs {', '.join(map(str, self.replicas))}: "
                f"each holds the whole LM (the plan above, per GPU) and searches "
                f"1/{len(self.replicas)} of the batches"
            )
            return "\n".join(lines)
        for d in self.placement.devices():
            idx = [i for i, x in enumerate(self.placement.layers) if x == d]
            span = f"layers {idx[0]}-{idx[-1]}" if idx else "no layers"
            extra = [
                n
                for n, x in (("embed_tokens", self.placement.embed), ("lm_head", self.placement.head))
                if x == d
            ]
            lines.append(f"  GPU {d}: {span}" + (f" + {', '.join(extra)}" if extra else ""))
        return "\n".join(lines)


@dataclass(frozen=True)
class Devices:
    """Where the LM may go: its meta model and dimensions, the GPUs and their usable GiB."""

    meta: nn.Module
    dims: Dims
    gpus: list[int]
    usable_gib: dict[int, float]


@dataclass(frozen=True)
class PlanRequest:
    """What the flags ask of a placement: the GPUs, their memory, the parallel mode, and the
    search's shape and steps (a batch that does not fit is halved, its steps doubled)."""

    gpus: str | None
    max_memory: str | None
    shape: Shape
    calib_steps: int
    score_steps: int
    parallel: str = "auto"  # "auto" (replicas where the LM fits one GPU, else layers), ...
    # --grad-checkpointing auto: a gradient search scores without checkpointing where the
    # requested batch fits that way (fewer forwards per batch), else with it (`shape` says on).
    checkpointing_auto: bool = False


@contextlib.contextmanager
def _quiet_accelerate() -> Iterator[None]:
    logger = logging.getLogger("accelerate.utils.modeling")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _placement(device_map: dict, num_layers: int, tied: bool) -> Placement:
    layers = [device_of(device_map, f"model.layers.{i}") for i in range(num_layers)]
    return Placement(device_of(device_map, "model.embed_tokens"), layers, device_of(device_map, "lm_head"))


_ELSEWHERE = -1  # a device id no GPU has: where `_reserve` puts the layers


def _reserve(dims: Dims, embed: int, head: int, shape: Shape) -> dict[int, float]:
    """Bytes beyond their weights that the embeddings' and lm_head's devices need for the logits,
    from the plan with every layer elsewhere; one entry when they share a device. (The per-device
    overhead is left out: the layers' activation share already counts it.)"""
    plan = predict(dims, shape, Placement(embed, [_ELSEWHERE] * dims.layers, head))
    return {d: (plan.peak(d) - plan.peaks[d]["load"] - OVERHEAD_GIB) * GIB for d in {embed, head}}


def _device_map(
    devices: Devices,
    shape: Shape,
    w_layer: float,
    act_layer: float,
    reserve: Callable[[int, int], dict[int, float]],
) -> tuple[dict, dict[int, int], Placement]:
    """accelerate's device map with each GPU's weight budget shrunk by its layers' activations
    and by `reserve(embed, head)` on the devices of the embeddings and lm_head, balanced first,
    packed if balancing leaves no room. accelerate fills the GPUs in order, so the embeddings
    are assumed on the first and lm_head on the last until the map says otherwise."""
    meta, dims, gpus, usable_gib = devices.meta, devices.dims, devices.gpus, devices.usable_gib
    ends = (gpus[0], gpus[0] if dims.tied else gpus[-1])
    even = dims.total_params() * 2 / len(gpus) + 2 * w_layer  # balanced, like "balanced" maps
    for _ in range(len(gpus)):
        extra = reserve(*ends)
        for cap in (even, float("inf")):  # balanced first; packed if balancing leaves no room
            budget = {}
            for g in gpus:
                room = usable_gib[g] * GIB - extra.get(g, 0.0)
                budget[g] = max(int(min(room * w_layer / (w_layer + act_layer), cap)), 0)
            with _quiet_accelerate():  # it warns that the (absent) CUDA devices are not visible
                dmap = infer_auto_device_map(
                    meta,
                    max_memory={**budget, "cpu": 0},
                    no_split_module_classes=NO_SPLIT,
                    dtype=torch.bfloat16,
                )
            if all(isinstance(v, int) for v in dmap.values()):
                break
        else:
            raise UsageError(
                Problem(
                    "--gpus",
                    f"the LM ({dims.total_params() * 2 / GIB:.1f} GiB in BF16) plus its "
                    f"activations at {shape} do not fit GPUs {gpus} "
                    f"({', '.join(f'{usable_gib[g]:.0f}' for g in gpus)} GiB usable)",
                    "use more GPUs (--gpus), a smaller --batch-size, or --grad-checkpointing on",
                )
            )
        if dims.tied:  # one weight: lm_head must live with the embeddings
            dmap["lm_head"] = device_of(dmap, "model.embed_tokens")
        p = _placement(dmap, dims.layers, dims.tied)
        if (p.embed, p.head) == ends:
            break
        ends = (p.embed, p.head)
    return dmap, budget, p


def place(devices: Devices, shape: Shape) -> LMPlacement:
    """Split the meta LM over the GPUs by whole layers, leaving each room for its activations.

    Raises UsageError when the weights plus activations do not fit the usable memory.
    """
    dims, gpus, usable_gib = devices.dims, devices.gpus, devices.usable_gib
    if len(gpus) == 1:
        g = gpus[0]
        plan = predict(dims, shape, Placement.single(dims.layers, g), usable_gib)
        return LMPlacement({"": g}, {g: int(usable_gib[g] * GIB)}, Placement.single(dims.layers, g), plan)
    # Per-layer activation bytes, from a plan with the layers alone on one device.
    w_layer = dims.layer_params() * 2
    no_ends = predict(dims, shape, Placement(1, [0] * dims.layers, 1))
    act_layer = (no_ends.peaks[0]["score"] - no_ends.peaks[0]["load"]) * GIB / dims.layers

    def reserve(embed: int, head: int) -> dict[int, float]:
        return _reserve(dims, embed, head, shape)

    dmap, budget, p = _device_map(devices, shape, w_layer, act_layer, reserve)
    return LMPlacement(dict(dmap), budget, p, predict(dims, shape, p, usable_gib))


def plan_run(
    devices: Devices, shape: Shape, calib_steps: int, score_steps: int
) -> tuple[LMPlacement, int, int]:
    """The largest batch (halving, steps doubled to keep the tokens) whose placement fits.

    Returns (placement, calib_steps, score_steps); raises UsageError with the figures if none.
    """
    usable_gib, first, scale, first_error = devices.usable_gib, shape, 1, None
    while shape.batch_size >= 1:
        try:
            lp = place(devices, shape)
            if lp.plan.fits():
                return lp, calib_steps * scale, score_steps * scale
            worst = max(lp.plan.peaks, key=lambda d: lp.plan.peak(d) - usable_gib[d])
            err = UsageError(
                Problem(
                    "--batch-size",
                    f"at {shape} the {shape.method} search needs "
                    f"{lp.plan.peak(worst):.1f} GiB on GPU {worst}, which has "
                    f"{usable_gib[worst]:.1f} GiB usable",
                    "",
                )
            )
        except UsageError as exc:
            err = exc
        first_error = first_error or err
        if shape.batch_size % 2:
            break
        shape, scale = shape.halved(), scale * 2
    fixes = "use more GPUs (--gpus), a smaller --batch-size"
    fixes += "" if first.grad_checkpointing else ", or --grad-checkpointing on"
    msg = "; ".join(p.message for p in first_error.problems)
    raise UsageError(Problem("--batch-size", f"nothing fits down to {shape}: {msg}", fixes))


def plan_replicas(
    devices: Devices, shape: Shape, calib_steps: int, score_steps: int, explicit: bool
) -> tuple[LMPlacement, int, int] | None:
    """One whole LM per GPU, the plan of one GPU (the smallest usable memory) for each.

    `--parallel auto` (explicit False) takes replicas only where the LM and the requested batch
    fit one GPU, the LM is large enough to gain (REPLICAS_MIN_LM_GIB) and every replica gets at
    least one calibration and one score step. Where they fit but the LM is smaller, or a replica
    would get no step (kl_div's single score batch), the first GPU searches alone (a sweep runs
    such searches after the replicated ones, sweep.py); where they do not fit, it returns None
    (the layers are split instead). `--parallel replicas` may halve the batch like a single GPU
    would, and raises UsageError with the figures when replicas cannot work.
    """
    gpus, dims = devices.gpus, devices.dims
    world, first = len(gpus), gpus[0]
    one = dataclasses.replace(
        devices, gpus=[first], usable_gib={first: min(devices.usable_gib[g] for g in gpus)}
    )
    if explicit:
        lp, calib_steps, score_steps = plan_run(one, shape, calib_steps, score_steps)
    else:
        lp = place(one, shape)
        if not lp.plan.fits():
            return None
        lm_gib = dims.total_params() * 2 / GIB
        if lm_gib < REPLICAS_MIN_LM_GIB:
            note = (
                f"the LM ({lm_gib:.1f} GiB) searches on GPU {first} alone: replicas pay from "
                f"{REPLICAS_MIN_LM_GIB:g} GiB (docs/PERFORMANCE.md); --parallel replicas "
                "forces them"
            )
            return dataclasses.replace(lp, note=note), calib_steps, score_steps
    if min(calib_steps, score_steps) < world:
        if not explicit:
            return lp, calib_steps, score_steps  # one GPU, the one rank 0 of replicas holds
        raise UsageError(
            Problem(
                "--parallel",
                f"replicas on {world} GPUs need at least {world} calibration and score "
                f"steps (one batch each); the run has {calib_steps} and {score_steps}",
                "raise --num-calib-steps/--num-score-steps, use fewer --gpus, or --parallel layers",
            )
        )
    return dataclasses.replace(lp, replicas=tuple(gpus)), calib_steps, score_steps


def cuda_totals_gib() -> dict[int, float]:
    """Total memory of each visible CUDA device (empty on a CPU machine)."""
    if not torch.cuda.is_available():
        return {}
    return {
        i: torch.cuda.get_device_properties(i).total_memory / GIB for i in range(torch.cuda.device_count())
    }


def plan_for(
    cfg, request: PlanRequest, problems: Problems, totals_gib: dict[int, float] | None = None
) -> tuple[LMPlacement, int, int] | None:
    """Validation before loading: parse the flags, place the LM, pick the batch (or a Problem).

    Returns None on a machine without GPUs (the CPU path loads on the CPU).
    """
    totals = cuda_totals_gib() if totals_gib is None else totals_gib
    if not totals:
        return None
    gpus = parse_gpus(request.gpus, len(totals), problems)
    caps = parse_max_memory(request.max_memory, gpus, totals, problems) if gpus else {}
    if not caps:
        return None
    devices = Devices(meta_model(cfg), Dims.from_config(cfg), gpus, usable(caps))
    if request.checkpointing_auto and request.shape.method == "gradient":
        without = _without_checkpointing(devices, request)
        if without is not None:
            return without
    try:
        return _planned(devices, request)
    except UsageError as exc:
        problems.extend(exc.problems)
        return None


def _planned(devices: Devices, request: PlanRequest) -> tuple[LMPlacement, int, int]:
    """Replicas where `--parallel` allows and they work, else one LM (halving the batch)."""
    steps = (request.calib_steps, request.score_steps)
    if len(devices.gpus) > 1 and request.parallel != "layers":
        planned = plan_replicas(devices, request.shape, *steps, explicit=request.parallel == "replicas")
        if planned is not None:
            return planned
    return plan_run(devices, request.shape, *steps)


def _without_checkpointing(devices: Devices, request: PlanRequest) -> tuple[LMPlacement, int, int] | None:
    """The placement with gradient checkpointing off, if the requested batch fits that way
    as it is (never halved for it: checkpointing on keeps the batch instead)."""
    shape = dataclasses.replace(request.shape, grad_checkpointing=False)
    try:
        planned = _planned(devices, dataclasses.replace(request, shape=shape))
    except UsageError:
        return None
    return planned if planned[0].plan.batch_size == shape.batch_size else None


def measured_peaks_gib(worker_peaks_gib: dict[str, float]) -> dict[str, float]:
    """torch.cuda.max_memory_allocated of every visible GPU, for the manifest next to the plan
    (a GPU searched by a replica process: that process's own figure, `worker_peaks_gib`)."""
    if not torch.cuda.is_available():
        return {}
    own = {
        str(i): round(torch.cuda.max_memory_allocated(i) / GIB, 2) for i in range(torch.cuda.device_count())
    }
    return {d: max(gib, worker_peaks_gib.get(d, 0.0)) for d, gib in own.items()}
