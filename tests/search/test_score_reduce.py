"""The gradient score of a module in one fused pass: ModelOpt's value, routed only where it runs."""

from __future__ import annotations

import pytest
import torch
from modelopt.torch.quantization import algorithms as mq_algorithms
from modelopt.torch.quantization import extensions

from vlm_autoquant.search import autoquant, score_reduce

from .test_autoquant import FP8, fresh, run_search, spec

MODELOPT_SCORE = mq_algorithms._get_auto_quantize_score
NEEDS_KERNEL = pytest.mark.skipif(
    score_reduce._KERNEL is None,
    reason="needs a CUDA GPU and Triton: the fused kernel runs only there (CPU runs ModelOpt's score)",
)


def _pair(shape: tuple[int, ...], device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen).to(torch.bfloat16)
    d = (1e-2 * torch.randn(shape, generator=gen)).to(torch.bfloat16)
    return g.to(device), d.to(device)


def test_cpu_tensors_get_modelopts_own_score_bit_for_bit():
    g, d = _pair((3, 5, 40))
    assert not score_reduce.fusable(g, d)
    assert torch.equal(score_reduce.score(g, d), MODELOPT_SCORE(g, d))
    total = torch.zeros((), dtype=torch.float32)
    score_reduce.add_score(g, d, total)
    score_reduce.add_score(g, d, total)
    assert torch.equal(total, 2 * MODELOPT_SCORE(g, d))


def test_only_matching_float_tensors_have_the_kernels_layout():
    g, d = _pair((4, 8))
    assert score_reduce.same_layout(g, d) and score_reduce.same_layout(g.float(), d)
    assert score_reduce.same_layout(g.t(), d.t())  # a view is made contiguous first
    assert not score_reduce.same_layout(g, d[:2])
    assert not score_reduce.same_layout(g.to(torch.int32), d)
    assert not score_reduce.same_layout(g[:0], d[:0])


def test_a_search_scores_through_the_fused_function_and_restores_modelopts(
    demo, batches, tmp_path, monkeypatch
):
    """During scoring ModelOpt calls `score_reduce` (here its CPU route, ModelOpt's function);
    after the search ModelOpt's own functions are back."""
    calls: list[tuple[int, ...]] = []

    def counting(g: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(g.shape))
        return MODELOPT_SCORE(g, d)

    monkeypatch.setattr(score_reduce, "_MODELOPT_SCORE", counting)
    run_search(fresh(demo), batches, tmp_path / "s.pth", spec((FP8,)))
    assert len(calls) > 2 * 4  # every scored module, both score steps
    assert mq_algorithms._get_auto_quantize_score is MODELOPT_SCORE
    assert mq_algorithms._add_auto_quantize_score is not score_reduce.add_score


@NEEDS_KERNEL
@pytest.mark.parametrize("shape", [(1, 1), (7, 8191), (16, 512, 2048), (3, 65537)])
def test_fused_score_equals_modelopts_on_the_gpu(shape):
    g, d = _pair(shape, "cuda")
    fused, eager = score_reduce.score(g, d), MODELOPT_SCORE(g, d)
    assert fused.dtype == torch.float32 and fused.shape == ()
    assert fused.item() == pytest.approx(eager.item(), rel=1e-5) and eager.item() > 0
    assert torch.equal(fused, score_reduce.score(g, d))  # deterministic: fixed summation order
    assert score_reduce._KERNEL is not None  # the kernel ran: no fall-back to ModelOpt's function


@NEEDS_KERNEL
def test_fused_score_clamps_and_keeps_nan_as_modelopt_does():
    g, d = _pair((5, 1000), "cuda")
    big = g.clone()
    big[0, 3], big[2, 7] = 1e30, -1e30  # products beyond 1e10: each adds (1e10)^2
    d_big = d.clone()
    d_big[0, 3], d_big[2, 7] = 1.0, 1.0
    assert score_reduce.score(big, d_big).item() == pytest.approx(MODELOPT_SCORE(big, d_big).item(), rel=1e-5)
    assert score_reduce.score(big, d_big).item() >= 2e20
    g[1, 1] = float("nan")
    assert torch.isnan(score_reduce.score(g, d)) and torch.isnan(MODELOPT_SCORE(g, d))
    assert score_reduce._KERNEL is not None


@NEEDS_KERNEL
def test_fused_score_of_a_transposed_view_equals_modelopts():
    g, d = _pair((64, 300), "cuda")
    gt, dt = g.t(), d.t()
    assert not gt.is_contiguous()
    assert score_reduce.score(gt, dt).item() == pytest.approx(MODELOPT_SCORE(gt, dt).item(), rel=1e-5)


@NEEDS_KERNEL
def test_a_gpu_search_chooses_the_same_formats_with_the_fused_score(demo, batches, tmp_path, monkeypatch):
    """The tiny model searched on the GPU twice, fused and with ModelOpt's eager score: every
    group's score agrees to float32 summation order, so the solve picks the same formats."""
    # ModelOpt's eager FP8 fake quant: no JIT build of its CUDA extension inside a test.
    monkeypatch.setattr(extensions.get_cuda_ext_fp8, "extension", None, raising=False)

    def searched(tag: str):
        model = fresh(demo).to("cuda")
        on_gpu = [{k: v.to("cuda") for k, v in b.items()} for b in batches]
        found = run_search(model, on_gpu, tmp_path / f"{tag}.pth", spec((FP8,)))
        return model, found

    fused_model, fused = searched("fused")
    monkeypatch.setattr(score_reduce, "_KERNEL", None)
    eager_model, eager = searched("eager")
    assert fused.stats.keys() == eager.stats.keys()
    for name, stat in fused.stats.items():
        assert stat["raw_scores"] == pytest.approx(eager.stats[name]["raw_scores"], rel=1e-5)
    for bits in (9.0, 12.0):
        chosen = [
            {g.name: g.chosen for g in autoquant.solve(m, f, [FP8], bits).groups}
            for m, f in ((fused_model, fused), (eager_model, eager))
        ]
        assert chosen[0] == chosen[1]
