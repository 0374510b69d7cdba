"""Matplotlib figures: per-run layer sensitivity, per-sweep Pareto fronts (logged to MLflow)."""

from __future__ import annotations

# The object-oriented API only: no pyplot, so no GUI backend, no global figure state and no
# REPL hooks (pyplot imports IPython hooks, which raced with MLflow's thread importing IPython).
from matplotlib.figure import Figure

from .manifest import FP8, LayerRow

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def sensitivity(rows: list[LayerRow], title: str) -> Figure:
    """FP8 sensitivity score per decoder layer, one panel row per projection, coloured by format."""
    by_proj: dict[str, list[tuple[int, float, str]]] = {}
    for r in rows:
        pos = r.position()
        fp8_scores = [v for k, v in r.scores.items() if k != "BF16"]
        if pos is None or not fp8_scores:
            continue
        by_proj.setdefault(pos[1], []).append((pos[0], min(fp8_scores), r.format))
    projs = [p for p in PROJECTIONS if p in by_proj] + sorted(set(by_proj) - set(PROJECTIONS))
    fig = Figure(figsize=(9, 1.3 * max(len(projs), 1) + 1))
    axes = fig.subplots(len(projs) or 1, 1, sharex=True, squeeze=False)
    for ax, proj in zip(axes[:, 0], projs):
        pts = sorted(by_proj[proj])
        for fmt, colour in ((FP8, "tab:blue"), ("BF16", "tab:orange")):
            sel = [(i, s) for i, s, f in pts if f == fmt]
            if sel:
                ax.bar([i for i, _ in sel], [max(s, 1e-30) for _, s in sel], color=colour,
                       label=fmt)
        ax.set_yscale("log")
        ax.set_ylabel(proj, rotation=0, ha="right", va="center")
    axes[0, 0].legend(loc="upper right", fontsize="small")
    axes[-1, 0].set_xlabel("decoder layer")
    fig.suptitle(f"{title}: FP8 sensitivity score per layer (lower = safer to quantize)")
    fig.tight_layout()
    return fig


def pareto(points: list[dict]) -> Figure:
    """Effective bits vs KL and vs perplexity change, one labelled point per scheme."""
    fig = Figure(figsize=(11, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    for ax, key, label in ((ax1, "kl_mean", "mean KL(BF16 || quantized)"),
                           (ax2, "ppl_rel_change", "relative perplexity change")):
        for p in points:
            if p.get(key) is None:
                continue
            ax.scatter(p["effective_bits"], p[key], s=36)
            ax.annotate(p["scheme"], (p["effective_bits"], p[key]), fontsize="small",
                        xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("effective bits (searched layers)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle("Schemes: bits against accuracy loss")
    fig.tight_layout()
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
