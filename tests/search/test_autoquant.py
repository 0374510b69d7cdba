"""The AutoQuantize stage on the tiny model: search once, solve per scheme, resume skips work."""

from __future__ import annotations

import pytest
import torch

from vlm_autoquant.model.fused import fused_layer_groups
from vlm_autoquant.model.lm import load_lm, text_config
from vlm_autoquant.run import manifest, save
from vlm_autoquant.search import autoquant, resume
from vlm_autoquant.search.autoquant import SearchSpec
from vlm_autoquant.search.spec import SearchCheckpoint

FP8, PCPT = "FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG"
LM_HEAD = ("*lm_head*",)


def fresh(demo):
    return load_lm(demo[0], text_config(demo[0]), torch.device("cpu"))


def spec(formats=(FP8,), method="gradient", fused_scales="shared-max") -> SearchSpec:
    return SearchSpec(
        formats=tuple(formats),
        method=method,
        num_calib_steps=2,
        num_score_steps=2,
        disabled_layers=LM_HEAD,
        excluded_from_cost=LM_HEAD,
        fused_scales=fused_scales,
    )


def run_search(model, batches, ckpt, s: SearchSpec, writes: list | None = None):
    def record(path, stage, src=None):
        if writes is not None:
            writes.append(stage)
        return resume.write_record(path, {"k": 1}, stage, src)

    return autoquant.search(model, s, batches, SearchCheckpoint(ckpt, record))


@pytest.fixture(scope="module")
def union(demo, batches, tmp_path_factory):
    """One search over both FP8 formats (as a sweep's family does)."""
    model = fresh(demo)
    found = run_search(model, batches, tmp_path_factory.mktemp("u") / "s.pth", spec((FP8, PCPT)))
    return model, found


@pytest.fixture(scope="module")
def fp8_alone(demo, batches, tmp_path_factory):
    """One gradient search over per-tensor FP8 alone from a fresh model: (model, found,
    checkpoint, the record stages written). Tests solve the model as they need (solve sets
    every quantizer each time) and only read the search and its checkpoint."""
    writes: list[str] = []
    ckpt = tmp_path_factory.mktemp("fp8") / "search" / "s.pth"
    model = fresh(demo)
    found = run_search(model, batches, ckpt, spec((FP8,)), writes)
    return model, found, ckpt, writes


@pytest.fixture(scope="module")
def kl_scratch(demo, batches, tmp_path_factory):
    """One kl_div search over FP8 calibrated from scratch, with each decoder layer's computed
    (not replayed) forwards counted: (model, found, [decoder layers run]). The counting hooks
    only count."""
    model = fresh(demo)
    calls = count_layer_calls(model)
    found = run_search(model, batches, tmp_path_factory.mktemp("kl") / "r.pth", spec(method="kl_div"))
    return model, found, calls


def count_layer_calls(model) -> list[int]:
    calls = [0]
    for layer in model.model.layers:  # computed, not replayed: its first norm runs
        layer.input_layernorm.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("formats", [[FP8], [FP8, PCPT]])
def test_manifest_agrees_with_enabled_quantizers(union, formats):
    model, found = union
    result = autoquant.solve(model, found, formats, 10.0)
    rows = save.layer_rows(model, result, list(LM_HEAD), list(LM_HEAD))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert [r.name for r in rows] == list(linears)
    for r in rows:
        m = linears[r.name]
        assert (r.format == "FP8") == m.weight_quantizer.is_enabled == m.input_quantizer.is_enabled
        if r.format == "FP8":
            assert r.quant_config in formats
            per_channel = m.weight_quantizer.axis is not None
            assert per_channel == (r.quant_config == PCPT)
        assert set(r.scores) == {*formats, "BF16"} or r.disabled
    assert next(r for r in rows if r.name == "lm_head").format == "BF16"
    groups: dict[str, set] = {}
    for r in rows:
        groups.setdefault(r.group, set()).add(r.format)
    assert all(len(f) == 1 for f in groups.values())  # q/k/v and gate/up share a format
    summ = manifest.summary(rows, list(LM_HEAD))
    assert summ.effective_bits_searched <= 10.0 + 1e-9
    assert summ.effective_bits_searched == pytest.approx(result.achieved_bits)


def test_a_scheme_gets_the_same_formats_alone_and_in_a_union_search(batches, union, fp8_alone):
    """pcpt next to per-tensor FP8: one search over both serves a per-tensor-only scheme too."""
    model_u, found_u = union
    alone, found_a, _, _ = fp8_alone
    for bits in (8.0, 9.0, 10.0, 12.0):
        in_union = autoquant.solve(model_u, found_u, [FP8], bits)
        by_itself = autoquant.solve(alone, found_a, [FP8], bits)
        assert {g.name: g.chosen for g in in_union.groups} == {g.name: g.chosen for g in by_itself.groups}
        for a, b in zip(in_union.groups, by_itself.groups):
            assert a.scores == pytest.approx(b.scores, rel=1e-5)
        # and the switched union model computes what the per-tensor-only model computes
        ids = batches[0]["input_ids"][:2]
        pos = batches[0]["position_ids"][:2]
        with torch.no_grad():
            assert torch.equal(
                model_u(input_ids=ids, position_ids=pos).logits, alone(input_ids=ids, position_ids=pos).logits
            )


def test_switching_schemes_on_one_model_changes_the_enabled_quantizers(union):
    model, found = union
    low = autoquant.solve(model, found, [FP8], 8.0)
    searchable = [g for g in low.groups if FP8 in g.scores]
    assert len(searchable) == len(low.groups) - 1  # lm_head is disabled: BF16 only
    assert all(g.chosen == FP8 for g in searchable)
    high = autoquant.solve(model, found, [FP8], 16.0)
    assert all(g.chosen == "BF16" for g in high.groups)
    assert not any(
        m.weight_quantizer.is_enabled for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
    )


def test_gradient_checkpointing_is_off_after_scoring(union):
    model, _ = union
    assert not model.is_gradient_checkpointing
    assert not model.training and not any(m.training for m in model.modules())


def test_checkpoint_rerun_skips_calibration_and_scoring(demo, batches, fp8_alone):
    searched, first, ckpt, writes = fp8_alone
    assert first.calibrated and first.scored and writes == ["calibrated", "scored"]
    assert resume.check_reusable(ckpt, {"k": 1}, False).stage == "scored"
    calls = {"n": 0}
    model = fresh(demo)
    real_forward = model.forward

    def counting(*a, **k):
        calls["n"] += 1
        return real_forward(*a, **k)

    model.forward = counting
    again = autoquant.search(model, spec(), batches, SearchCheckpoint(ckpt, lambda p, s, t=None: ""))
    assert not again.calibrated and not again.scored and calls["n"] == 0
    a = autoquant.solve(searched, first, [FP8], 10.0)
    b = autoquant.solve(model, again, [FP8], 10.0)
    assert [g.chosen for g in a.groups] == [g.chosen for g in b.groups]


@pytest.fixture(scope="module")
def per_module(demo, batches, tmp_path_factory):
    """One gradient search over per-tensor FP8 that keeps each projection's own scales."""
    model = fresh(demo)
    found = run_search(
        model, batches, tmp_path_factory.mktemp("pm") / "s.pth", spec((FP8,), fused_scales="per-module")
    )
    return model, found


def fused(model) -> list[list[torch.nn.Module]]:
    modules = dict(model.named_modules())
    return [[modules[n] for n in g] for g in fused_layer_groups(list(modules))]


def absmax(module) -> float:
    """What max calibration gives a per-tensor weight quantizer: the largest |weight|."""
    return float(module.weight.detach().abs().max())


def test_shared_max_gives_each_fused_group_its_largest_scales(union):
    model, found = union
    autoquant.solve(model, found, [FP8], 8.0)  # every searched group per-tensor FP8
    groups = fused(model)
    n = len(model.model.layers)
    assert sorted(len(g) for g in groups) == [2] * n + [3] * n  # gate/up, q/k/v per layer
    for group in groups:
        largest = max(absmax(m) for m in group)
        assert [float(m.weight_quantizer.amax) for m in group] == [largest] * len(group)
        inputs = {float(m.input_quantizer.amax) for m in group}
        assert len(inputs) == 1 and inputs.pop() > 0
    # per-channel weights keep one scale per output row, their own; inputs are per token
    autoquant.solve(model, found, [PCPT], 8.0)
    for group in groups:
        for m in group:
            assert torch.equal(
                m.weight_quantizer.amax.float().flatten(), m.weight.detach().abs().amax(dim=1).float()
            )
            assert m.input_quantizer._dynamic


def test_per_module_keeps_each_projections_own_scales_and_scores_differ(union, per_module):
    model, found = per_module
    autoquant.solve(model, found, [FP8], 8.0)
    differs = 0
    for group in fused(model):
        own = [absmax(m) for m in group]
        assert [float(m.weight_quantizer.amax) for m in group] == own
        differs += len(set(own)) > 1
    assert differs > 0  # random weights: most groups' maxima differ
    # the scores are the search's view of the arithmetic: shared scales change them
    assert any(fp8_score(union[1].stats[n]) != fp8_score(s) for n, s in found.stats.items())


def fp8_score(stat: dict) -> float | None:
    """A group's raw per-tensor FP8 score (None: the group is never quantized, e.g. lm_head)."""
    names = [autoquant.format_name(f) for f in stat["formats"]]
    return stat["raw_scores"][names.index(FP8)] if FP8 in names else None


def test_restored_calibration_keeps_the_shared_scales(demo, batches, fp8_alone):
    _, _, ckpt, _ = fp8_alone
    model = fresh(demo)
    again = autoquant.search(model, spec(), batches, SearchCheckpoint(ckpt, lambda p, s, t=None: ""))
    assert not again.calibrated
    autoquant.solve(model, again, [FP8], 8.0)
    for group in fused(model):
        assert {float(m.weight_quantizer.amax) for m in group} == {max(absmax(m) for m in group)}


def test_kl_div_ranks_a_planted_outlier_most_sensitive(demo, batches, tmp_path):
    """Scale one RMSNorm channel up and the matching weight column down: the same BF16
    function, but per-tensor FP8 of that layer's input now flushes every other channel below
    E4M3's smallest subnormal (FP8 is floating point, so a 1e6 outlier is needed, not 1e2).
    kl_div must rank the layer group reading that norm first, and keep it BF16."""
    model = fresh(demo)
    layer = model.model.layers[1]
    with torch.no_grad():
        layer.post_attention_layernorm.weight[3] *= 1e6
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.weight[:, 3] /= 1e6
    found = run_search(model, batches, tmp_path / "k.pth", spec(method="kl_div"))
    result = autoquant.solve(model, found, [FP8], 10.0)
    worst = max((g for g in result.groups if FP8 in g.scores), key=lambda g: g.scores[FP8])
    assert worst.name == "model.layers.1.mlp.gate_proj"
    assert "model.layers.1.mlp.up_proj" in worst.module_names
    assert worst.chosen == "BF16"


def test_interrupt_flag_stops_at_batch_boundary(demo, batches, tmp_path):
    from vlm_autoquant.core.errors import Interrupted
    from vlm_autoquant.core.interrupt import StopFlag

    flag = StopFlag()
    flag.set("SIGINT")
    with pytest.raises(Interrupted):
        autoquant.search(
            fresh(demo),
            spec(),
            batches,
            SearchCheckpoint(tmp_path / "c.pth", lambda p, s, t=None: ""),
            stop=flag,
        )
    assert not list(tmp_path.glob("*.tmp*"))


def test_stored_output_diffs_are_freed_between_scoring_steps(demo, batches, tmp_path, monkeypatch):
    """ModelOpt keeps every scored module's Q(Y)-Y until its next forward; the driver frees each
    once its backward has scored it, so no step starts holding the last step's (memory_plan.py)."""
    held: list[int] = []
    real = autoquant.make_steps

    def counting_steps(method, stop=None):
        forward, loss = real(method, stop)

        def forward_counting(model, batch):
            held.append(sum("output_diff_dict" in m.__dict__ for m in model.modules()))
            return forward(model, batch)

        return forward_counting, loss

    monkeypatch.setattr(autoquant, "make_steps", counting_steps)
    model = fresh(demo)
    run_search(model, batches, tmp_path / "f.pth", spec())
    assert len(held) >= 2 + 2 and held[-2:] == [0, 0]  # the 2 scoring steps start clean
    assert not [n for n, m in model.named_modules() if "output_diff_dict" in m.__dict__]


def test_row_chunked_kl_equals_the_whole_tensor_kl(monkeypatch):
    """The kl_div scores are ModelOpt's sum over tokens, computed a few rows at a time."""
    import torch.nn.functional as F
    from modelopt.torch.quantization import algorithms as mq_algorithms

    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(37, 1000, generator=gen).to(torch.bfloat16)
    quant = (ref.float() + 0.3 * torch.randn(37, 1000, generator=gen)).to(torch.bfloat16)
    log_ref = torch.log_softmax(ref.float(), dim=-1)
    whole = F.kl_div(torch.log_softmax(quant.float(), -1), log_ref, reduction="sum", log_target=True)
    monkeypatch.setattr(autoquant, "_KL_CHUNK_BYTES", 4 * 1000 * 5)  # 5 rows: 8 chunks, 2 left
    chunked = autoquant._chunked_kl_div_loss(log_ref, quant)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-5) and whole.item() > 1.0
    assert chunked.item() == pytest.approx(mq_algorithms._get_kl_div_loss(log_ref, quant).item(), rel=1e-5)


def test_a_narrower_search_seeded_from_a_wider_calibration_scores_the_same(
    demo, batches, union, kl_scratch, tmp_path
):
    """kl_div over FP8 alone, started from the FP8+pcpt union's calibration, gets the scores a
    kl_div search calibrated from scratch gets: each format is calibrated on its own."""
    _, wide = union
    _, scratch, _ = kl_scratch
    fp = {"k": 1}
    seeded_ckpt = tmp_path / "seeded.pth"
    assert autoquant.seed_calibration(wide.checkpoint, seeded_ckpt, "kl_div", fp, (FP8,))
    seeded = run_search(fresh(demo), batches, seeded_ckpt, spec(method="kl_div"))
    assert not seeded.calibrated and seeded.scored and scratch.calibrated
    assert seeded.stats.keys() == scratch.stats.keys()
    for name, stat in scratch.stats.items():
        assert seeded.stats[name]["raw_scores"] == pytest.approx(stat["raw_scores"], rel=1e-6)
    # a source that lacks a format seeds nothing (that format would go uncalibrated)
    assert not autoquant.seed_calibration(
        scratch.checkpoint, tmp_path / "no.pth", "gradient", fp, (FP8, PCPT)
    )
    assert not (tmp_path / "no.pth").exists()


def test_kl_div_replays_the_unquantized_prefix_with_the_same_scores(
    demo, batches, tmp_path, kl_scratch, monkeypatch
):
    """kl_div scores a group with only that group quantized: the decoder layers before it are
    replayed from the BF16 pass, not recomputed. The scores must not change, and fewer decoder
    layers must run."""
    import contextlib

    replayed_model, replayed, replayed_calls = kl_scratch  # searched with the replay, as shipped
    monkeypatch.setattr(autoquant.PrefixReplay, "__call__", lambda self, m, b: contextlib.nullcontext())
    model = fresh(demo)
    full_calls = count_layer_calls(model)
    full = run_search(model, batches, tmp_path / "f.pth", spec(method="kl_div"))
    for name, stat in full.stats.items():
        assert replayed.stats[name]["raw_scores"] == stat["raw_scores"], name
    assert any(s > 0 for st in full.stats.values() for s in st["raw_scores"])
    n = len(model.model.layers)
    # the replayed search ran fewer decoder layers: only those from each group's layer on
    assert replayed_calls[0] < full_calls[0] - n
    # and nothing is left patched on either model's layers
    for m in (replayed_model, model):
        assert not any("forward" in layer.__dict__ for layer in m.model.layers)


def test_a_format_calibrating_only_weights_takes_one_batch_with_the_same_result(
    demo, batches, tmp_path, monkeypatch
):
    """pcpt's activations are dynamic (never calibrated): its max calibration sees only the
    weights, the same in every batch. One batch must give the scores all batches give."""
    calls: list[str] = []
    real = autoquant.make_steps

    def counting_steps(method, stop=None):
        forward, loss = real(method, stop)

        def forward_counting(model, batch):
            on = [
                n
                for n, m in model.named_modules()
                if isinstance(m, autoquant.TensorQuantizer) and getattr(m, "_if_calib", False)
            ]
            calls.append(
                "weights only" if on and all(n.endswith("weight_quantizer") for n in on) else "other"
            )
            return forward(model, batch)

        return forward_counting, loss

    monkeypatch.setattr(autoquant, "make_steps", counting_steps)
    capped = run_search(fresh(demo), batches, tmp_path / "one.pth", spec((FP8, PCPT)))
    assert calls.count("weights only") == 1
    calls.clear()
    monkeypatch.setattr(autoquant, "_weights_calibrated_once", lambda orig, state: orig)
    full = run_search(fresh(demo), batches, tmp_path / "all.pth", spec((FP8, PCPT)))
    assert calls.count("weights only") == 2  # every calibration batch
    for name, stat in full.stats.items():
        assert capped.stats[name]["raw_scores"] == pytest.approx(stat["raw_scores"], rel=1e-6)


def test_recipes_compared_by_their_stored_signature_score_the_same(
    demo, batches, fp8_alone, tmp_path, monkeypatch
):
    """The search compares recipes by the signature each stores and copies the no-quant recipe
    (ModelOpt re-serialises configs for both). With ModelOpt's own recipe code the scores must be
    the same, bit for bit."""
    from modelopt.torch.quantization.algorithms import QuantRecipe

    modelopt_signature = QuantRecipe.checkpoint_signature.fget
    monkeypatch.setattr(autoquant, "_stored_signature", modelopt_signature)
    monkeypatch.setattr(autoquant, "_reusing_no_quant", lambda orig: orig)
    plain = run_search(fresh(demo), batches, tmp_path / "p.pth", spec((FP8,)))
    _, found, _, _ = fp8_alone
    assert plain.stats.keys() == found.stats.keys()
    for name, stat in plain.stats.items():
        assert found.stats[name]["raw_scores"] == stat["raw_scores"], name
    assert any(s > 0 for st in plain.stats.values() for s in st["raw_scores"])


def test_a_copied_no_quant_recipe_is_modelopts_and_the_patches_are_undone(demo):
    from modelopt.torch.quantization.algorithms import QuantRecipe

    modelopt_signature = QuantRecipe.checkpoint_signature
    modelopt_init = QuantRecipe.__init__
    built = {f: QuantRecipe(quant_cfg=f) for f in (None, FP8, PCPT)}
    with autoquant.observe_modelopt({}, lambda *a: "", fresh(demo), grad_checkpointing=True):
        first, copy = QuantRecipe(quant_cfg=None), QuantRecipe(quant_cfg=None, name="other")
        fp8 = QuantRecipe(quant_cfg=FP8)
        for f, recipe in built.items():  # the stored signature is ModelOpt's serialisation
            assert recipe.checkpoint_signature == recipe.config.model_dump_json(), f
        for r in (first, copy):
            assert r == built[None] and hash(r) == hash(built[None]) and str(r) == str(built[None])
            assert r.compression == built[None].compression
        assert copy is not first and copy != fp8 and fp8 == built[FP8]
        assert sorted([copy, fp8]) == sorted([built[None], built[FP8]])  # ModelOpt's order
    assert QuantRecipe.checkpoint_signature is modelopt_signature and QuantRecipe.__init__ is modelopt_init
