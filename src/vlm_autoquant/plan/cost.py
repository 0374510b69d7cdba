"""Effective-bits accounting: which LM linears count, the achievable range, achieved bits.

Mirrors ModelOpt's weight cost model: a layer costs numel * bits / 16 "BF16-equivalent" weights;
layers matched by the excluded patterns cost nothing (ModelOpt's
constraints["cost"]["excluded_module_name_patterns"]); disabled layers stay at 16 bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch

BF16_BITS = 16


def matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch(name, p) for p in patterns)


@dataclass(frozen=True)
class BitsRange:
    low: float
    high: float
    counted_weights: int

    def contains(self, bits: float, tol: float = 1e-9) -> bool:
        return self.low - tol <= bits <= self.high + tol

    def __str__(self) -> str:
        return f"[{self.low:.4g}, {self.high:.4g}]"


def bits_range(
    numels: dict[str, int], disabled: list[str], excluded: list[str], min_format_bits: int
) -> BitsRange:
    """The effective bits a search can reach: all searched layers at the smallest format, to BF16."""
    counted = {n: k for n, k in numels.items() if not matches(n, excluded)}
    total = sum(counted.values())
    if total == 0:
        return BitsRange(float("nan"), float("nan"), 0)
    low = (
        sum(k * (BF16_BITS if matches(n, disabled) else min_format_bits) for n, k in counted.items()) / total
    )
    return BitsRange(low, float(BF16_BITS), total)


def effective_bits(numels: dict[str, int], bits: dict[str, int], excluded: list[str]) -> float:
    """Weighted mean bits over the layers not matched by `excluded` (all layers if it is [])."""
    counted = {n: k for n, k in numels.items() if not matches(n, excluded)}
    total = sum(counted.values())
    return sum(k * bits[n] for n, k in counted.items()) / total if total else float("nan")


def weight_bytes(numels: dict[str, int], bits: dict[str, int]) -> int:
    """Weight bytes of the linears after quantization (FP8 = 1 byte, BF16 = 2)."""
    return sum(k * bits[n] // 8 for n, k in numels.items())
