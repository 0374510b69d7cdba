"""Placement on fake devices: accelerate's device_map on the meta LM, no GPU needed."""

from __future__ import annotations

import pytest

from tests.plan.test_memory_plan import config
from vlm_autoquant.core.errors import Problems, UsageError
from vlm_autoquant.model.lm import meta_model
from vlm_autoquant.plan.memory_plan import HEADROOM, Dims, Placement, Shape, predict, usable
from vlm_autoquant.plan.placement import (
    Devices,
    PlanRequest,
    device_of,
    parse_gpus,
    parse_max_memory,
    place,
    plan_for,
    plan_run,
)


def test_parse_gpus_and_max_memory():
    pr = Problems()
    assert parse_gpus("all", 4, pr) == [0, 1, 2, 3]
    assert parse_gpus("0,2", 4, pr) == [0, 2]
    assert parse_gpus(None, 2, pr) == [0]
    assert not pr
    assert parse_max_memory("100GiB", [0, 1], {0: 139.8, 1: 139.8}, pr) == {0: 100.0, 1: 100.0}
    assert parse_max_memory("200GiB,50000MiB", [0, 1], {0: 139.8, 1: 139.8}, pr) == {
        0: 139.8,
        1: pytest.approx(48.83, abs=0.01),
    }
    assert not pr
    parse_gpus("0,5", 2, pr)
    parse_gpus("x", 2, pr)
    parse_max_memory("lots", [0], {0: 80.0}, pr)
    parse_max_memory("1GiB,2GiB,3GiB", [0, 1], {0: 80.0, 1: 80.0}, pr)
    assert [p.input for p in pr.items] == ["--gpus", "--gpus", "--max-gpu-memory", "--max-gpu-memory"]


@pytest.mark.parametrize("size,n", [("7b", 1), ("7b", 2), ("32b", 2), ("72b", 4)])
def test_layers_split_in_order_and_fit(size, n):
    cfg = config(size)
    dims = Dims.from_config(cfg)
    caps = usable({g: 139.8 for g in range(n)})
    lp, calib, score = plan_run(Devices(meta_model(cfg), dims, list(range(n)), caps), Shape(16, 512), 16, 8)
    p = lp.placement
    assert p.layers == sorted(p.layers)  # pipeline order: each GPU holds a contiguous span
    assert p.embed == p.layers[0] and p.head == p.layers[-1]
    assert lp.plan.fits() and calib * lp.plan.batch_size == 256
    for d, per in lp.plan.peaks.items():
        assert per["load"] * 2**30 <= caps[d] * 2**30
    if n > 1:
        assert len(p.devices()) > 1  # balanced: no single GPU takes everything
        assert device_of(lp.device_map, "model.layers.0") == p.embed
    rec = lp.record()
    assert sum(len(v) for v in rec["placement"]["layers"].values()) == dims.layers
    assert set(rec["memory_plan"]["predicted_gib"]) == {str(d) for d in p.devices()}


def test_72b_needs_smaller_batches_on_two_gpus_but_not_on_four():
    cfg = config("72b")
    dims, meta = Dims.from_config(cfg), meta_model(cfg)
    two, calib, score = plan_run(
        Devices(meta, dims, [0, 1], usable({0: 90.0, 1: 90.0})), Shape(16, 512), 16, 8
    )
    four, _, _ = plan_run(
        Devices(meta, dims, [0, 1, 2, 3], usable(dict.fromkeys(range(4), 90.0))), Shape(16, 512), 16, 8
    )
    assert two.plan.batch_size < 16 and four.plan.batch_size == 16
    assert two.plan.batch_size * calib == 16 * 16 and two.plan.fits()


def test_the_embeddings_gpu_gets_the_logits_reservation():
    """The loss terms land with the embeddings (accelerate returns the outputs to the inputs'
    device), so on tight GPUs that one takes fewer layers, and the placement fits."""
    cfg = config("32b")
    dims = Dims.from_config(cfg)
    caps = {0: 48.0, 1: 48.0}
    lp = place(Devices(meta_model(cfg), dims, [0, 1], caps), Shape(16, 512))
    p = lp.placement
    assert (p.embed, p.head) == (0, 1)
    assert p.layers.count(p.embed) < p.layers.count(p.head)
    assert lp.plan.fits()
    # Reserving on lm_head's GPU instead (the mirrored split) would overflow the embeddings' GPU.
    mirrored = [0] * p.layers.count(1) + [1] * p.layers.count(0)
    wrong = predict(dims, Shape(16, 512), placement=Placement(0, mirrored, 1), capacity=caps)
    assert wrong.peak(0) > caps[0]


def test_tied_embeddings_stay_with_lm_head():
    cfg = config("3b")
    dims = Dims.from_config(cfg)
    lp = place(Devices(meta_model(cfg), dims, [0, 1, 2], {0: 3.0, 1: 3.0, 2: 30.0}), Shape(2, 512))
    assert device_of(lp.device_map, "lm_head") == device_of(lp.device_map, "model.embed_tokens")
    assert lp.placement.head == lp.placement.embed


def test_too_small_gpus_are_refused_before_loading():
    cfg = config("72b")
    pr = Problems()
    assert (
        plan_for(
            cfg,
            PlanRequest("0,1", "60GiB", Shape(16, 512, "gradient", True, 1), 16, 8),
            pr,
            totals_gib={0: 139.8, 1: 139.8},
        )
        is None
    )
    text = UsageError(pr.items).render()
    assert "--batch-size" in text and "more GPUs" in text
    with pytest.raises(UsageError):
        place(Devices(meta_model(cfg), Dims.from_config(cfg), [0, 1], {0: 50.0, 1: 50.0}), Shape(1, 512))


def test_no_gpu_means_no_plan():
    assert (
        plan_for(
            config("7b"),
            PlanRequest(None, None, Shape(16, 512, "gradient", True, 1), 16, 8),
            Problems(),
            totals_gib={},
        )
        is None
    )


def _auto(size: str, totals_gib: dict[int, float], method: str = "gradient", formats: int = 1, **kw):
    shape = Shape(16, 512, method, True, formats)
    request = PlanRequest(",".join(map(str, totals_gib)), None, shape, 16, 8, checkpointing_auto=True, **kw)
    planned = plan_for(config(size), request, Problems(), totals_gib=totals_gib)
    assert planned is not None
    return planned


def _peak(size: str, checkpointing: bool, formats: int = 1) -> float:
    return predict(Dims.from_config(config(size)), Shape(16, 512, "gradient", checkpointing, formats)).peak(0)


def test_auto_checkpointing_is_off_where_the_batch_fits_without_it():
    """--grad-checkpointing auto scores without checkpointing (fewer forwards) only where the
    plan fits the requested batch that way; otherwise on, never a smaller batch to make it off."""
    off, on = _peak("3b", False), _peak("3b", True)
    assert on < off
    roomy = off / HEADROOM + 1  # a GPU whose usable memory holds the search without checkpointing
    lp, calib, score = _auto("3b", {0: roomy})
    assert not lp.plan.grad_checkpointing and lp.plan.batch_size == 16 and (calib, score) == (16, 8)
    assert lp.plan.fits() and lp.plan.peak(0) == pytest.approx(off)
    between = (on + off) / 2 / HEADROOM  # holds it only with checkpointing
    lp, calib, score = _auto("3b", {0: between})
    assert lp.plan.grad_checkpointing and lp.plan.batch_size == 16 and (calib, score) == (16, 8)
    tight = on / HEADROOM - 1  # not even with checkpointing: the batch halves, checkpointing on
    lp, calib, score = _auto("3b", {0: tight})
    assert lp.plan.grad_checkpointing and lp.plan.batch_size == 8 and (calib, score) == (32, 16)


def test_auto_checkpointing_counts_every_searched_formats_diffs():
    """A sweep's family searching two formats holds two Q(Y)-Y per layer without checkpointing."""
    one, two = _peak("3b", False, 1), _peak("3b", False, 2)
    assert one < two
    gpu = {0: (one + two) / 2 / HEADROOM}
    assert not _auto("3b", gpu, formats=1)[0].plan.grad_checkpointing
    assert _auto("3b", gpu, formats=2)[0].plan.grad_checkpointing


def test_auto_checkpointing_leaves_kl_div_and_an_explicit_choice_alone():
    roomy = {0: 1000.0}
    assert _auto("3b", roomy, method="kl_div")[0].plan.grad_checkpointing  # no backward to checkpoint
    explicit = PlanRequest("0", None, Shape(16, 512, "gradient", True, 1), 16, 8)  # --grad-checkpointing on
    assert plan_for(config("3b"), explicit, Problems(), totals_gib=roomy)[0].plan.grad_checkpointing


def test_auto_checkpointing_with_replicas_plans_each_gpu_without_it():
    lp, _, _ = _auto("32b", {0: 1000.0, 1: 1000.0}, parallel="replicas")
    assert lp.replicas == (0, 1) and not lp.plan.grad_checkpointing
