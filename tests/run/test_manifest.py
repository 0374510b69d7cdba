"""manifest.py: per-layer rows, the summary's arithmetic, the CSV."""

from __future__ import annotations

import csv
import io

import pytest

from vlm_autoquant.run.manifest import LayerRow, layers_csv, summary


def row(name, fmt, n, counted=True):
    return LayerRow(
        name=name,
        group=name,
        format=fmt,
        quant_config=None if fmt == "BF16" else "FP8_DEFAULT_CFG",
        num_weights=n,
        scores={"FP8_DEFAULT_CFG": 1.0, "BF16": 0.0},
        costs={"FP8_DEFAULT_CFG": n / 2, "BF16": float(n)},
        cost_counted=counted,
        disabled=not counted,
    )


def test_summary_counts_bits_bytes_and_exclusions():
    rows = [
        row("model.layers.0.mlp.up_proj", "FP8", 300),
        row("model.layers.0.mlp.down_proj", "BF16", 100),
        row("lm_head", "BF16", 600, counted=False),
    ]
    s = summary(rows, ["*lm_head*"])
    assert s["fp8"] == 1 and s["bf16"] == 2 and s["layers"] == 3
    assert s["effective_bits_searched"] == pytest.approx((300 * 8 + 100 * 16) / 400)
    assert s["effective_bits_all_linears"] == pytest.approx((300 * 8 + 700 * 16) / 1000)
    assert s["weight_bytes"] == 300 + 700 * 2 and s["weight_bytes_bf16"] == 2000
    assert s["compression_ratio"] == pytest.approx(2000 / 1700)


def test_csv_has_a_column_per_candidate_score_and_cost():
    rows = [row("model.layers.3.self_attn.o_proj", "FP8", 64)]
    (rec,) = list(csv.DictReader(io.StringIO(layers_csv(rows))))
    assert rec["format"] == "FP8" and float(rec["cost:FP8_DEFAULT_CFG"]) == 32.0
    assert float(rec["cost:BF16"]) == 64.0 and float(rec["score:FP8_DEFAULT_CFG"]) == 1.0
    assert rows[0].position() == (3, "o_proj")
