"""Max calibration without a host sync per quantizer.

ModelOpt's `MaxCalibrator.collect` checks every amax it reduces for NaN, negative and infinite
values with three `assert torch.any(...)` calls: three device-to-host copies per quantizer per
batch (about 3,000 per 16x512 batch of the 3B), each one stalling the launch queue until the GPU
has caught up. `deferred_checks` swaps in a collect that computes the same amax (the same
reduction, the same running maximum) and keeps the checks on the device: each calibrator carries a
running minimum of its local amaxes next to the running maximum, and both are read once, when the
calibration ends. A NaN or an infinity anywhere reaches the running maximum (`torch.maximum`
propagates both) and a negative amax reaches the running minimum, so the calibration fails on
exactly what ModelOpt's asserts refuse, naming the quantizer.

A weight quantizer sees the same tensor in every batch. A tensor seen again unchanged (the same
object, storage and version counter) is not reduced again: the maximum of an amax with itself is
that amax. The record of seen tensors lives only for one calibration call, during which nothing
writes the weights.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from modelopt.torch.quantization.calib import MaxCalibrator
from modelopt.torch.quantization.utils import convert_quantization_axis_to_reduce_axis, reduce_amax

_FIX = (
    "the calibration data or the model produced non-finite activations: check the checkpoint's "
    "weights and the captions, or run with --debug for the traceback"
)


class AmaxProblem(AssertionError):
    """A calibrated amax that ModelOpt's own checks would refuse (NaN, negative or infinite)."""


def _amax(x: torch.Tensor, axis) -> torch.Tensor:
    """ModelOpt's `reduce_amax`; a per-tensor amax in one pass (the same value: max |x| is the
    larger magnitude of the two extremes)."""
    reduce_axis = convert_quantization_axis_to_reduce_axis(x, axis)
    if reduce_axis is not None or x.dtype.itemsize == 1:  # per-channel, or FP8 input: ModelOpt's
        return reduce_amax(x, axis=reduce_axis).detach()
    lo, hi = torch.aminmax(x.detach())
    return torch.maximum(hi.abs(), lo.abs())


def _unchanged(cal: MaxCalibrator, x: torch.Tensor) -> bool:
    if x.is_inference():  # no version counter to tell an in-place write: always reduced
        cal.__dict__.pop("_vq_seen", None)
        return False
    seen = cal.__dict__.get("_vq_seen")
    key = (x.data_ptr(), x._version, tuple(x.shape), x.stride(), x.dtype)
    if seen is not None and seen[0]() is x and seen[1] == key:
        return True
    try:
        cal.__dict__["_vq_seen"] = (weakref.ref(x), key)
    except TypeError:  # an object without weak references is simply reduced every time
        cal.__dict__.pop("_vq_seen", None)
    return False


@torch.no_grad()
def _collect(self: MaxCalibrator, x: torch.Tensor) -> None:
    """`MaxCalibrator.collect`, with its NaN / negative / inf asserts kept on the device."""
    if self._track_amax or x.device.type == "meta":
        return _ORIGINAL_COLLECT(self, x)
    if _unchanged(self, x) and self._calib_amax is not None:
        return None
    local = _amax(x, self._axis)
    if self._calib_amax is None:
        self._calib_amax = local
        self.__dict__["_vq_min"] = local
        return None
    if local.shape != self._calib_amax.shape:
        raise RuntimeError("amax shape changed!")
    self._calib_amax = torch.maximum(self._calib_amax, local)
    self.__dict__["_vq_min"] = torch.minimum(self._vq_min, local)
    return None


_ORIGINAL_COLLECT = MaxCalibrator.collect


def _problems(model: torch.nn.Module) -> list[str]:
    """One device-to-host read for the whole model: the quantizers whose amax is bad."""
    named = [
        (name, m._calibrator)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "_calibrator", None), MaxCalibrator)
        and "_vq_min" in m._calibrator.__dict__
        and m._calibrator._calib_amax is not None
    ]
    if not named:
        return []
    device = named[0][1]._calib_amax.device
    flags = torch.stack(
        [
            torch.stack(
                [cal._calib_amax.isnan().any(), (cal._vq_min < 0).any(), cal._calib_amax.isinf().any()]
            ).to(device)
            for _, cal in named
        ]
    ).tolist()
    kinds = ("nan values", "negative values (after abs)", "inf values")
    return [
        f"{name}: detected {kind} in amax"
        for (name, _), row in zip(named, flags)
        for kind, bad in zip(kinds, row)
        if bad
    ]


def _forget(model: torch.nn.Module) -> None:
    for m in model.modules():
        cal = getattr(m, "_calibrator", None)
        if isinstance(cal, MaxCalibrator):
            for key in ("_vq_seen", "_vq_min"):
                cal.__dict__.pop(key, None)


def calibrating(orig: Callable) -> Callable:
    """ModelOpt's `calibrate` (or a wrapper of it) run under `deferred_checks`."""

    def calibrate(model, algorithm="max", forward_loop=None):
        with deferred_checks(model):
            return orig(model, algorithm, forward_loop)

    return calibrate


@contextlib.contextmanager
def deferred_checks(model: torch.nn.Module) -> Iterator[None]:
    """Calibrate `model` with the sync-free collect; check every amax once at the end."""
    MaxCalibrator.collect = _collect
    try:
        yield
        bad = _problems(model)
        if bad:
            raise AmaxProblem(f"{'; '.join(bad[:5])} ({len(bad)} in all): {_FIX}")
    finally:
        MaxCalibrator.collect = _ORIGINAL_COLLECT
        _forget(model)
