"""The AutoQuantize stage: forward/loss callables, constraints, and the `mtq.auto_quantize` call.

ModelOpt's searcher is observed, not replaced: a context manager wraps a few of its methods for
the duration of one call to (1) time calibration, scoring and the solve, (2) write each search
checkpoint to a temporary name, record its sha256 (signed) and rename it into place, so that
only a checkpoint this tool wrote is ever unpickled again, and then with weights_only=True, (3) let a calibration-only checkpoint resume
(ModelOpt 0.47 restores its empty score table as a plain dict and then fails with KeyError), and
(4) optionally keep gradient checkpointing off during scoring (faster, more memory).
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
import modelopt.torch.quantization.model_quant as mq
import torch
import torch.nn.functional as F
from modelopt.torch.quantization.algorithms import (
    AutoQuantizeGradientSearcher,
    AutoQuantizeKLDivSearcher,
    _AutoQuantizeBaseSearcher,
)

from . import resume
from .errors import RunFailed
from .interrupt import StopFlag
from .schemes import Scheme

log = logging.getLogger(__name__)
Batch = dict[str, torch.Tensor]


def make_steps(method: str, stop: StopFlag | None = None) -> tuple[Callable, Callable | None]:
    """`forward_step` (and `loss_func` for gradient) as ModelOpt calls them, once per batch."""

    def check_stop() -> None:
        if stop is not None:
            stop.raise_if_set()

    def forward_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        check_stop()
        return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     use_cache=False).logits

    if method == "gradient":
        def loss_func(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
            # Summed, not averaged: the batch's negative log-likelihood, whose Fisher information
            # the scores approximate. The mean would shrink every score by (tokens)^2, down to
            # ~1e-8 on small models, below the LP solver's tolerance (it then picks worse mixes).
            labels = batch["labels"][:, 1:]
            return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                   ignore_index=-100, reduction="sum")
        return forward_logits, loss_func

    def forward_real_logits(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
        # kl_div compares logit distributions; padding positions are left out of the sum.
        return forward_logits(model, batch)[batch["real"]]

    return forward_real_logits, None


def constraints_for(scheme: Scheme, effective_bits: float | None = None) -> dict:
    bits = scheme.effective_bits if effective_bits is None else effective_bits
    out: dict = {"effective_bits": float(bits)}
    if scheme.excluded_from_cost:
        out["cost"] = {"excluded_module_name_patterns": list(scheme.excluded_from_cost)}
    return out


@dataclass
class SearchRun:
    """What happened inside one auto_quantize call."""

    timings: dict[str, float] = field(default_factory=dict)
    calibrated: bool = False  # calibration ran (False: restored from the checkpoint)
    scored: bool = False  # scoring ran (False: restored from the checkpoint)
    checkpoint_writes: list[tuple[str, str]] = field(default_factory=list)  # (stage, sha256)


_QUIET = (r"Per-rank checkpoint .* not found", r"Checkpoint .* does not exist",
          r"AutoQuantize: Huggingface model detected", r"get_auto_quantize_config: returned")


@contextlib.contextmanager
def observe_modelopt(run: SearchRun, on_checkpoint: Callable[[Path, str, Path], str],
                     model: torch.nn.Module, grad_checkpointing: bool) -> Iterator[None]:
    """Wrap ModelOpt's searcher methods for one auto_quantize call (restored on exit)."""
    orig_calibrate = mq.calibrate
    orig_save = _AutoQuantizeBaseSearcher.save_search_checkpoint
    orig_scores = {c: c.__dict__["estimate_sensitivity_scores"]
                   for c in (AutoQuantizeGradientSearcher, AutoQuantizeKLDivSearcher)}
    orig_solve = _AutoQuantizeBaseSearcher.run_search
    orig_load = _AutoQuantizeBaseSearcher.load_search_checkpoint

    def load_checkpoint(self) -> bool:
        # ModelOpt's loader leaves weights_only to the environment (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD
        # turns it off): load verified bytes with an explicit weights_only=True instead.
        loaded = resume.load_searcher_state(self)
        # ModelOpt 0.47 saves candidate_stats as a plain dict (sanitised for weights_only), but
        # scoring after a calibration-only checkpoint fills it as a defaultdict: restore that.
        if not isinstance(self.candidate_stats, defaultdict):
            self.candidate_stats = defaultdict(dict, self.candidate_stats)
        return loaded

    def timed(key: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                run.timings[key] = run.timings.get(key, 0.0) + time.perf_counter() - t0
                if key == "calibrate":
                    run.calibrated = True
                if key == "score":
                    run.scored = True
        return wrapper

    def atomic_save(self, verbose: bool = False) -> None:
        final = self._get_checkpoint_path()
        if final is None:
            return orig_save(self, verbose)
        tmp = str(resume.tmp_checkpoint(Path(final)))
        configured = self.config["checkpoint"]
        self.config["checkpoint"] = tmp
        stage = "scored" if self.candidate_stats else "calibrated"
        try:
            orig_save(self, verbose)
            # The record naming the new checkpoint's sha256 first, then the rename: a kill in
            # between leaves a finished pair that the next run promotes (resume.py).
            digest = on_checkpoint(Path(final), stage, Path(tmp))
            os.replace(tmp, final)
        except (OSError, RuntimeError) as exc:
            # torch.save writes through C++ streams: a full disk arrives as a RuntimeError
            # without an errno, so say what most likely happened and what to do.
            raise RunFailed(f"no space left to write the search checkpoint {final}? Writing it "
                            f"failed ({exc}). Free disk space (or lift the file-size limit) or "
                            "choose another --output-dir; nothing partial was left.") from exc
        finally:
            self.config["checkpoint"] = configured
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        run.checkpoint_writes.append((stage, digest))

    mq.calibrate = timed("calibrate", orig_calibrate)
    _AutoQuantizeBaseSearcher.save_search_checkpoint = atomic_save
    for cls, fn in orig_scores.items():
        cls.estimate_sensitivity_scores = timed("score", fn)
    _AutoQuantizeBaseSearcher.run_search = timed("solve", orig_solve)
    _AutoQuantizeBaseSearcher.load_search_checkpoint = load_checkpoint
    if not grad_checkpointing:
        # ModelOpt's HF plugin turns it on for scoring; a no-op keeps activations in memory.
        model.gradient_checkpointing_enable = lambda *a, **k: None
    try:
        with warnings.catch_warnings():
            for pattern in _QUIET:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    finally:
        mq.calibrate = orig_calibrate
        _AutoQuantizeBaseSearcher.save_search_checkpoint = orig_save
        for cls, fn in orig_scores.items():
            cls.estimate_sensitivity_scores = fn
        _AutoQuantizeBaseSearcher.run_search = orig_solve
        _AutoQuantizeBaseSearcher.load_search_checkpoint = orig_load
        model.__dict__.pop("gradient_checkpointing_enable", None)


def run_auto_quantize(model: torch.nn.Module, scheme: Scheme, batches: list[Batch],
                      checkpoint: Path, on_checkpoint: Callable[[Path, str, Path], str],
                      stop: StopFlag | None = None, grad_checkpointing: bool = True,
                      effective_bits: float | None = None) -> tuple[dict, SearchRun]:
    """Calibrate, score (or restore both from `checkpoint`) and solve for the budget.

    Returns ModelOpt's search state and what ran. Leaves the model in eval mode with gradient
    checkpointing off (ModelOpt turns it on for scoring and leaves it on).
    """
    forward_step, loss_func = make_steps(scheme.method, stop)
    run = SearchRun()
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    kwargs = dict(
        constraints=constraints_for(scheme, effective_bits),
        quantization_formats=list(scheme.formats),
        data_loader=batches,
        forward_step=forward_step,
        disabled_layers=list(scheme.disabled_layers) or None,
        num_calib_steps=scheme.num_calib_steps,
        num_score_steps=scheme.num_score_steps,
        method=scheme.method,
        checkpoint=str(checkpoint),
        verbose=False,
    )
    if loss_func is not None:
        kwargs["loss_func"] = loss_func
    t0 = time.perf_counter()
    try:
        with observe_modelopt(run, on_checkpoint, model, grad_checkpointing):
            model, state = mtq.auto_quantize(model, **kwargs)
    except (AssertionError, ValueError) as exc:
        raise RunFailed(f"ModelOpt's auto_quantize refused the search: {exc}") from exc
    finally:
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
        model.eval()
    run.timings["auto_quantize"] = time.perf_counter() - t0
    if not state["best"].get("is_satisfied", False):
        raise RunFailed(f"ModelOpt found no recipe within {scheme.effective_bits} effective bits")
    return state, run


EXT_NAME = "modelopt_cuda_ext_fp8"


def fp8_extension_cached() -> bool:
    """Whether ModelOpt's FP8 CUDA extension is already built in the torch extensions cache."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return any(Path(_get_build_directory(EXT_NAME, verbose=False)).glob(f"{EXT_NAME}*.so"))
    except Exception:  # noqa: BLE001 - a private torch helper; no cache means "not built"
        return False


def select_fp8_kernel(kind: str) -> str:
    """Choose ModelOpt's FP8 fake-quant kernel and return what will actually run.

    "eager": ModelOpt's PyTorch path (no build). "cuda-ext": ModelOpt's CUDA extension, JIT-built
    on first use (about 45 s on an H200 machine, cached under TORCH_EXTENSIONS_DIR), ~15% faster
    per scoring batch. "auto" (the default): the extension when its build is already cached,
    else eager, so a fresh machine never pays a silent build (docs/PERFORMANCE.md has the numbers).
    """
    from modelopt.torch.quantization import extensions

    if not torch.cuda.is_available():
        return "eager (CPU)"
    if kind == "auto":
        kind = "cuda-ext" if fp8_extension_cached() else "eager"
        if kind == "eager":
            log.info("FP8 kernel: eager (ModelOpt's CUDA extension is not built here; build it "
                     "once with --fp8-kernel cuda-ext, ~45 s, for ~15%% faster scoring later)")
    if kind == "eager":
        extensions.get_cuda_ext_fp8.extension = None  # ModelOpt then takes its eager path
        return "eager"
    cached = fp8_extension_cached()
    log.info("FP8 kernel: ModelOpt's CUDA extension (%s)", "cached build" if cached else
             "building it now: a one-time step of about 45 s, cached for later runs")
    t0 = time.perf_counter()
    extensions.get_cuda_ext_fp8(raise_if_failed=True)
    log.info("FP8 CUDA extension ready in %.1f s", time.perf_counter() - t0)
    return "cuda-ext"
