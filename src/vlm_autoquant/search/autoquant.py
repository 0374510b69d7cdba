"""The AutoQuantize stage: the one owner of ModelOpt's search and its internals.

One `mtq.auto_quantize` call calibrates and scores a *family* of schemes (same method, data and
layer settings) over the union of their candidate formats. Each scheme is then solved by
ModelOpt's own solver over its own formats and budget, and applied by switching the searched
model's quantizer choices: no second model, no second insertion of quantizers. A scheme alone is
a family of one and goes through the same two calls, so it gets the same formats alone or in a
sweep.

ModelOpt's searcher is observed, not replaced: for one call a context manager (1) times
calibration, scoring and the solve, (2) writes each search checkpoint to a temporary name and
renames it into place, recording its sha256, (3) lets a calibration-only checkpoint resume
(ModelOpt 0.47 restores its empty score table as a plain dict), (4) keeps each candidate's raw
score (ModelOpt stores a running minimum over its sorted candidates, which would make a format's
score depend on the other formats searched), (5) frees each module's stored Q(Y) - Y once scored,
(6) computes the kl_div loss row by row, (7) calibrates a format whose statistics are the weights
alone on one batch, (8) optionally keeps gradient checkpointing off, (9) under data-parallel
replicas (replicas.py) lets rank 0 alone write the checkpoint, under its single-process name,
(10) with `fused_scales: shared-max`, gives the projections an engine fuses (q/k/v, gate/up)
their group's largest per-tensor scales right after each format's calibration, so that
everything after it (scores, solve, quality, export) is in the arithmetic the engines serve,
(11) collects each max-calibrated amax without a host sync per quantizer (calib_collect.py), and
(12) on a GPU, computes each module's gradient score in one fused pass (score_reduce.py), and
(13) compares format recipes by the signature each stores, and builds the no-quant recipe once
(ModelOpt re-serialises a pydantic config for each, several times per scored module and batch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import modelopt.torch.quantization as mtq
import modelopt.torch.quantization.algorithms as mq_algorithms
import modelopt.torch.quantization.model_quant as mq
import torch
import torch.nn.functional as F
from modelopt.torch.opt.searcher import LPS
from modelopt.torch.opt.utils import get_hparam, named_hparams
from modelopt.torch.quantization.algorithms import (
    AutoQuantizeGradientSearcher,
    AutoQuantizeKLDivSearcher,
    QuantRecipe,
    QuantRecipeHparam,
    _AutoQuantizeBaseSearcher,
)
from modelopt.torch.quantization.calib import MaxCalibrator
from modelopt.torch.quantization.nn import TensorQuantizer

from ..core.errors import RunFailed
from ..core.interrupt import StopFlag
from ..core.timing import BatchClock
from ..model.fused import fused_layer_groups
from . import calib_collect, resume, score_reduce
from .spec import KL_CHUNK_BYTES, SearchCheckpoint, SearchSpec

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]
BF16 = "BF16"
SEARCHERS = {"gradient": AutoQuantizeGradientSearcher, "kl_div": AutoQuantizeKLDivSearcher}
# The budget of ModelOpt's own solve inside auto_quantize; every scheme is re-solved afterwards.
_INTERNAL_BITS = 16.0


def make_steps(method: str, stop: StopFlag | None = None) -> tuple[Callable, Callable | None]:
    """`forward_step` (and `loss_func` for gradient) as ModelOpt calls them, once per batch."""

    def forward_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        if stop is not None:
            stop.raise_if_set()
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits

    if method == "gradient":

        def loss_func(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
            # Summed, not averaged: the batch's negative log-likelihood, whose Fisher information
            # the scores approximate. The mean would shrink every score by (tokens)^2, down to
            # ~1e-8 on small models, below the LP solver's tolerance (it then picks worse mixes).
            labels = batch["labels"][:, 1:]
            return F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
            )

        return forward_logits, loss_func

    replay = PrefixReplay()

    def forward_real_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        # kl_div compares logit distributions; padding positions are left out of the sum.
        with replay(model, batch):
            return forward_logits(model, batch)[batch["real"]]

    forward_real_logits.replay = replay  # search() drops what it keeps when the search ends
    return forward_real_logits, None


class PrefixReplay:
    """kl_div's forward passes, made cheaper without changing a number.

    ModelOpt's kl_div searcher runs, per batch, one forward with every group BF16 and then one
    forward per group with only that group's quantizers on. The decoder layers before the
    group's first layer see the same inputs and weights in both, so they compute the same
    outputs: those are replayed from the BF16 forward (each layer's output kept, 2 B x hidden
    per token and layer) instead of computed again; the model's own forward runs the rest. A
    quantizer on outside the decoder layers, or another batch than the one kept, runs the
    whole forward.
    """

    def __init__(self) -> None:
        self.batch: Batch | None = None
        self.outputs: list = []

    def clear(self) -> None:
        self.batch, self.outputs = None, []

    @staticmethod
    def _first_quantized(model: torch.nn.Module, prefix: str, n: int) -> int | None:
        """The first decoder layer with a quantizer on (n: none); None: one on outside them."""
        first = n
        for name, m in model.named_modules():
            if isinstance(m, TensorQuantizer) and m.is_enabled:
                if not name.startswith(prefix):
                    return None
                first = min(first, int(name[len(prefix) :].split(".", 1)[0]))
        return first

    @contextlib.contextmanager
    def __call__(self, model: torch.nn.Module, batch: Batch) -> Iterator[None]:
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        layers = getattr(decoder, "layers", None)
        prefix = next((f"{n}." for n, m in model.named_modules() if m is layers), None)
        first = (
            None
            if prefix is None or torch.is_grad_enabled()
            else self._first_quantized(model, prefix, len(layers))
        )
        if first is not None and first == len(layers):  # the BF16 pass: keep every output
            self.batch, self.outputs = batch, [None] * len(layers)
            hooks = [layer.register_forward_hook(self._keeper(i)) for i, layer in enumerate(layers)]
            try:
                yield
            finally:
                for h in hooks:
                    h.remove()
            return
        if not first or batch is not self.batch:  # 0, None or another batch: the whole forward
            yield
            return
        saved = [layers[i].__dict__.get("forward") for i in range(first)]  # accelerate's hooks
        for i in range(first):  # these layers return what they returned in the BF16 pass
            layers[i].forward = self._replayer(self.outputs[i])
        try:
            yield
        finally:
            for i, fwd in enumerate(saved):
                if fwd is None:
                    del layers[i].forward
                else:
                    layers[i].forward = fwd

    def _keeper(self, i: int) -> Callable:
        def keep(_module, _args, output):
            self.outputs[i] = output

        return keep

    @staticmethod
    def _replayer(output) -> Callable:
        def replay(*_args, **_kwargs):
            return output

        return replay


def format_name(recipe) -> str:
    """ModelOpt prints a recipe as 'FP8_DEFAULT_CFG(effective-bits: 8.0)'; 'NONE' is BF16."""
    name = str(recipe).split("(", 1)[0]
    return BF16 if name == "NONE" else name


@dataclass
class Search:
    """A searched model's calibration and scores (raw, per candidate), ready to solve."""

    spec: SearchSpec
    stats: dict[str, dict]  # hparam name -> ModelOpt candidate stats (+ "raw_scores")
    checkpoint: Path
    calibrated: bool  # calibration ran here (False: restored from the checkpoint)
    scored: bool  # scoring ran here (False: restored)
    timings: dict[str, float] = field(default_factory=dict)
    worker_peaks_gib: dict[str, float] = field(default_factory=dict)  # replicas: the other GPUs'
    batch_seconds: dict[str, list[float]] = field(default_factory=dict)  # phase -> each batch's wall


@dataclass(frozen=True)
class GroupChoice:
    """One searched group of LM linears (e.g. q/k/v of a layer) and the format it got."""

    name: str
    module_names: tuple[str, ...]
    scores: dict[str, float]  # format name -> score, as ModelOpt's solver saw it
    costs: dict[str, float]  # format name -> weight elements x bits/16 (BF16 = elements)
    chosen: str


@dataclass(frozen=True)
class SearchResult:
    """One scheme's solve: the only view of ModelOpt's search the rest of the package reads."""

    groups: tuple[GroupChoice, ...]
    target_bits: float
    achieved_bits: float  # ModelOpt's count: chosen costs over the cost-counted total
    predicted_loss: float  # sum of the chosen candidates' scores
    checkpoint: Path
    calibrated: bool
    scored: bool
    timings: dict[str, float]

    def group_of(self) -> dict[str, GroupChoice]:
        return {m: g for g in self.groups for m in g.module_names}


# CBC's absolute primal feasibility tolerance (its default). With every cost row normalised to
# its uncompressed total (below), a recipe may exceed the bound by at most this fraction of the
# total: 16 * 1e-7 = 1.6e-6 effective bits, far below one layer's step (~1e-3 bits at 3B-72B).
LP_FEASIBILITY_TOLERANCE = 1e-7
SOLVER_BITS_TOLERANCE = 16 * LP_FEASIBILITY_TOLERANCE


class NormalisedLPS(LPS):
    """ModelOpt's LP solver with each cost constraint stated as a fraction of its total.

    ModelOpt 0.47 states the budget in weight elements (`run_search`: max_weight_size =
    total * effective_bits / 16; the 3B's 8-bit bound is 1,387,266,048) and hands it unscaled to
    CBC, whose feasibility tolerances are absolute (1e-7). At 1.4e9 one double ulp is 2.4e-7, so
    a bound met with equality (every searched layer at the smallest format: `fp8-all-8b`) is
    lost to rounding inside CBC ("solution discarded", or preprocessing "infeasible"), and
    ModelOpt reports "AutoQuantize FAILED". Dividing the row (costs and bounds) by the sum of
    each group's largest cost leaves the same integer solutions (a layer's cost step is >1e-4 of
    the total) with a tolerance relative to the model's size instead of absolute.
    """

    def __init__(
        self,
        name: str,
        constraints: dict,
        constraints_to_candidate_costs: dict,
        candidate_scores: list,
        objective_type: str = "minimize",
        verbose: bool = False,
    ) -> None:
        scaled_bounds, scaled_costs = {}, {}
        for key, costs in constraints_to_candidate_costs.items():
            scale = sum(max(c) for c in costs if c) or 1.0
            bound = constraints[key]
            scaled_bounds[key] = (
                tuple(None if b is None else b / scale for b in bound)
                if isinstance(bound, tuple)
                else None
                if bound is None
                else bound / scale
            )
            scaled_costs[key] = [[c / scale for c in layer] for layer in costs]
        super().__init__(name, scaled_bounds, scaled_costs, candidate_scores, objective_type, verbose)


@contextlib.contextmanager
def normalised_lp() -> Iterator[None]:
    """Let ModelOpt's gradient search (and its re-solves) use `NormalisedLPS` (restored on exit)."""
    orig = mq_algorithms.LPS
    mq_algorithms.LPS = NormalisedLPS
    try:
        yield
    finally:
        mq_algorithms.LPS = orig


def _timed(timings: dict[str, float], key: str, fn: Callable, clock: BatchClock | None = None) -> Callable:
    def wrapper(*args, **kwargs):
        if key in ("calibrate", "score") and key not in timings:  # once per search, not per format
            log.info("%s: started", key)  # progress without bars in a log (and a test's signal)
        t0 = time.perf_counter()
        if clock is not None:
            clock.begin(key)
        try:
            return fn(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if clock is not None:
                clock.end()
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0

    return wrapper


def _loading(orig: Callable) -> Callable:
    def load_checkpoint(self) -> bool:
        # ModelOpt's loader leaves weights_only to the environment (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
        # turns it off): load verified bytes with an explicit weights_only=True instead.
        loaded = resume.load_searcher_state(self)
        if not isinstance(self.candidate_stats, defaultdict):
            self.candidate_stats = defaultdict(dict, self.candidate_stats)
        return loaded

    return load_checkpoint


def _with_raw_scores(orig: Callable) -> Callable:
    def init_stats(self) -> None:
        orig(self)
        for name, hparam in named_hparams(self.model, unique=True):
            if isinstance(hparam, QuantRecipeHparam):
                self.candidate_stats[name]["raw_scores"] = [
                    hparam.get_score(r) for r in self.candidate_stats[name]["formats"]
                ]

    return init_stats


def _stored_signature(recipe: QuantRecipe) -> str:
    """ModelOpt's `checkpoint_signature`, without re-serialising the config on every call.

    ModelOpt returns `getattr(self, "_config_signature", self.config.model_dump_json())`, whose
    default is evaluated first: every `==` and `hash` of a recipe (several per scored module and
    batch) serialised two pydantic configs. A recipe stores that same string when it is built.
    """
    stored = recipe.__dict__.get("_config_signature")
    return stored if stored is not None else recipe.config.model_dump_json()


def _reusing_no_quant(orig: Callable) -> Callable:
    """`QuantRecipe(quant_cfg=None)` built once per search, then copied.

    ModelOpt's scoring forward builds the no-quant recipe (a pydantic config, its compression
    estimate and its JSON signature) several times per scored module and batch, only to compare
    with it. Its state never depends on `name` (ModelOpt names it "NONE"); a copy of the first
    one's attributes is the same recipe, equal and with the same hash.
    """
    first: dict[str, object] = {}

    def __init__(self, quant_cfg=None, name=None) -> None:
        if quant_cfg is None and first:
            self.__dict__.update(first)
            return
        orig(self, quant_cfg, name)
        if quant_cfg is None:
            first.update(self.__dict__)

    return __init__


def _drop_diffs(module: torch.nn.Module, grad_input, grad_output) -> None:
    """After ModelOpt's backward hook has scored a module, free its stored Q(Y) - Y."""
    module.__dict__.pop("output_diff_dict", None)


def _max_calibration(orig: Callable, state: dict) -> Callable:
    """ModelOpt's `calibrate`, noting while it runs whether the algorithm is plain max."""

    def calibrate(model, algorithm="max", forward_loop=None):
        method = (
            algorithm.get("method")
            if isinstance(algorithm, dict)
            else getattr(algorithm, "method", algorithm)
        )
        state["max"] = method == "max"
        try:
            return orig(model, algorithm=algorithm, forward_loop=forward_loop)
        finally:
            state["max"] = False

    return calibrate


FUSED_QUANTIZERS = ("weight_quantizer", "input_quantizer")


def _static_amax(quantizer: TensorQuantizer | None) -> torch.Tensor | None:
    """A quantizer's calibrated per-tensor amax; None if off, dynamic, per-channel or unset."""
    if quantizer is None or not quantizer.is_enabled or getattr(quantizer, "_dynamic", False):
        return None
    amax = quantizer.amax
    return amax if amax is not None and amax.numel() == 1 else None


def share_fused_scales(model: torch.nn.Module) -> int:
    """Give every fused group's per-tensor FP8 quantizers the group's largest amax; return how
    many (group, weight or input) sets were tied.

    What the engines do at load, done at calibration: vLLM's ModelOpt FP8 linear
    (`process_weights_after_loading`) re-quantizes each sibling's weight to the group's largest
    weight scale (`requantize_with_max_scale`) and keeps the largest input scale; SGLang and
    TensorRT-LLM do the same (exporter/engine_load.py). Per-channel weights (one scale per output row)
    and dynamic per-token inputs have nothing to share, and a group whose members are not all
    quantized per tensor (BF16, another format) is left alone.
    """
    modules = dict(model.named_modules())
    tied = 0
    for group in fused_layer_groups(list(modules)):
        for attr in FUSED_QUANTIZERS:
            quantizers = [getattr(modules[n], attr, None) for n in group]
            amaxes = [_static_amax(q) for q in quantizers]
            if any(a is None for a in amaxes):
                continue
            shared = torch.max(torch.stack([a.reshape(()) for a in amaxes]))
            for q, a in zip(quantizers, amaxes):
                q.amax = shared.reshape(a.shape).to(a.dtype)
            tied += 1
    return tied


def _sharing_fused_scales(orig: Callable) -> Callable:
    """ModelOpt's `calibrate` for one candidate format, then `share_fused_scales`: the amax it
    stores for that format (and scores, solves, saves and exports) are the served ones."""

    def calibrate(model, algorithm="max", forward_loop=None):
        out = orig(model, algorithm=algorithm, forward_loop=forward_loop)
        log.debug("fused scales: %d groups share their largest amax", share_fused_scales(model))
        return out

    return calibrate


def _weights_calibrated_once(orig: Callable, state: dict) -> Callable:
    """Max calibration of a format in which only weight quantizers calibrate (FP8 per-channel
    weights with per-token activations: ModelOpt never calibrates a dynamic quantizer) sees the
    same tensors, the weights, in every batch: one batch gives the same amax as all of them."""

    def run_func(self, func, num_iters=1, desc=""):
        if state.get("max") and num_iters > 1:
            calibrating = [
                (n, m)
                for n, m in self.model.named_modules()
                if isinstance(m, TensorQuantizer) and m.is_enabled and getattr(m, "_if_calib", False)
            ]
            if calibrating and all(
                n.endswith("weight_quantizer") and isinstance(m._calibrator, MaxCalibrator)
                for n, m in calibrating
            ):
                num_iters = 1
        return orig(self, func, num_iters, desc)

    return run_func


def _freeing_diffs(orig: Callable) -> Callable:
    """ModelOpt's gradient scoring keeps every scored module's Q(Y) - Y (one per format) until
    that module's next forward, so the next step's logits peak also holds every layer's diffs.
    A backward hook registered after ModelOpt's frees them once scored (same scores)."""

    def run_func(self, func, num_iters=1, desc=""):
        handles = [
            m.register_full_backward_hook(_drop_diffs)
            for m in self.model.modules()
            if hasattr(m, "_backward_hook_handle")
        ]  # ModelOpt's scored modules
        try:
            return orig(self, func, num_iters, desc)
        finally:
            for h in handles:
                h.remove()
            for m in self.model.modules():
                m.__dict__.pop("output_diff_dict", None)

    return run_func


def _saving(orig: Callable, on_checkpoint: Callable[[Path, str, Path], str]) -> Callable:
    def atomic_save(self, verbose: bool = False) -> None:
        final = self._get_checkpoint_path()
        if final is None:
            return orig(self, verbose)
        if torch.distributed.is_initialized():
            # Data-parallel replicas (replicas.py) hold the same state after ModelOpt's reduction:
            # rank 0 alone writes it, under the single-process name (not ModelOpt's per-rank
            # one), so any run can resume it.
            if torch.distributed.get_rank() != 0:
                return None
            final = self.config["checkpoint"]
            self._get_checkpoint_path = lambda: self.config["checkpoint"]
        try:
            _atomic_checkpoint_save(self, final, lambda: orig(self, verbose), on_checkpoint)
        finally:
            self.__dict__.pop("_get_checkpoint_path", None)

    return atomic_save


# Rows of logits per step of the row-chunked KL: about 256 MiB per fp32 temporary.
_KL_CHUNK_BYTES = KL_CHUNK_BYTES


def _chunked_kl_div_loss(
    log_prob_unquant: torch.Tensor, logits_quant: torch.Tensor, lm_head: torch.nn.Module | None = None
) -> torch.Tensor:
    """ModelOpt's `_get_kl_div_loss` (sum of KL(unquantized || quantized) over tokens), by rows.

    ModelOpt computes it over all tokens at once: the fp32 copy of the quantized logits, their
    log_softmax and kl_div's elementwise result are each 4 B x vocab per token, three times the
    bf16 logits. Row by row the sum is the same (up to float summation order) and the
    temporaries stay at about `_KL_CHUNK_BYTES`. A tensor-parallel lm_head (Megatron) keeps
    ModelOpt's own function.
    """
    if getattr(lm_head, "parallel_state", None) is not None:
        return _MODELOPT_KL(log_prob_unquant, logits_quant, lm_head)
    lq, lu = logits_quant.flatten(0, -2), log_prob_unquant.flatten(0, -2)
    rows = max(1, _KL_CHUNK_BYTES // (4 * lq.shape[-1]))
    total = torch.zeros((), dtype=torch.float32, device=lq.device)
    for i in range(0, lq.shape[0], rows):
        log_q = torch.log_softmax(lq[i : i + rows].float(), dim=-1)
        total += F.kl_div(log_q, lu[i : i + rows], reduction="sum", log_target=True)
    return total


_MODELOPT_KL = mq_algorithms._get_kl_div_loss


def _patches(
    timings: dict[str, float],
    on_checkpoint: Callable[[Path, str, Path], str],
    fused_scales: str,
    clock: BatchClock | None,
) -> list[tuple[object, str, object]]:
    """(owner, attribute, replacement) for each ModelOpt attribute one search call wraps."""
    base, calib = _AutoQuantizeBaseSearcher, {}
    calibrate = _timed(timings, "calibrate", calib_collect.calibrating(mq.calibrate), clock)
    if fused_scales == "shared-max":
        calibrate = _sharing_fused_scales(calibrate)
    patches = [
        (mq, "calibrate", _max_calibration(calibrate, calib)),  # (owner, name, new)
        (base, "save_search_checkpoint", _saving(base.save_search_checkpoint, on_checkpoint)),
        (base, "run_search", _timed(timings, "solve", base.run_search)),
        (base, "load_search_checkpoint", _loading(base.load_search_checkpoint)),
        (base, "initialize_candidate_stats", _with_raw_scores(base.initialize_candidate_stats)),
        (base, "_run_func", _freeing_diffs(_weights_calibrated_once(base._run_func, calib))),
        (mq_algorithms, "_get_kl_div_loss", _chunked_kl_div_loss),
        (mq_algorithms, "_get_auto_quantize_score", score_reduce.score),
        (mq_algorithms, "_add_auto_quantize_score", score_reduce.add_score),
        (QuantRecipe, "checkpoint_signature", property(_stored_signature)),
        (QuantRecipe, "__init__", _reusing_no_quant(QuantRecipe.__init__)),
    ]
    patches += [
        (
            c,
            "estimate_sensitivity_scores",
            _timed(timings, "score", c.__dict__["estimate_sensitivity_scores"], clock),
        )
        for c in SEARCHERS.values()
    ]
    return patches


@contextlib.contextmanager
def observe_modelopt(
    timings: dict[str, float],
    on_checkpoint: Callable[[Path, str, Path], str],
    model: torch.nn.Module,
    grad_checkpointing: bool,
    fused_scales: str = "shared-max",
    clock: BatchClock | None = None,
) -> Iterator[None]:
    """Wrap ModelOpt's searcher methods for one auto_quantize call (restored on exit)."""
    patches = _patches(timings, on_checkpoint, fused_scales, clock)
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _ in patches]
    for owner, name, fn in patches:
        setattr(owner, name, fn)
    if not grad_checkpointing:
        # ModelOpt's HF plugin turns it on for scoring; a no-op keeps activations in memory.
        model.gradient_checkpointing_enable = lambda *a, **k: None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"modelopt\..*")
            yield
    finally:
        for owner, name, fn in saved:
            if fn is None:
                delattr(owner, name)  # inherited: the parent's method shows through again
            else:
                setattr(owner, name, fn)
        model.__dict__.pop("gradient_checkpointing_enable", None)


def _atomic_checkpoint_save(
    searcher, final: str, save: Callable[[], None], on_checkpoint: Callable[[Path, str, Path], str]
) -> None:
    tmp = str(resume.tmp_checkpoint(Path(final)))
    configured = searcher.config["checkpoint"]
    searcher.config["checkpoint"] = tmp
    stage = "scored" if searcher.candidate_stats else "calibrated"
    try:
        save()
        # The signed record naming the new checkpoint's sha256 first, then the rename: a kill in
        # between leaves a finished pair that the next run promotes (resume.py).
        on_checkpoint(Path(final), stage, Path(tmp))
        os.replace(tmp, final)
    except (OSError, RuntimeError) as exc:
        # torch.save writes through C++ streams: a full disk arrives as a RuntimeError
        # without an errno, so say what most likely happened and what to do.
        raise RunFailed(
            f"no space left to write the search checkpoint {final}? Writing it "
            f"failed ({exc}). Free disk space (or lift the file-size limit) or "
            "choose another --output-dir; nothing partial was left."
        ) from exc
    finally:
        searcher.config["checkpoint"] = configured
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


class _DebugLog:
    """A file-like sink for ModelOpt's print() chatter: each line at DEBUG."""

    def write(self, text: str) -> int:
        if text.strip():
            log.debug("modelopt: %s", text.rstrip())
        return len(text)

    def flush(self) -> None:
        pass


def search(
    model: torch.nn.Module,
    spec: SearchSpec,
    batches: list[Batch],
    checkpoint: SearchCheckpoint,
    stop: StopFlag | None = None,
    grad_checkpointing: bool = True,
) -> Search:
    """Calibrate and score `spec` on `model` in place (or restore both from `checkpoint`).

    Leaves the model in eval mode with gradient checkpointing off (ModelOpt turns it on).
    """
    forward_step, loss_func = make_steps(spec.method, stop)
    timings: dict[str, float] = {}
    clock = BatchClock()
    checkpoint.path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = _auto_quantize_kwargs(spec, batches, checkpoint.path, clock.wrap(forward_step), loss_func)
    t0 = time.perf_counter()
    try:
        with (
            observe_modelopt(timings, checkpoint.record, model, grad_checkpointing, spec.fused_scales, clock),
            normalised_lp(),
            contextlib.redirect_stdout(_DebugLog()),
        ):  # ModelOpt prints; that goes to DEBUG
            model, state = mtq.auto_quantize(model, **kwargs)
    except (AssertionError, ValueError) as exc:
        raise RunFailed(f"ModelOpt's auto_quantize refused the search: {exc}") from exc
    finally:
        if hasattr(forward_step, "replay"):
            forward_step.replay.clear()
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        model.eval()
    timings["search_setup"] = time.perf_counter() - t0 - sum(timings.values())
    stats = {name: dict(s) for name, s in state["candidate_stats"].items()}
    if any("raw_scores" not in s for s in stats.values()):
        raise RunFailed(
            f"the search checkpoint {checkpoint.path} was written by an older version of "
            "this tool (no raw scores); rerun with --overwrite to score again"
        )
    calibrated, scored = "calibrate" in timings, "score" in timings
    return Search(spec, stats, checkpoint.path, calibrated, scored, timings, batch_seconds=clock.seconds)


def _auto_quantize_kwargs(
    spec: SearchSpec,
    batches: list[Batch],
    checkpoint: Path,
    forward_step: Callable,
    loss_func: Callable | None,
) -> dict:
    """`mtq.auto_quantize`'s keyword arguments for `spec` (its own solve's budget is a dummy)."""
    constraints: dict = {"effective_bits": _INTERNAL_BITS}
    if spec.excluded_from_cost:
        constraints["cost"] = {"excluded_module_name_patterns": list(spec.excluded_from_cost)}
    kwargs = dict(
        constraints=constraints,
        quantization_formats=list(spec.formats),
        data_loader=batches,
        forward_step=forward_step,
        disabled_layers=list(spec.disabled_layers) or None,
        num_calib_steps=spec.num_calib_steps,
        num_score_steps=spec.num_score_steps,
        method=spec.method,
        checkpoint=str(checkpoint),
        verbose=False,
    )
    if loss_func is not None:
        kwargs["loss_func"] = loss_func
    return kwargs


def _subset_stats(stat: dict, formats: set[str]) -> dict:
    """Candidate stats restricted to `formats` (+ BF16), as a search of only those would store.

    ModelOpt keeps a running minimum of the scores over its sorted candidates; it is recomputed
    here from the raw scores over the kept candidates only.
    """
    keep = [i for i, f in enumerate(stat["formats"]) if format_name(f) in formats | {BF16}]
    scores, prev = [], float("inf")
    for i in keep:
        prev = min(stat["raw_scores"][i], prev)
        scores.append(prev)
    return {
        **stat,
        "formats": [stat["formats"][i] for i in keep],
        "scores": scores,
        "costs": [stat["costs"][i] for i in keep],
    }


def solve(model: torch.nn.Module, found: Search, formats: list[str], target_bits: float) -> SearchResult:
    """Solve one scheme (its formats and budget) with ModelOpt's solver and apply it to `model`."""
    t0 = time.perf_counter()
    stats = {n: _subset_stats(s, set(formats)) for n, s in found.stats.items()}
    searcher = SEARCHERS[found.spec.method]()
    searcher.candidate_stats = stats
    total = sum(s.get("uncompressed_cost", max(s["costs"])) for s in stats.values())
    with warnings.catch_warnings(), normalised_lp():
        warnings.filterwarnings("ignore", module=r"modelopt\..*")
        best, satisfied = searcher.run_search_with_stats(total * target_bits / 16.0, verbose=False)
    if not satisfied:
        raise RunFailed(
            f"ModelOpt's solver found no per-layer mix within {target_bits:g} "
            "effective bits for these formats"
        )
    groups = []
    for name, info in best.items():
        get_hparam(model, name).active = info["format"]
        s = stats[name]
        groups.append(
            GroupChoice(
                name=name.removesuffix(".quant_recipe"),
                module_names=tuple(s["module_names"]),
                scores={format_name(f): float(v) for f, v in zip(s["formats"], s["scores"])},
                costs={format_name(f): float(c) for f, c in zip(s["formats"], s["costs"])},
                chosen=format_name(info["format"]),
            )
        )
    cost = sum(info["costs"] for info in best.values())
    return SearchResult(
        groups=tuple(groups),
        target_bits=float(target_bits),
        achieved_bits=16.0 * cost / total,
        predicted_loss=float(sum(info["scores"] for info in best.values())),
        checkpoint=found.checkpoint,
        calibrated=found.calibrated,
        scored=found.scored,
        timings={**found.timings, "solve": time.perf_counter() - t0},
    )


def seed_calibration(
    source: Path, target: Path, method: str, fingerprint: dict, formats: tuple[str, ...]
) -> bool:
    """Start `target`'s search checkpoint from `source`'s calibrated quantizers (no scores).

    For a verified `source` calibrated on the same model and batches over a superset of
    `formats`. ModelOpt calibrates each format on its own (its quantizers alone, collecting
    statistics with quantization off), so a format's calibration does not depend on the other
    formats searched: the seed keeps `formats`' calibrations and restates the signatures ModelOpt
    checks on restore for `formats` alone. Writes the seed with its signed record
    (`fingerprint`); returns whether a seed was written.
    """
    state = resume.load_verified(source)  # signed record, weights_only=True
    if not isinstance(state, dict) or not state.get("quantizer_states"):
        return False
    keep = {QuantRecipe(quant_cfg=f).checkpoint_signature for f in formats}
    states = {r: v for r, v in state["quantizer_states"].items() if r.checkpoint_signature in keep}
    if len(states) != len(keep):
        return False  # the source lacks one of the formats: calibrate from scratch
    choices = keep | {QuantRecipe(quant_cfg=None).checkpoint_signature}
    state["quantizer_states"] = states
    state["quantization_formats_signature"] = tuple(sorted(keep))
    # Per group: (name, modules, replay attrs, score modules, choices' signatures, ...).
    groups = [
        (*g[:4], tuple(c for c in g[4] if c in choices), *g[5:])
        for g in state["resolved_search_setup_signature"]
    ]
    state["resolved_search_setup_signature"] = tuple(sorted(groups, key=repr))  # as ModelOpt
    state["candidate_stats"] = {}
    state["method"] = method
    state["best"] = {"recipe": {}, "constraints": {}, "score": float("inf"), "is_satisfied": False}
    resume.save_with_record(target, fingerprint, "calibrated", lambda tmp: torch.save(state, tmp))
    return True
