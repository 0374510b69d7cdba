"""The figures say what they show: legend entries, tick values, axis labels, label placement."""

from __future__ import annotations

import itertools

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from vlm_autoquant.run import figures
from vlm_autoquant.run.manifest import LayerRow

PCPT = ("FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG")


def row(layer: int, proj: str, chosen: str | None, scores: dict[str, float]) -> LayerRow:
    kind = "mlp" if proj.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
    return LayerRow(
        name=f"model.layers.{layer}.{kind}.{proj}",
        group="g",
        format="BF16" if chosen is None else "FP8",
        quant_config=chosen,
        num_weights=100,
        scores={"BF16": 0.0, **scores},
        costs={},
        cost_counted=True,
        disabled=False,
    )


def pcpt_rows(n_layers: int = 5) -> list[LayerRow]:
    """The pcpt scheme's shape: each projection offered both FP8 formats, a mix chosen.

    q_proj only ever takes per-tensor FP8 and down_proj only per-channel, so the union of the
    formats present is spread over panels and no single panel shows all of them.
    """
    rows = []
    for i in range(n_layers):
        scores = {PCPT[0]: 10.0 ** -(i % 3 + 1), PCPT[1]: 10.0 ** -(i % 2 + 2)}
        rows.append(row(i, "q_proj", PCPT[0], scores))
        rows.append(row(i, "down_proj", PCPT[1] if i % 2 else None, scores))
    return rows


def legend_texts(fig) -> list[str]:
    return [t.get_text() for leg in fig.legends for t in leg.get_texts()] + [
        t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()
    ]


def test_sensitivity_legend_lists_every_format_across_panels_with_distinct_colours():
    fig = figures.sensitivity(pcpt_rows(), "fp8-pcpt-10b")
    labels = legend_texts(fig)
    assert sorted(labels) == sorted([f"FP8: {PCPT[0]}", f"FP8: {PCPT[1]}", figures.BF16_LABEL])
    handles = fig.legends[0].legend_handles
    colours = {h.get_label(): tuple(h.get_facecolor()) for h in handles}
    assert len(set(colours.values())) == 3  # two FP8 formats and BF16, each its own colour
    # Each bar's colour is its legend entry's: q_proj panel bars are all per-tensor FP8.
    q_ax = next(ax for ax in fig.axes if ax.get_ylabel() == "q_proj")
    assert {tuple(p.get_facecolor()) for p in q_ax.patches} == {colours[f"FP8: {PCPT[0]}"]}


def test_sensitivity_single_format_all_fp8_has_no_bf16_entry():
    rows = [row(i, "o_proj", PCPT[0], {PCPT[0]: 1e-3}) for i in range(3)]
    assert legend_texts(figures.sensitivity(rows, "fp8-all-8b")) == [f"FP8: {PCPT[0]}"]


@pytest.mark.parametrize("n_layers", [2, 4, 36])
def test_sensitivity_layer_ticks_are_integers_and_axes_labelled(n_layers):
    fig = figures.sensitivity(pcpt_rows(n_layers), "s")
    FigureCanvasAgg(fig).draw()
    bottom = fig.axes[-1]
    lo, hi = bottom.get_xlim()
    ticks = [t for t in bottom.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert bottom.get_xlabel() == figures.LAYER_LABEL and "index" in bottom.get_xlabel()
    assert all(ax.get_yscale() == "log" for ax in fig.axes)
    assert "log scale" in fig.get_supylabel()


def test_sensitivity_panels_share_one_y_scale_with_the_floor_a_decade_below_the_smallest():
    rows = pcpt_rows(5) + [row(i, "o_proj", PCPT[0], {PCPT[0]: 3e-7 if i else 0.0}) for i in range(3)]
    fig = figures.sensitivity(rows, "s")
    FigureCanvasAgg(fig).draw()
    limits = {ax.get_ylim() for ax in fig.axes}
    assert len(limits) == 1, limits  # every panel the same scale
    ((lo, hi),) = limits
    assert lo == pytest.approx(1e-8) and hi >= 1e-1  # smallest positive score 3e-7, largest 0.1
    assert "1e-08" in fig.get_supylabel()
    heights = [p.get_y() + p.get_height() for ax in fig.axes for p in ax.patches]
    assert all(lo < h <= hi for h in heights)  # every bar, the 0 score too, is visible
    assert all(p.get_y() == pytest.approx(lo) for ax in fig.axes for p in ax.patches)
    smallest = min(heights)  # the 0 score: a stub above the floor, below the smallest score
    assert lo < smallest < 3e-7


def _label_boxes(fig):
    FigureCanvasAgg(fig).draw()
    renderer = fig.canvas.get_renderer()
    # Text's own extent: an Annotation's would include its leader line.
    return [(ax, t.get_text(), Text.get_window_extent(t, renderer)) for ax in fig.axes for t in ax.texts]


def test_pareto_labels_never_overlap_with_three_schemes_at_the_same_bits():
    points = [
        {"scheme": "fp8-all-8b", "effective_bits": 8.0, "kl_mean": 0.030, "ppl_rel_change": 0.040},
        {"scheme": "fp8-aggressive-9b", "effective_bits": 9.0, "kl_mean": 0.020, "ppl_rel_change": 0.025},
        {"scheme": "fp8-balanced-10b", "effective_bits": 10.0, "kl_mean": 0.0101, "ppl_rel_change": 0.0120},
        {"scheme": "fp8-kl-10b", "effective_bits": 10.0, "kl_mean": 0.0102, "ppl_rel_change": 0.0121},
        {"scheme": "fp8-pcpt-10b", "effective_bits": 10.0, "kl_mean": 0.0100, "ppl_rel_change": 0.0120},
        {"scheme": "fp8-conservative-12b", "effective_bits": 12.0, "kl_mean": 0.004, "ppl_rel_change": None},
    ]
    fig = figures.pareto(points)
    boxes = _label_boxes(fig)
    for ax in fig.axes:
        names = sorted(t for a, t, _ in boxes if a is ax)
        with_value = sorted(
            p["scheme"]
            for p in points
            if p["ppl_rel_change" if "perplexity" in ax.get_ylabel() else "kl_mean"] is not None
        )
        assert names == with_value
        assert ax.get_xlabel() and ax.get_ylabel()
    for (_, a, box_a), (_, b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"labels {a!r} and {b!r} overlap"
    width, height = fig.canvas.get_width_height()
    assert all(0 <= box.x0 and box.x1 <= width and 0 <= box.y0 and box.y1 <= height for _, _, box in boxes), (
        "a label runs off the figure"
    )
    assert "nats" in fig.axes[0].get_ylabel()


def _segments_cross(a, b, c, d) -> bool:
    """Segments ab and cd share a point other than an end they have in common."""

    def orient(p, q, r):
        v = (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])
        return 0 if abs(v) < 1e-6 else (1 if v > 0 else -1)

    def on(p, q, r):  # r strictly inside pq, collinear
        return (
            orient(p, q, r) == 0
            and min(p[0], q[0]) - 1e-6 <= r[0] <= max(p[0], q[0]) + 1e-6
            and min(p[1], q[1]) - 1e-6 <= r[1] <= max(p[1], q[1]) + 1e-6
            and r not in (p, q)
        )

    o1, o2, o3, o4 = orient(a, b, c), orient(a, b, d), orient(c, d, a), orient(c, d, b)
    if o1 * o2 < 0 and o3 * o4 < 0:
        return True
    return any(on(*seg, r) for seg, r in (((a, b), c), ((a, b), d), ((c, d), a), ((c, d), b)))


def _leaders(fig):
    """Every leader's segments in display coordinates, per label: the annotation's arrow, and
    the two-point line that continues it to its point where there is one."""
    FigureCanvasAgg(fig).draw()
    out = []
    for ax in fig.axes:
        inner = [
            tuple(map(tuple, ax.transData.transform(line.get_xydata())))
            for line in ax.lines
            if len(line.get_xydata()) == 2
        ]
        for t in ax.texts:
            path = t.arrow_patch.get_path().vertices  # from the label to the axes' edge
            start, end = tuple(path[-1]), tuple(path[0])
            runs = [
                seg for seg in inner if abs(seg[1][1] - start[1]) < 0.5 and abs(seg[1][0] - start[0]) < 0.5
            ]
            out.append((t.get_text(), runs[:1] + [(start, end)]))
    return out


def test_leaders_never_cross():
    points = [  # near-ties at different bits: straight leaders to the column would cross
        {"scheme": "a-8b", "effective_bits": 8.0, "kl_mean": 0.0100, "ppl_rel_change": 0.01},
        {"scheme": "b-12b", "effective_bits": 12.0, "kl_mean": 0.0104, "ppl_rel_change": 0.0104},
        {"scheme": "c-9b", "effective_bits": 9.0, "kl_mean": 0.0102, "ppl_rel_change": 0.0099},
        {"scheme": "d-16b", "effective_bits": 16.0, "kl_mean": 0.0098, "ppl_rel_change": 0.0101},
        {"scheme": "e-10b", "effective_bits": 10.0, "kl_mean": 0.0300, "ppl_rel_change": 0.0300},
    ]
    for fig in (
        figures.pareto(points),
        figures.predicted_vs_measured(
            [
                {
                    "scheme": p["scheme"],
                    "method": "gradient",
                    "predicted_loss": p["effective_bits"],
                    "kl_mean": p["kl_mean"],
                }
                for p in points
            ]
        ),
    ):
        leaders = _leaders(fig)
        assert len(leaders) == len(fig.axes) * len(points) if len(fig.axes) > 1 else len(points)
        for (a, segs_a), (b, segs_b) in itertools.combinations(leaders, 2):
            for sa in segs_a:
                for sb in segs_b:
                    if sa[0] in sb or sa[1] in sb:  # two axes' leaders share no point
                        continue
                    assert not _segments_cross(*sa, *sb), f"leaders of {a!r} and {b!r} cross"


def test_predicted_vs_kl_labels_apart_and_methods_in_a_legend():
    rows = [
        {
            "scheme": f"s{b}-{m}",
            "method": m,
            "predicted_loss": 1e-3 * (17 - b) + d,
            "kl_mean": 2e-3 * (17 - b) + d,
        }
        for b in (10, 12)
        for m, d in (("gradient", 0.0), ("kl_div", 1e-6))
    ]  # four schemes at two budgets, near-ties
    fig = figures.predicted_vs_measured(rows)
    boxes = _label_boxes(fig)
    assert sorted(t for _, t, _ in boxes) == sorted(r["scheme"] for r in rows)
    for (_, a, box_a), (_, b, box_b) in itertools.combinations(boxes, 2):
        assert not box_a.overlaps(box_b), f"labels {a!r} and {b!r} overlap"
    width, height = fig.canvas.get_width_height()
    assert all(0 <= box.x0 and box.x1 <= width for _, _, box in boxes)
    assert legend_texts(fig) == ["scored by gradient", "scored by kl_div"]
    colours = {tuple(c) for c in fig.axes[0].collections[0].get_facecolors()}
    assert len(colours) == 2


def test_spread_keeps_order_and_gap():
    out = figures.spread([0.5, 0.5, 0.5, 0.99], gap=0.1)
    assert out == sorted(out) and all(b - a >= 0.1 - 1e-9 for a, b in zip(out, out[1:]))
    assert 0 <= out[0] and out[-1] <= 1
    many = figures.spread([0.5] * 30, gap=0.1)
    assert all(b - a >= 1 / 29 - 1e-9 for a, b in zip(many, many[1:])) and many[-1] <= 1
