"""The projections a serving engine fuses into one GEMM: q/k/v of an attention, gate/up of an MLP."""

from __future__ import annotations

from collections import defaultdict

# The projections the engines fuse into one GEMM, in their order inside the fused weight.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fused_layer_groups(names: list[str] | set[str]) -> list[list[str]]:
    """Layer names (`model.layers.0.self_attn.q_proj`, ...) grouped as the engines fuse them."""
    children: dict[str, set[str]] = defaultdict(set)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        children[parent].add(leaf)
    return [
        [f"{parent}.{leaf}" if parent else leaf for leaf in leaves]
        for parent, kids in sorted(children.items())
        for leaves in FUSED_SIBLINGS
        if kids.issuperset(leaves)
    ]
