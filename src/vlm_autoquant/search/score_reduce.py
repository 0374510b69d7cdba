"""The gradient search's per-module score, in one pass over its two tensors on the GPU.

For every scored module, format and batch, ModelOpt's `_get_auto_quantize_score(g, d)` computes
sum(clamp(float(g) * float(d), -1e10, 1e10) ** 2), g the gradient at the module's output and
d = Q(Y) - Y. In eager PyTorch that is six kernels and four output-sized float32 temporaries;
on the 3B they take about a seventh of a score batch. `score` computes the same elementwise
values in one Triton kernel that reads g and d once and writes one float32 partial sum per
block of `BLOCK` elements; torch then sums the partials in a fixed order, so a score is the
same from run to run. The kernel is compiled without FMA contraction, so every product and
square is rounded as in eager PyTorch: a score differs from ModelOpt's only in the order of the
float32 summation.

Anything the kernel does not cover (CPU tensors, shapes or dtypes that differ, no Triton) goes
to ModelOpt's own function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import modelopt.torch.quantization.algorithms as mq_algorithms
import torch

log = logging.getLogger(__name__)

BLOCK = 8192  # elements per program: about 11,000 partial sums for a 16x512 batch's gate_proj
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MODELOPT_SCORE = mq_algorithms._get_auto_quantize_score


def _define_kernel() -> Callable | None:
    """The Triton kernel where a GPU and Triton are there (ModelOpt has imported Triton then)."""
    if not torch.cuda.is_available():
        return None
    try:
        import triton  # importable only where a CUDA build of torch is installed
        import triton.language as tl  # same reason
    except ImportError as exc:
        log.info("the fused score needs Triton (%s): ModelOpt's eager score is used", exc)
        return None

    @triton.jit
    def score_blocks(g_ptr, d_ptr, out_ptr, n, BLOCK: tl.constexpr):  # noqa: N803 (Triton's style)
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.maximum(g * d, -1e10, propagate_nan=tl.PropagateNan.ALL)  # as torch.clamp: NaN stays
        x = tl.minimum(x, 1e10, propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_ptr + pid, tl.sum(x * x, axis=0))

    return score_blocks


_KERNEL = _define_kernel()


def fusable(grad_output: torch.Tensor, output_diff: torch.Tensor) -> bool:
    """Whether `score` runs the fused kernel for these tensors (else ModelOpt's function)."""
    return (
        grad_output.is_cuda
        and output_diff.device == grad_output.device
        and same_layout(grad_output, output_diff)
    )


def same_layout(grad_output: torch.Tensor, output_diff: torch.Tensor) -> bool:
    """One element of each per output element, in dtypes the kernel reads, and at least one."""
    return (
        grad_output.shape == output_diff.shape
        and grad_output.dtype in _DTYPES
        and output_diff.dtype in _DTYPES
        and grad_output.numel() > 0
    )


def score(grad_output: torch.Tensor, output_diff: torch.Tensor) -> torch.Tensor:
    """sum(clamp(float(g) * float(d), -1e10, 1e10)^2) as a float32 0-d tensor on g's device.

    Should the kernel fail (a Triton too old to compile it, say), the warning says so once and
    ModelOpt's function scores from then on."""
    global _KERNEL  # set to None when the kernel cannot run here
    kernel = _KERNEL if fusable(grad_output, output_diff) else None
    if kernel is None:
        return _MODELOPT_SCORE(grad_output, output_diff)
    g, d = grad_output.contiguous(), output_diff.contiguous()
    n = g.numel()
    partials = torch.empty(-(-n // BLOCK), dtype=torch.float32, device=g.device)
    try:
        with torch.cuda.device(g.device):
            kernel[(partials.numel(),)](g, d, partials, n, BLOCK=BLOCK, num_warps=8, enable_fp_fusion=False)
    except Exception as exc:  # noqa: BLE001 - Triton's compile errors have no common base class
        _KERNEL = None
        log.warning(
            "the fused score failed (%s: %s); ModelOpt's eager score is used", type(exc).__name__, exc
        )
        return _MODELOPT_SCORE(grad_output, output_diff)
    return partials.sum()


def add_score(grad_output: torch.Tensor, output_diff: torch.Tensor, score_tensor: torch.Tensor) -> None:
    """ModelOpt's `_add_auto_quantize_score`: `score` added into a running total in place."""
    score_tensor += score(grad_output, output_diff)
