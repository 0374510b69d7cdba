"""The benchmarks' CPU paths run on the tiny model, so they cannot rot (no timing asserted).

Every script in bench/ runs here at smoke size: directly, or as the step of another that calls it
(pagecache.py, load_only.py, bare_autoquant.py, _common.py through bench_gpu.py; stack_sampler.py
through bench_peer.py --profile). prepare_device.sh, which gathers wheels for the GPU machine,
is the one exception: it needs the shared data beside the clone and a package index.

The smoke runs are marked `bench`: left out of the default run (pyproject addopts) and run by
.ci/run as its own step, `python -m pytest -q -m bench`. Sizes are one batch per phase: a smoke
run, not a benchmark. The check that every script has a smoke run reads files only, and runs in
the default run.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import PY, ROOT, subprocess_env

SMOKE = "--num-calib-samples 256 --num-calib-steps 1 --num-score-steps 1 --num-eval-samples 32 --seq-len 128"
SMOKE_SIZES = f"--sizes={SMOKE}"
# Scripts without a smoke test of their own: each runs as a step of the script named here,
# during that script's smoke test.
THROUGH = {
    "_common.py": "bench_gpu.py",
    "pagecache.py": "bench_gpu.py",
    "load_only.py": "bench_gpu.py",
    "bare_autoquant.py": "bench_gpu.py",
    "stack_sampler.py": "bench_peer.py",
}


def bench(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run bench/<script> with `args` as a fresh process (the package from this source tree;
    `env`: variables set for it)."""
    return subprocess.run(
        [PY, str(ROOT / "bench" / script), *args],
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.bench
def test_gpu_benchmark_cpu_path(tmp_path):
    out = tmp_path / "r.json"
    proc = bench(
        "bench_gpu.py",
        "--size",
        "tiny",
        "--work",
        str(tmp_path / "w"),
        "--steps",
        "driver,read,bare,loadonly",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["read_lm_bytes"]["bytes"] == r["checkpoint"]["lm_bytes"]  # every LM tensor, once
    assert r["load_only_cold"]["load_s"] > 0
    assert r["driver_cold"]["tokens_sha256"] == r["bare"]["tokens_sha256"]  # same batches
    assert r["driver_warm"]["fp8_groups"] == r["bare"]["fp8_groups"]  # same answer as bare
    assert 0 < r["driver_cold"]["padding_fraction"] <= 0.10
    assert r["bytes_read"]["lm"] > 0
    assert any("driver / (bare" in row[0] for row in r["table"])


@pytest.mark.bench
def test_sweep_benchmark_cpu_path(tmp_path):
    out = tmp_path / "s.json"
    proc = bench(
        "bench_sweep.py", "--repeats", "1", SMOKE_SIZES, "--work", str(tmp_path / "w"), "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["schemes_in_sweep"] >= 5 and len(r["groups"]) >= 2
    assert r["ratio"] > 0 and r["group_ratio"] > 0


@pytest.mark.bench
def test_served_benchmark_cpu_path(tmp_path):
    """The shared-max run is what vLLM serves (its load transformation changes no byte, the KL
    is the run's); per-module is re-quantized at load."""
    out = tmp_path / "served.json"
    proc = subprocess.run(
        [
            PY,
            str(ROOT / "bench" / "bench_served.py"),
            "--size",
            "tiny",
            "--work",
            str(tmp_path / "w"),
            "--out",
            str(out),
        ],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    shared, old = r["modes"]["shared-max"], r["modes"]["per-module"]
    assert shared["manifest_export"] == {"fused_scales": "shared-max"}
    assert shared["vllm_transform"]["groups"] > 0 and shared["vllm_transform"]["bytes_changed"] == 0
    assert shared["served"] == shared["written"] and r["goal_met"]
    assert old["vllm_transform"]["bytes_changed"] > 0
    assert old["served"]["modelopt"]["kl_mean"] != old["written"]["modelopt"]["kl_mean"]


@pytest.mark.bench
def test_roofline_cpu_path(tmp_path):
    out = tmp_path / "roof.json"
    proc = bench(
        "roofline.py",
        "--size",
        "tiny",
        "--work",
        str(tmp_path / "w"),
        "--out",
        str(out),
        "--warmup",
        "1",
        "--profile",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    steps = r["steps"]
    assert steps == {"calibrate": 2, "score": 2}  # the tiny default: two batches per phase
    for key in ("forward", "fwd_bwd_gc_on", "fwd_bwd_gc_off"):
        assert r["bf16"][key]["batches"] == 2
    assert set(r["searches"]) == {"driver", "driver-gc-off", "modelopt"}
    for kind, s in r["searches"].items():
        # the stopwatch saw each search's forwards: one per batch and phase (one format)
        assert s["forwards"] == steps, kind
        assert s["calibrate_per_batch_s"] > 0 and s["score_per_batch_s"] > 0
        assert set(r["ratios"][kind]) >= {"calibrate_over_bf16_forward", "score_over_bf16_fwd_bwd"}
    assert {"calibrate", "score"} <= set(r["profile"])
    ops = {op["name"] for op in r["profile"]["score"]["top_host_ops"]}
    assert ops & {"aten::mm", "aten::addmm", "aten::bmm"}  # the linears ran under the profiler
    assert "one score batch" in (tmp_path / "roof-profile.txt").read_text()
    assert "driver: score over bf16 fwd bwd" in proc.stdout


@pytest.mark.bench
@pytest.mark.parametrize(
    "flags,needle",
    [(["--searches", "driver,nope"], "--searches"), (["--scheme", "fp8-kl-10b"], "gradient-method")],
)
def test_roofline_refuses_bad_flags_before_loading(tmp_path, flags, needle):
    proc = bench(
        "roofline.py",
        "--size",
        "tiny",
        "--work",
        str(tmp_path / "w"),
        "--out",
        str(tmp_path / "r.json"),
        *flags,
    )
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists() and not (tmp_path / "r.json").exists()


@pytest.mark.bench
def test_catalog_benchmark_cpu_path(tmp_path):
    out = tmp_path / "cat.json"
    proc = bench(
        "bench_catalog.py",
        "--size",
        "tiny",
        "--work",
        str(tmp_path / "w"),
        "--out",
        str(out),
        "--steps",
        "single,sweep_all,alone",
        "--alone",
        "fp8-kl-10b",
        "--parallel",
        "1",
        SMOKE_SIZES,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert set(r["sweep_all"]["schemes"]) == set(r["catalog"])
    # a scheme alone and the same scheme in the sweep: every layer's format the same
    assert r["alone_equals_sweep_layer_formats"] == {"fp8-kl-10b": True, "fp8-balanced-10b": True}
    assert r["ratios"]["sweep_all_over_single"] > 0


@pytest.mark.bench
def test_export_catalog_benchmark_cpu_path(tmp_path):
    out = tmp_path / "x.json"
    proc = bench(
        "bench_export_catalog.py",
        "--size",
        "tiny",
        "--work",
        str(tmp_path / "w"),
        "--out",
        str(out),
        f"--sizes=--schemes fp8-balanced-10b,fp8-kl-10b {SMOKE}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    r = json.loads(out.read_text())
    assert set(r["exports"]) == {"fp8-balanced-10b", "fp8-kl-10b"} and r["all_passed"]
    assert not any((tmp_path / "w" / "export").iterdir())  # each export deleted once checked


@pytest.mark.bench
def test_export_benchmark_cpu_path(tmp_path):
    out = tmp_path / "e.json"
    proc = bench("bench_export.py", "--demo", "--work", str(tmp_path / "w"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["checks_passed"] and r["baseline"]["total_s"] > 0 and r["ours_s"] > 0


@pytest.mark.bench
@pytest.mark.parametrize("writer", ["ct", "modelopt"])
def test_export_writer_peak_cpu_path(tmp_path, writer):
    out = tmp_path / "r.json"
    args = ["--size", "tiny", "--work", str(tmp_path / "w"), "--out", str(out), "--writer", writer]
    proc = bench("export_writer_peak.py", *args, "--shard-gib", "0.0001")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["writer"] == writer and r["writer_extra_gib"] >= 0
    assert r["fp8_layers"] > 0 and r["bf16_layers"] > 0
    if writer == "ct":  # 0.0001 GiB (107 KB) shards: the tiny LM takes several
        assert r["shards"] > 1 and r["shard_bytes"] == int(0.0001 * 2**30)


@pytest.mark.bench
def test_export_until_written_cpu_path_stops_each_export_after_its_write(script_run, demo, tmp_path):
    """One export process, stopped after its compressed-tensors write, leaves nothing behind
    (SIGTERM: the export removes its staging folder)."""
    out, work = tmp_path / "r.json", tmp_path / "w"
    args = ["--artifacts-dir", str(script_run[0]), "--model-dir", str(demo[0]), "--work", str(work)]
    proc = bench("export_until_written.py", *args, "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["phase"] == "ct_export" and len(r["runs"]) == 1
    for run in r["runs"]:
        assert run["wall_s"] > 0 and run["peak_rss_gib"] > 0
        assert [line.split()[2] for line in run["phases"]][-1] == "ct_export"
    assert [f for f in work.rglob("*") if f.is_file()] == []


@pytest.mark.bench
def test_ab_search_cpu_path_compares_a_tree_with_itself(tmp_path):
    """This tree against itself as the base: one pair, the sweep compared, the roofline run."""
    out = tmp_path / "out"
    args = ["--size", "tiny", "--base", str(ROOT / "src"), "--work", str(tmp_path / "w"), "--out", str(out)]
    proc = bench("ab_search.py", *args, "--pairs", "1", SMOKE_SIZES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "summary.json").read_text())
    assert [len(r["single"][side]) for side in ("tree", "base")] == [1, 1]
    assert r["single"]["same_formats"] and r["single"]["tree_over_base"] > 0
    from vlm_autoquant.plan.schemes import default_catalog, load_catalog

    assert r["sweep"]["same_formats"] and set(r["sweep"]["compared"]) == set(load_catalog(default_catalog()))
    assert r["roofline"]["rc"] == 0 and (out / "roofline.json").is_file()
    # each run's own log came back beside the JSON, with the run's phase lines
    logs = sorted(p.name for p in out.glob("*.run.txt"))
    assert logs == [
        "single-base1.run.txt",
        "single-tree1.run.txt",
        "sweep_all-sweep-base.run.txt",
        "sweep_all-sweep-tree.run.txt",
    ]
    assert "calibrate" in (out / "single-tree1.run.txt").read_text()


@pytest.mark.bench
def test_ab_search_refuses_a_base_without_the_package(tmp_path):
    proc = bench("ab_search.py", "--base", str(tmp_path), "--out", str(tmp_path / "o"), "--size", "tiny")
    assert proc.returncode == 2 and "holds no vlm_autoquant/" in proc.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.bench
def test_peer_benchmark_cpu_path_with_profiles(tmp_path):
    out = tmp_path / "peer.json"
    proc = bench(
        "bench_peer.py", "--size", "tiny", "--work", str(tmp_path / "w"), "--out", str(out), "--profile"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert [x["side"] for x in r["runs"]] == ["driver", "bare", "driver"]  # no peer on the CPU
    assert ("bare ran on the driver's exact batches", "True", "True") in map(tuple, r["table"])
    assert any(x["module"].startswith("vlm_autoquant") for x in r["driver_importtime_top15"])
    for prof in map(Path, r["profiles"]):  # bench/stack_sampler.py's per-thread wall time
        threads = json.loads(prof.read_text())["threads"]
        assert threads["MainThread"]["seconds"] > 0


@pytest.mark.bench
def test_family_benchmark_dry_run():
    proc = bench("bench_family.py", "--dry-run", "--size", "72b", "--gpus", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Qwen2.5-VL-72B LM on 4x" in proc.stdout and "80 layers" in proc.stdout


def test_catalog_compare_reports_a_changed_format_and_score():
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_catalog

    def result(fmt: str, score: float) -> dict:
        scheme = {"layer_formats_sha256": fmt, "layer_scores": {"l0": {"FP8": score, "BF16": 0.0}}}
        return {"sweep_all": {"schemes": {"s": scheme}}}

    assert bench_catalog.compare(result("a", 2.0), result("a", 2.0)) == {
        "s": {"same_formats": True, "max_rel_score_diff": 0.0}
    }
    moved = bench_catalog.compare(result("a", 2.0), result("b", 1.5))["s"]
    assert moved["same_formats"] is False and moved["max_rel_score_diff"] == pytest.approx(0.25)


@pytest.mark.bench
def test_first_batch_cpu_path(demo, tmp_path):
    for mode, extra in (("plain", []), ("thread", ["--no-cudnn-sdpa"])):
        out = tmp_path / f"{mode}.json"
        r = bench("first_batch.py", mode, str(demo[0]), str(out), *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        t = json.loads(out.read_text())
        assert t["mode"] == mode and all(t[k] > 0 for k in ("bg_load", "fwd0", "fwd1", "fwdbwd0", "fwdbwd1"))
        assert t["cudnn_sdpa"] == (not extra)
        assert ("import_modelopt" in t and t["bg_warm"] > 0) if mode == "thread" else t["bg_warm"] == 0
    r = bench("first_batch.py", "warm", str(demo[0]), str(tmp_path / "x.json"))
    assert r.returncode != 0 and "MODE must be one of" in r.stderr and not (tmp_path / "x.json").exists()


@pytest.mark.bench
def test_first_batch_profile_cpu_path(demo, tmp_path):
    """The driver runs to its manifest with its first calibration and score batch profiled."""
    out, prof = tmp_path / "run", tmp_path / "prof"
    driver = ROOT / "scripts" / "qwen" / "qwen2_5_vl_3b_autoquant_fp8_schemes.py"
    args = ["--model-dir", str(demo[0]), "--calib-file", str(demo[1]), "--output-dir", str(out)]
    args += SMOKE.split()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    r = bench("first_batch_profile.py", str(prof), "--", str(driver), *args, MLFLOW_TRACKING_URI=store)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "manifest.json").is_file()
    times = json.loads((prof / "times.json").read_text())
    for loop in ("Calibrating_for_FP8_", "Estimating_auto_quan"):  # ModelOpt's loops, one batch each
        assert times[f"{loop}-0"] > 0 and times[f"{loop}-0-setup"] >= 0 and f"{loop}-1" not in times
        assert "Self CPU" in (prof / f"{loop}-0.txt").read_text()
    r = bench("first_batch_profile.py", str(prof), str(driver))
    assert r.returncode != 0 and "OUT_DIR -- SCRIPT.py" in r.stderr


@pytest.mark.bench
def test_ab_pairs_two_commands_and_refuses_a_failing_one(tmp_path):
    fast, slow = f"{PY} -c pass", f"{PY} -c 'import time; time.sleep(0.3)'"
    out = tmp_path / "ab.json"
    r = bench("ab.py", "-n", "2", "--warmup", "0", "--a", slow, "--b", fast, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    t = json.loads(out.read_text())
    assert t["pairs"] == 2 and t["commands"] == {"A": slow, "B": fast}
    assert t["A"]["wall_s"]["min"] >= 0.3 and t["ratio_a_over_b"]["median"] > 1  # A sleeps, B does not
    r = bench("ab.py", "-n", "1", "--warmup", "0", "--a", f"{PY} -c 'raise SystemExit(3)'", "--b", fast)
    assert r.returncode == 1 and "A exited 3" in r.stderr


@pytest.mark.bench
def test_gc_count_reports_the_scripts_collections(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import gc, sys\ngc.collect()\ngc.collect()\nsys.exit(0)\n")
    r = bench("gc_count.py", str(script))
    assert r.returncode == 0, r.stderr[-3000:]
    counts = re.search(r"gc collections \{0: \((\d+), [\d.]+\), 1: \((\d+), [\d.]+\), 2: \((\d+), ", r.stderr)
    assert counts and int(counts.group(3)) >= 2, r.stderr  # the script's own two full collections
    assert r.stderr.count("gc full collection at") == int(counts.group(3))


def test_every_bench_script_runs_in_a_smoke_test():
    """A script added to bench/ without a smoke test here (or a step of one) fails this test."""
    smoke = set(re.findall(r'(?:bench\(\s*|"bench" / )"(\w+\.py)"', Path(__file__).read_text()))
    assert {"bench_gpu.py", "bench_peer.py"} <= smoke  # the callers THROUGH relies on
    scripts = sorted(p.name for p in (ROOT / "bench").glob("*.py"))
    missing = [
        s
        for s in scripts
        if s not in smoke
        and not (
            THROUGH.get(s) in smoke and s.removesuffix(".py") in (ROOT / "bench" / THROUGH[s]).read_text()
        )
    ]
    assert not missing, f"bench scripts that no smoke test runs: {missing}"
