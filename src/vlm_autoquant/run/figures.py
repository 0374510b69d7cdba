"""Matplotlib figures: per-run layer sensitivity, per-sweep Pareto fronts (logged to MLflow)."""

from __future__ import annotations

# The object-oriented API only: no pyplot, so no GUI backend, no global figure state and no
# REPL hooks (pyplot imports IPython hooks, which raced with MLflow's thread importing IPython).
import math

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from .manifest import BF16, LayerRow

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# One colour per FP8 format in order of appearance; BF16 (kept unquantized) always grey-orange.
FP8_COLOURS = ("tab:blue", "tab:green", "tab:purple", "tab:cyan", "tab:olive")
BF16_COLOUR = "tab:orange"
BF16_LABEL = "BF16 (kept)"
SCORE_LABEL = "sensitivity score (log scale; est. loss increase, a.u.)"
METHOD_COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:purple")
LAYER_LABEL = "decoder layer (index)"


def _fmt_label(row: LayerRow) -> str:
    return BF16_LABEL if row.format == BF16 else f"FP8: {row.quant_config}"


def sensitivity(rows: list[LayerRow], title: str) -> Figure:
    """Sensitivity of each layer's least sensitive FP8 format, one panel per projection.

    Bars are coloured by the format the search chose (each FP8 format its own colour, BF16
    apart); one figure-level legend lists every format present in any panel.
    """
    by_proj = _by_projection(rows)
    projs = [p for p in PROJECTIONS if p in by_proj] + sorted(set(by_proj) - set(PROJECTIONS))
    colours, present = _format_colours(by_proj, projs)
    floor, top = score_range([s for p in by_proj.values() for _, s, _ in p])
    height = 1.3 * max(len(projs), 1) + 1.6
    fig = Figure(figsize=(9, height))
    axes = fig.subplots(len(projs) or 1, 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    for ax, proj in zip(axes, projs):
        pts = sorted(by_proj[proj])
        # Every bar starts at the shared floor; a score at or below it (0 included) is a stub.
        ax.bar(
            [i for i, _, _ in pts],
            [max(s, floor * 1.15) - floor for _, s, _ in pts],
            bottom=floor,
            color=[colours[f] for _, _, f in pts],
        )
        ax.set_yscale("log")
        ax.set_ylabel(proj, rotation=0, ha="right", va="center")
    for ax in axes:
        ax.set_ylim(floor, top)
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1].set_xlabel(LAYER_LABEL)
    fig.supylabel(
        f"{SCORE_LABEL}\nbars start at {floor:.0e}, one decade below the smallest "
        "score; 0 is drawn at the floor",
        fontsize="small",
    )
    fig.suptitle(f"{title}: per-layer sensitivity by chosen format (lower = safer to quantize)")
    # Margins in inches, fixed: tight_layout measured every tick label (a third of the log phase).
    fig.subplots_adjust(left=1.75 / 9, right=0.97, bottom=0.6 / height, top=1 - 0.95 / height, hspace=0.12)
    fig.legend(
        handles=[Patch(color=colours[f], label=f) for f in present],
        loc="upper center",
        bbox_to_anchor=(0.5, 0.955),
        ncol=max(len(present), 1),
        fontsize="small",
        frameon=False,
    )
    return fig


def _by_projection(rows: list[LayerRow]) -> dict[str, list[tuple[int, float, str]]]:
    """Projection -> (layer index, least FP8 score, chosen format's label) of each scored layer."""
    by_proj: dict[str, list[tuple[int, float, str]]] = {}
    for r in rows:
        pos = r.position()
        fp8_scores = [v for k, v in r.scores.items() if k != BF16]
        if pos is None or not fp8_scores:
            continue
        by_proj.setdefault(pos[1], []).append((pos[0], min(fp8_scores), _fmt_label(r)))
    return by_proj


def _format_colours(
    by_proj: dict[str, list[tuple[int, float, str]]], projs: list[str]
) -> tuple[dict[str, str], list[str]]:
    """A colour per format label (BF16 apart), and the labels present, in the legend's order."""
    fp8_labels = list(
        dict.fromkeys(label for p in projs for _, _, label in sorted(by_proj[p]) if label != BF16_LABEL)
    )
    colours = {label: FP8_COLOURS[i % len(FP8_COLOURS)] for i, label in enumerate(fp8_labels)}
    colours[BF16_LABEL] = BF16_COLOUR
    present = fp8_labels + (
        [BF16_LABEL] if any(f == BF16_LABEL for p in by_proj.values() for _, _, f in p) else []
    )
    return colours, present


def score_range(scores: list[float]) -> tuple[float, float]:
    """(floor, top) shared by every panel: whole decades, the floor one decade below the smallest
    positive score, so the smallest bar is a decade tall and panels compare directly."""
    positive = [s for s in scores if s > 0] or [1.0]
    floor = 10.0 ** (math.floor(math.log10(min(positive))) - 1)
    top = 10.0 ** math.ceil(math.log10(max(positive)) + 1e-9)
    return floor, max(top, floor * 100)


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
    at least one text line from the next. A leader runs level from its point to the axes' right
    edge, then to its label: level runs never cross, and the runs in the margin start and end
    in the same order, so no two leaders cross and no two labels overlap."""
    ax.set_xlim(*ax.get_xlim())  # frozen: the leaders must not move the limits
    ax.set_ylim(*ax.get_ylim())
    lo, hi = ax.get_ylim()
    right = ax.get_xlim()[1]
    frac = [(y - lo) / (hi - lo) if hi > lo else 0.5 for _, y, _ in pts]
    order = sorted(range(len(pts)), key=lambda i: (frac[i], pts[i][2]))
    places = spread([frac[i] for i in order], gap=0.085)
    for i, place in zip(order, places):
        x, y, name = pts[i]
        ax.plot([x, right], [y, y], color="0.6", lw=0.6, zorder=1, clip_on=False)
        ax.annotate(
            name,
            (1.0, frac[i]),
            xycoords="axes fraction",
            xytext=(1.03, place),
            textcoords="axes fraction",
            fontsize="small",
            va="center",
            ha="left",
            arrowprops=dict(arrowstyle="-", color="0.6", lw=0.6, shrinkA=0, shrinkB=0),
        )


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
        pts = [(p["effective_bits"], p[key], p["scheme"]) for p in points if p.get(key) is not None]
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
    """The search's predicted loss (sum of chosen scores) against the measured KL, per scheme:
    one colour per scoring method (their scores are not on one scale), names in a column."""
    methods = list(dict.fromkeys(r.get("method") or "?" for r in rows))
    colour = {m: METHOD_COLOURS[i % len(METHOD_COLOURS)] for i, m in enumerate(methods)}
    fig = Figure(figsize=(8, max(4.2, 0.3 * len(rows) + 1.5)))
    ax = fig.subplots()
    ax.scatter(
        [r["predicted_loss"] for r in rows],
        [r["kl_mean"] for r in rows],
        s=36,
        c=[colour[r.get("method") or "?"] for r in rows],
        zorder=3,
    )
    ax.margins(x=0.08, y=0.1)
    _label_column(ax, [(r["predicted_loss"], r["kl_mean"], r["scheme"]) for r in rows])
    ax.set_xlabel("predicted loss (sum of chosen candidates' scores)")
    ax.set_ylabel("measured mean KL(BF16 || quantized) per token")
    ax.grid(alpha=0.3)
    ax.legend(
        handles=[Line2D([], [], marker="o", ls="", color=colour[m], label=f"scored by {m}") for m in methods],
        loc="best",
        fontsize="small",
        title="search method",
        title_fontsize="small",
    )
    fig.suptitle("Does the search's score predict the damage?")
    fig.subplots_adjust(left=0.12, right=0.7, bottom=0.13, top=0.9)
    return fig
