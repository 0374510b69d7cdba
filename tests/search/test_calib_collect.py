"""The sync-free max calibration gives ModelOpt's own amax, bit for bit, and refuses what
ModelOpt's asserts refuse, without reading a value back to the host per quantizer."""

from __future__ import annotations

import copy

import modelopt.torch.quantization as mtq
import pytest
import torch
from modelopt.torch.quantization.calib import MaxCalibrator
from modelopt.torch.quantization.nn import TensorQuantizer

from vlm_autoquant.search import calib_collect

CUDA = pytest.param(
    "cuda",
    marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU: the same check on the GPU's reductions"
    ),
)


def _model(device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 32), torch.nn.Linear(32, 16)
    ).to(device, torch.bfloat16)


def _batches(bad: float | None = None, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = [torch.randn(4, 7, 64, generator=g).to(torch.bfloat16) * (i + 1) for i in range(5)]
    if bad is not None:
        out[3][1, 2, 5] = bad
    return [b.to(device) for b in out]


def _quantize(model: torch.nn.Module, batches: list[torch.Tensor], deferred: bool) -> None:
    def loop(m: torch.nn.Module) -> None:
        for b in batches:
            m(b)

    cfg = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    if deferred:
        with calib_collect.deferred_checks(model):
            mtq.quantize(model, cfg, loop)
    else:
        mtq.quantize(model, cfg, loop)


def _amaxes(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.amax for n, m in model.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_amax_is_modelopts_bit_for_bit(device):
    ref, fast = _model(device), _model(device)
    _quantize(ref, _batches(device=device), deferred=False)
    _quantize(fast, _batches(device=device), deferred=True)
    a, b = _amaxes(ref), _amaxes(fast)
    assert len(a) == 6 and a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert MaxCalibrator.collect is calib_collect._ORIGINAL_COLLECT  # restored on exit


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("bad, kind", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_a_bad_activation_fails_like_modelopt_and_names_the_quantizer(bad, kind, device):
    with pytest.raises(AssertionError, match=kind):
        _quantize(_model(device), _batches(bad, device), deferred=False)  # ModelOpt's own refusal
    with pytest.raises(calib_collect.AmaxProblem, match=rf"0\.input_quantizer: detected {kind}"):
        _quantize(_model(device), _batches(bad, device), deferred=True)
    assert MaxCalibrator.collect is calib_collect._ORIGINAL_COLLECT


def test_no_value_is_read_back_per_collect(monkeypatch):
    reads = []
    orig_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or orig_bool(t))
    cal = MaxCalibrator()
    x = torch.randn(16, 32)
    with calib_collect.deferred_checks(torch.nn.Module()):
        for _ in range(4):
            calib_collect._collect(cal, x * 2)
    assert reads == []
    calib_collect._ORIGINAL_COLLECT(cal, x)  # ModelOpt's collect reads three per call
    assert len(reads) >= 3


def test_an_unchanged_weight_is_not_reduced_again_but_an_updated_one_is():
    cal = MaxCalibrator()
    w = torch.tensor([[1.0, -3.0], [2.0, 0.5]])
    with calib_collect.deferred_checks(torch.nn.Module()):
        calib_collect._collect(cal, w)
        calib_collect._collect(cal, w)
        assert cal.compute_amax().item() == 3.0
        w.mul_(2)  # in place: the version counter moves, so the tensor is reduced again
        calib_collect._collect(cal, w)
        assert cal.compute_amax().item() == 6.0
        calib_collect._collect(cal, torch.full((2, 2), -7.0))
        assert cal.compute_amax().item() == 7.0


def test_calibration_under_inference_mode_gives_modelopts_amax():
    ref, fast = _model(), _model()
    with torch.inference_mode():
        _quantize(ref, _batches(), deferred=False)
        _quantize(fast, _batches(), deferred=True)
    a, b = _amaxes(ref), _amaxes(fast)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
