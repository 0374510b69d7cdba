"""The benchmarks' CPU paths run on the tiny model, so they cannot rot (no timing asserted).

Marked `bench`: left out of the default run (pyproject addopts) and run by .ci/run as its own
step, `python -m pytest -q -m bench`. Sizes are one batch per phase: a smoke run, not a benchmark.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import PY, ROOT, subprocess_env

SMOKE_SIZES = ("--sizes=--num-calib-samples 256 --num-calib-steps 1 --num-score-steps 1 "
               "--num-eval-samples 32 --seq-len 128")


@pytest.mark.bench
def test_gpu_benchmark_cpu_path(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([PY, str(ROOT / "bench" / "bench_gpu.py"), "--size", "tiny", "--work",
                           str(tmp_path / "w"), "--steps", "driver,bare", "--out", str(out)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["driver_cold"]["tokens_sha256"] == r["bare"]["tokens_sha256"]  # same batches
    assert r["driver_warm"]["fp8_groups"] == r["bare"]["fp8_groups"]  # same answer as bare
    assert 0 < r["driver_cold"]["padding_fraction"] <= 0.10
    assert r["bytes_read"]["lm"] > 0
    assert any("driver / (bare" in row[0] for row in r["table"])


@pytest.mark.bench
def test_sweep_benchmark_cpu_path(tmp_path):
    out = tmp_path / "s.json"
    proc = subprocess.run([PY, str(ROOT / "bench" / "bench_sweep.py"), "--repeats", "1", SMOKE_SIZES,
                           "--work", str(tmp_path / "w"), "--out", str(out)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["schemes_in_sweep"] >= 5 and len(r["groups"]) >= 2
    assert r["ratio"] > 0 and r["group_ratio"] > 0


@pytest.mark.bench
def test_served_benchmark_cpu_path(tmp_path):
    """The shared-max run is what vLLM serves (its load transformation changes no byte, the KL
    is the run's); per-module is re-quantized at load."""
    out = tmp_path / "served.json"
    proc = subprocess.run([PY, str(ROOT / "bench" / "bench_served.py"), "--size", "tiny",
                           "--work", str(tmp_path / "w"), "--out", str(out)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    shared, old = r["modes"]["shared-max"], r["modes"]["per-module"]
    assert shared["manifest_export"] == {"fused_scales": "shared-max"}
    assert shared["vllm_transform"]["groups"] > 0 and shared["vllm_transform"]["bytes_changed"] == 0
    assert shared["served"] == shared["written"] and r["goal_met"]
    assert old["vllm_transform"]["bytes_changed"] > 0
    assert old["served"]["modelopt"]["kl_mean"] != old["written"]["modelopt"]["kl_mean"]
