"""Data-parallel replicas on the CPU: two processes joined by torch.distributed's gloo backend
run the real code path (replicas.py, ModelOpt's reductions, rank 0's checkpoint) through the
driver and the sweep, compared with one process over all batches. The plan's choice between
replicas and split layers is tested on the released 7B/32B/72B configs (meta device)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tests.conftest import QUICK, SCRIPT  # noqa: F401
from tests.forked import fork_context
from tests.plan.test_memory_plan import config
from vlm_autoquant.core.errors import Problems, RunFailed, UsageError
from vlm_autoquant.plan.memory_plan import Placement, Shape, predict
from vlm_autoquant.plan.placement import LMPlacement, PlanRequest, plan_for
from vlm_autoquant.search.replicas import (
    Replicas,
    Setup,
    prestart,
    prestart_devices,
    shard,
    spec_for_rank,
    start_for,
)
from vlm_autoquant.search.spec import SearchCheckpoint

H200 = {0: 139.8, 1: 139.8}


def req(calib: int, score: int, method: str = "gradient", parallel: str = "auto") -> PlanRequest:
    """GPUs 0 and 1 at their whole memory, the catalog's 16x512 batches."""
    return PlanRequest("0,1", None, Shape(16, 512, method), calib, score, parallel)


# (calib steps, score steps, world) -> each rank's (calib, score) steps, counted by hand: rank r
# takes batches r, r + world, r + 2 * world, ... below the step count.
SHARES = {
    (16, 8, 2): [(8, 4), (8, 4)],
    (7, 3, 3): [(3, 1), (2, 1), (2, 1)],
    (5, 5, 4): [(2, 2), (1, 1), (1, 1), (1, 1)],
}


@pytest.mark.parametrize("calib,score,world", list(SHARES))
def test_the_shards_cover_each_batch_once(calib, score, world):
    from vlm_autoquant.plan.families import SearchSpec

    spec = SearchSpec(("FP8_DEFAULT_CFG",), "gradient", calib, score, (), ())
    got = [
        (spec_for_rank(spec, r, world).num_calib_steps, spec_for_rank(spec, r, world).num_score_steps)
        for r in range(world)
    ]
    assert got == SHARES[calib, score, world]
    assert [shard(calib, r, world) for r in range(world)] == [c for c, _ in got]
    for steps, column in ((calib, 0), (score, 1)):
        seen = [r + world * i for r in range(world) for i in range(got[r][column])]
        assert sorted(seen) == list(range(steps))  # every batch once, none twice


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_auto_searches_an_lm_too_small_to_gain_on_the_first_gpu_alone(size):
    """Measured on two H200s: replicas gained nothing on the 3B and the 7B (docs/PERFORMANCE)."""
    lp, calib, score = plan_for(config(size), req(16, 8), Problems(), totals_gib=H200)
    assert lp.mode == "single" and not lp.replicas and lp.device_map == {"": 0}
    assert (lp.plan.batch_size, calib, score) == (16, 16, 8)
    assert "alone" in lp.note and "--parallel replicas" in lp.note  # logged once per run
    forced, _, _ = plan_for(config(size), req(16, 8, parallel="replicas"), Problems(), totals_gib=H200)
    assert forced.mode == "replicas" and forced.replicas == (0, 1)


@pytest.mark.parametrize("size", ["32b"])
def test_auto_replicates_what_fits_one_gpu(size):
    planned = plan_for(config(size), req(16, 8), Problems(), totals_gib=H200)
    lp, calib, score = planned
    assert lp.replicas == (0, 1) and lp.mode == "replicas"
    assert (lp.plan.batch_size, calib, score) == (16, 16, 8)  # the requested batch, unchanged
    assert lp.device_map == {"": 0} and lp.plan.fits()
    rec = lp.record()["placement"]
    assert rec["mode"] == "replicas" and rec["gpus"] == [0, 1]
    layers, _, _ = plan_for(config(size), req(16, 8, parallel="layers"), Problems(), totals_gib=H200)
    assert layers.mode == "layers" and not layers.replicas


def test_auto_splits_the_layers_of_what_does_not_fit_one_gpu():
    lp, _, _ = plan_for(config("72b"), req(16, 8), Problems(), totals_gib=H200)
    assert lp.mode == "layers" and len(lp.placement.devices()) == 2


def test_auto_searches_on_the_first_gpu_alone_when_a_replica_would_get_no_step():
    """kl_div's one score batch: the LM fits one GPU, so it stays whole on the GPU that rank 0
    of a sweep's replicas holds, rather than split across the GPUs."""
    lp, calib, score = plan_for(config("32b"), req(8, 1, "kl_div"), Problems(), totals_gib=H200)
    assert lp.mode == "single" and not lp.replicas and (calib, score) == (8, 1)
    assert lp.device_map == {"": 0} and lp.placement.devices() == [0]


@pytest.mark.parametrize(
    "size,steps,needles",
    [
        ("72b", 16, ["nothing fits", "GiB on GPU 0", "more GPUs"]),  # 145 GB of weights per replica
        ("7b", 1, ["at least 2 calibration", "--parallel layers"]),
    ],
)
def test_explicit_replicas_that_cannot_work_are_refused_with_the_figures(size, steps, needles):
    pr = Problems()
    assert plan_for(config(size), req(steps, steps, parallel="replicas"), pr, totals_gib=H200) is None
    text = UsageError(pr.items).render()
    assert all(n in text for n in needles), text


def test_a_sweep_replicates_only_if_every_search_takes_replicas_or_fits_rank_0():
    """The LM is loaded once for all the searches: one that does not fit one GPU turns the
    replicas off for all, and every manifest then records the placement that ran. A search
    with too few steps to share (kl_div) runs on rank 0's GPU alone, beside replicated ones."""
    from types import SimpleNamespace

    from vlm_autoquant.plan.families import _share_replicas

    fits, splits = (plan_for(config(s), req(16, 8), Problems(), totals_gib=H200)[0] for s in ("32b", "72b"))
    alone = plan_for(config("32b"), req(16, 1, "kl_div"), Problems(), totals_gib=H200)[0]
    assert fits.replicas and not splits.replicas and alone.mode == "single"
    both = [
        SimpleNamespace(placement=fits),
        SimpleNamespace(placement=fits),
        SimpleNamespace(placement=alone),
    ]
    _share_replicas(both)
    assert [f.placement.replicas for f in both] == [(0, 1), (0, 1), ()]
    on_gpu_1 = dataclasses.replace(alone, placement=Placement.single(64, 1))
    other = [SimpleNamespace(placement=fits), SimpleNamespace(placement=on_gpu_1)]
    _share_replicas(other)  # not the GPU rank 0 holds: no replicas
    assert [f.placement.replicas for f in other] == [(), ()]
    mixed = [SimpleNamespace(placement=fits), SimpleNamespace(placement=splits)]
    _share_replicas(mixed)
    assert [f.placement.mode for f in mixed] == ["single", "layers"]


def test_processes_start_before_validation_only_for_listed_gpus():
    assert prestart_devices("0,1", "auto") == ("cuda:0", "cuda:1")
    assert prestart_devices("2,3,1", "replicas") == ("cuda:2", "cuda:3", "cuda:1")
    for gpus, parallel in (
        ("0,1", "layers"),
        ("0", "auto"),
        (None, "auto"),
        ("all", "auto"),
        ("0,0", "auto"),
        ("x", "auto"),
    ):
        assert prestart_devices(gpus, parallel) is None


def test_prestarted_processes_the_plan_does_not_claim_are_stopped():
    """A refused input or a plan without replicas (the layers split, a CPU machine) must not
    leave the processes started before validation running."""
    with prestart("0,1", "auto") as pool, start_for(None, None, pool) as replicas:
        assert replicas is None and len(pool.procs) == 1 and pool.procs[0].is_alive()
    pool.procs[0].join(timeout=5)
    assert not pool.procs[0].is_alive()


# -- the real thing on two CPU processes ---------------------------------------------------------


def _spec():
    from vlm_autoquant.plan.families import SearchSpec

    return SearchSpec(
        ("FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG"), "gradient", 4, 4, ("*lm_head*",), ()
    )


def _batches(demo):
    from transformers import AutoTokenizer

    from vlm_autoquant.plan.calib_data import load_captions, pack, split_captions

    model_dir, captions = demo
    split = split_captions(load_captions(captions), 512, 0, 1234)
    return pack(AutoTokenizer.from_pretrained(model_dir), split.calib, 128, 4, 1234).batches[:4]


def _model(model_dir):
    from vlm_autoquant.model.lm import load_lm, text_config

    torch.manual_seed(0)
    return load_lm(model_dir, text_config(model_dir), torch.device("cpu"))


def _setup(model_dir, world=2):
    from vlm_autoquant.model.lm import text_config

    return Setup(model_dir, text_config(model_dir), ("cpu",) * world)


@pytest.fixture
def forked_replicas(monkeypatch) -> None:
    """The other ranks forked from this process instead of spawned (tests/forked.py): for tests
    of how rank 0 meets a replica's failure, and of how a sweep shares its searches with the
    replicas, neither of which depends on how a replica started. The driver's end-to-end test
    keeps the spawned processes a run uses."""
    import multiprocessing

    ctx = fork_context()
    if ctx is not None:
        monkeypatch.setattr(multiprocessing, "get_context", lambda method=None: ctx)


def test_a_replica_that_fails_to_load_fails_the_search_with_its_reason(demo, tmp_path, forked_replicas):
    model_dir, _ = demo
    setup = dataclasses.replace(_setup(model_dir), model_dir=tmp_path / "gone")
    with pytest.raises(RunFailed) as err, Replicas(setup) as replicas:
        replicas.search(
            _model(model_dir),
            _spec(),
            _batches(demo),
            SearchCheckpoint(tmp_path / "s.pth", lambda *a: ""),
            None,
        )
    text = str(err.value)
    assert "rank 1" in text and "gone" in text and "--parallel layers" in text
    assert not any(p.is_alive() for p in replicas.procs)


def test_a_replica_killed_mid_run_fails_the_search_instead_of_hanging(demo, tmp_path, forked_replicas):
    model_dir, _ = demo
    with pytest.raises(RunFailed) as err, Replicas(_setup(model_dir)) as replicas:
        replicas.join()
        replicas.procs[0].kill()
        replicas.search(
            _model(model_dir),
            _spec(),
            _batches(demo),
            SearchCheckpoint(tmp_path / "s.pth", lambda *a: ""),
            None,
        )
    assert "rank 1" in str(err.value) and "-9" in str(err.value)
    assert not (tmp_path / "s.pth").exists()


@pytest.fixture
def two_cpu_replicas(demo, monkeypatch) -> None:
    """Every plan places the LM on two CPU replicas, at the batch asked for (nothing halved)."""
    from vlm_autoquant.model.lm import text_config
    from vlm_autoquant.plan import families
    from vlm_autoquant.plan.memory_plan import Dims

    dims = Dims.from_config(text_config(demo[0]))

    def plan_for(cfg, request, problems, **kw):
        calib, score = request.calib_steps, request.score_steps
        shared = min(calib, score) >= 2  # as placement.plan_replicas: a step for each replica
        return (
            LMPlacement(
                {"": "cpu"},
                {},
                Placement.single(dims.layers, "cpu"),
                predict(dims, Shape(request.shape.batch_size, request.shape.seq_len)),
                replicas=("cpu", "cpu") if shared else (),
            ),
            calib,
            score,
        )

    monkeypatch.setattr(families, "plan_for", plan_for)


def test_a_run_with_replicas_matches_a_run_without(demo, script_run, two_cpu_replicas, tmp_path, monkeypatch):
    """The driver end to end, its placement made of two CPU replicas, against the same command
    run plainly (conftest.script_run): the same layer formats, the same scores (to summation
    order) and the same KL bit for bit (so the same amax: ModelOpt's max over the ranks); one
    search checkpoint under the single-process name; the manifest says how it ran."""
    from vlm_autoquant.cli import main

    model_dir, captions = demo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    out = tmp_path / "replicas"
    assert (
        main(
            [
                "--scheme-name",
                "fp8-balanced-10b",
                "--model-dir",
                str(model_dir),
                "--calib-file",
                str(captions),
                *QUICK,
                "--output-dir",
                str(out),
            ]
        )
        == 0
    )
    plain = json.loads((script_run[0] / "manifest.json").read_text())
    reps = json.loads((out / "manifest.json").read_text())
    assert plain["scheme"] == reps["scheme"] and plain["calibration"]["batches"] == 2
    assert [(r["name"], r["format"]) for r in plain["layers"]] == [
        (r["name"], r["format"]) for r in reps["layers"]
    ]
    for a, b in zip(plain["layers"], reps["layers"]):
        assert a["scores"] == pytest.approx(b["scores"], rel=1e-5)
    assert reps["quality"]["kl_mean"] == plain["quality"]["kl_mean"]
    assert reps["memory"]["placement"]["mode"] == "replicas"
    assert reps["memory"]["placement"]["replicas"] == ["cpu", "cpu"]
    assert sorted(p.name for p in (out / "search").iterdir() if p.suffix == ".pth") == [
        "autoquant_search.pth"
    ]


def test_a_sweep_with_replicas_matches_the_plain_sweep(
    demo, swept, two_cpu_replicas, forked_replicas, tmp_path, monkeypatch
):
    """The gradient search on the replicas; then, the replicas closed, the kl_div search (one
    score step: nothing to share) by this process alone, starting from the first's calibration,
    which rank 0 wrote. Compared with the same schemes in the plain sweep (conftest.swept: a
    scheme gets the same formats alone or in a sweep, tests/run/test_sweep.py)."""
    import csv

    from vlm_autoquant.cli import sweep_main

    model_dir, captions = demo
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    assert (
        sweep_main(
            [
                "--model-dir",
                str(model_dir),
                "--calib-file",
                str(captions),
                "--catalog",
                str(swept / "cat.yaml"),
                "--schemes",
                "b10,kl10",
                "--output-dir",
                str(tmp_path / "replicas"),
            ]
        )
        == 0
    )
    rows = {
        d: {r["scheme"]: r for r in csv.DictReader(open(root / "comparison.csv"))}
        for d, root in (("plain", swept / "out"), ("replicas", tmp_path / "replicas"))
    }
    assert set(rows["replicas"]) == {"b10", "kl10"}
    for name, reps in rows["replicas"].items():
        plain = rows["plain"][name]
        assert reps["status"] == plain["status"] == "FINISHED"
        assert (reps["fp8_layers"], reps["effective_bits"]) == (plain["fp8_layers"], plain["effective_bits"])
        assert float(reps["kl_mean"]) == pytest.approx(float(plain["kl_mean"]), rel=1e-6)
    for name in ("b10", "kl10"):
        a, b = (
            json.loads((root / name / "manifest.json").read_text())
            for root in (swept / "out", tmp_path / "replicas")
        )
        assert [(x["name"], x["format"]) for x in a["layers"]] == [
            (x["name"], x["format"]) for x in b["layers"]
        ]
        for x, y in zip(a["layers"], b["layers"]):
            assert x["scores"] == pytest.approx(y["scores"], rel=1e-5)
        assert b["memory"]["placement"]["mode"] == ("replicas" if name == "b10" else "single")
    kl = json.loads((tmp_path / "replicas" / "kl10" / "manifest.json").read_text())
    assert kl["search"]["calibration_seeded_from"] and kl["search"]["calibration"] == "restored"
