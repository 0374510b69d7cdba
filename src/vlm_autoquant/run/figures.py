"""Matplotlib figures: per-run layer sensitivity, per-sweep Pareto fronts (logged to MLflow)."""

from __future__ import annotations

# The object-oriented API only: no pyplot, so no GUI backend, no global figure state and no
# REPL hooks (pyplot imports IPython hooks, which raced with MLflow's thread importing IPython).
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from .manifest import BF16, LayerRow

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# One colour per FP8 format in order of appearance; BF16 (kept unquantized) always grey-orange.
FP8_COLOURS = ("tab:blue", "tab:green", "tab:purple", "tab:cyan", "tab:olive")
BF16_COLOUR = "tab:orange"
BF16_LABEL = "BF16 (kept)"
SCORE_LABEL = "sensitivity score (log scale; est. loss increase, a.u.)"
LAYER_LABEL = "decoder layer (index)"


def _fmt_label(row: LayerRow) -> str:
    return BF16_LABEL if row.format == BF16 else f"FP8: {row.quant_config}"


def sensitivity(rows: list[LayerRow], title: str) -> Figure:
    """Sensitivity of each layer's least sensitive FP8 format, one panel per projection.

    Bars are coloured by the format the search chose (each FP8 format its own colour, BF16
    apart); one figure-level legend lists every format present in any panel.
    """
    by_proj: dict[str, list[tuple[int, float, str]]] = {}
    for r in rows:
        pos = r.position()
        fp8_scores = [v for k, v in r.scores.items() if k != BF16]
        if pos is None or not fp8_scores:
            continue
        by_proj.setdefault(pos[1], []).append((pos[0], min(fp8_scores), _fmt_label(r)))
    projs = [p for p in PROJECTIONS if p in by_proj] + sorted(set(by_proj) - set(PROJECTIONS))
    fp8_labels = list(dict.fromkeys(label for p in projs for _, _, label in sorted(by_proj[p])
                                    if label != BF16_LABEL))
    colours = {label: FP8_COLOURS[i % len(FP8_COLOURS)] for i, label in enumerate(fp8_labels)}
    colours[BF16_LABEL] = BF16_COLOUR
    present = fp8_labels + ([BF16_LABEL] if any(f == BF16_LABEL for p in by_proj.values()
                                                for _, _, f in p) else [])

    fig = Figure(figsize=(9, 1.3 * max(len(projs), 1) + 1.6))
    axes = fig.subplots(len(projs) or 1, 1, sharex=True, squeeze=False)[:, 0]
    for ax, proj in zip(axes, projs):
        pts = sorted(by_proj[proj])
        ax.bar([i for i, _, _ in pts], [max(s, 1e-30) for _, s, _ in pts],
               color=[colours[f] for _, _, f in pts])
        ax.set_yscale("log")
        ax.set_ylabel(proj, rotation=0, ha="right", va="center")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel(LAYER_LABEL)
    fig.supylabel(SCORE_LABEL, fontsize="small")
    fig.suptitle(f"{title}: per-layer sensitivity by chosen format (lower = safer to quantize)")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.legend(handles=[Patch(color=colours[f], label=f) for f in present], loc="upper center",
               bbox_to_anchor=(0.5, 0.955), ncol=max(len(present), 1), fontsize="small",
               frameon=False)
    return fig


def spread(targets: list[float], gap: float, lo: float = 0.0, hi: float = 1.0) -> list[float]:
    """Positions as close to `targets` (ascending) as possible, at least `gap` apart, in [lo, hi]."""
    if not targets:
        return []
    gap = min(gap, (hi - lo) / max(len(targets) - 1, 1))
    out = []
    for t in targets:
        out.append(max(min(max(t, lo), hi), out[-1] + gap) if out else min(max(t, lo), hi))
    if out[-1] > hi:  # pushed past the top: walk back down
        out[-1] = hi
        for i in range(len(out) - 2, -1, -1):
            out[i] = min(out[i], out[i + 1] - gap)
    return out


def _label_column(ax, pts: list[tuple[float, float, str]]) -> None:
    """Name each point in a column right of the axes, in the points' vertical order, each label
    at least one text line from the next, with a leader line to its point: no two overlap."""
    lo, hi = ax.get_ylim()
    frac = [(y - lo) / (hi - lo) if hi > lo else 0.5 for _, y, _ in pts]
    order = sorted(range(len(pts)), key=lambda i: (frac[i], pts[i][2]))
    places = spread([frac[i] for i in order], gap=0.085)
    for i, place in zip(order, places):
        x, y, name = pts[i]
        ax.annotate(name, (x, y), xytext=(1.03, place), textcoords="axes fraction",
                    fontsize="small", va="center", ha="left",
                    arrowprops=dict(arrowstyle="-", color="0.6", lw=0.6, shrinkA=0, shrinkB=3))


PARETO_AXES = (
    ("kl_mean", "mean KL(BF16 || quantized) per token (nats)"),
    ("ppl_rel_change", "perplexity change (ppl_quant / ppl_ref - 1)"),
)


def pareto(points: list[dict]) -> Figure:
    """Effective bits vs KL and vs perplexity change, one point per scheme, names in a column."""
    n = max(len(points), 1)
    fig = Figure(figsize=(13, max(4.2, 0.3 * n + 1.5)))
    axes = fig.subplots(1, 2)
    for ax, (key, label) in zip(axes, PARETO_AXES):
        pts = [(p["effective_bits"], p[key], p["scheme"]) for p in points
               if p.get(key) is not None]
        ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], s=36, zorder=3)
        ax.margins(x=0.08, y=0.1)
        _label_column(ax, pts)
        ax.set_xlabel("effective bits per weight (searched layers)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Schemes: bits against accuracy loss")
    fig.subplots_adjust(left=0.07, right=0.84, wspace=0.75, bottom=0.14, top=0.9)
    return fig


def predicted_vs_measured(rows: list[dict]) -> Figure:
    """The search's predicted loss (sum of chosen scores) against the measured KL, per scheme."""
    fig = Figure(figsize=(6, 4.2))
    ax = fig.subplots()
    for r in rows:
        ax.scatter(r["predicted_loss"], r["kl_mean"], s=36)
        ax.annotate(r["scheme"], (r["predicted_loss"], r["kl_mean"]), fontsize="small",
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("predicted loss (sum of chosen candidates' scores)")
    ax.set_ylabel("measured mean KL(BF16 || quantized) per token")
    ax.grid(alpha=0.3)
    fig.suptitle("Does the search's score predict the damage?")
    fig.tight_layout()
    return fig
