"""The AutoQuantize stage on the tiny model: the manifest matches the model, resume skips work."""

from __future__ import annotations

import pytest
import torch

from vlm_autoquant import autoquant, manifest, resume
from vlm_autoquant.calib_data import pack, split_captions
from vlm_autoquant.lm import load_lm, text_config
from vlm_autoquant.schemes import Scheme

BASE = dict(name="t", description="d", formats=["FP8_DEFAULT_CFG"], effective_bits=10.0,
            method="gradient", num_calib_samples=256, num_calib_steps=2, num_score_steps=2,
            num_eval_samples=0, seq_len=64, batch_size=4, seed=0, disabled_layers=["*lm_head*"])


@pytest.fixture(scope="module")
def batches(demo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo[0])
    caps = demo[1].read_text().splitlines()
    return pack(tok, split_captions(caps, 256, 0, 0).calib, 64, 4, 0).batches[:2]


def fresh(demo):
    return load_lm(demo[0], text_config(demo[0]), torch.device("cpu"))[0]


def search(demo, batches, tmp_path, **over):
    scheme = Scheme(**{**BASE, **over})
    model = fresh(demo)
    ckpt = tmp_path / "search" / "s.pth"
    state, run = autoquant.run_auto_quantize(
        model, scheme, batches, ckpt, lambda p, stage: resume.write_record(p, {"k": 1}, stage))
    return model, scheme, state, run, ckpt


@pytest.mark.parametrize("formats", [["FP8_DEFAULT_CFG"],
                                     ["FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG"]])
def test_manifest_agrees_with_enabled_quantizers(demo, batches, tmp_path, formats):
    model, scheme, state, run, _ = search(demo, batches, tmp_path, formats=formats)
    rows = manifest.layer_rows(model, state, scheme.disabled_layers, scheme.excluded_from_cost)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert [r.name for r in rows] == list(linears)
    for r in rows:
        m = linears[r.name]
        assert (r.format == "FP8") == m.weight_quantizer.is_enabled == m.input_quantizer.is_enabled
        if r.format == "FP8":
            assert r.quant_config in formats
            per_channel = m.weight_quantizer.axis is not None
            assert per_channel == (r.quant_config == "FP8_PER_CHANNEL_PER_TOKEN_CFG")
        assert set(r.scores) == {*formats, "BF16"} or r.disabled
    assert next(r for r in rows if r.name == "lm_head").format == "BF16"
    groups = {}
    for r in rows:
        groups.setdefault(r.group, set()).add(r.format)
    assert all(len(f) == 1 for f in groups.values())  # q/k/v and gate/up share a format
    summ = manifest.summary(rows, scheme.excluded_from_cost)
    assert summ["effective_bits_searched"] <= scheme.effective_bits + 1e-9
    assert summ["effective_bits_searched"] == pytest.approx(
        state["best"]["constraints"]["effective_bits"])


def test_gradient_checkpointing_is_off_after_scoring(demo, batches, tmp_path):
    model, *_ = search(demo, batches, tmp_path)
    assert not model.is_gradient_checkpointing
    assert not model.training and not any(m.training for m in model.modules())


def test_checkpoint_rerun_skips_calibration_and_scoring(demo, batches, tmp_path):
    _, scheme, state, run, ckpt = search(demo, batches, tmp_path)
    assert run.calibrated and run.scored
    assert [stage for stage, _ in run.checkpoint_writes] == ["calibrated", "scored"]
    assert resume.check_reusable(ckpt, {"k": 1}, False).stage == "scored"
    calls = {"n": 0}
    model = fresh(demo)
    real_forward = model.forward

    def counting(*a, **k):
        calls["n"] += 1
        return real_forward(*a, **k)

    model.forward = counting
    state2, run2 = autoquant.run_auto_quantize(model, scheme, batches, ckpt, lambda p, s: "")
    assert not run2.calibrated and not run2.scored and calls["n"] == 0
    assert state2["best"]["recipe"] == state["best"]["recipe"]


def test_kl_div_method_runs(demo, batches, tmp_path):
    model, scheme, state, run, _ = search(demo, batches, tmp_path, method="kl_div")
    assert state["method"] == "kl_div" and run.scored
    rows = manifest.layer_rows(model, state, scheme.disabled_layers, scheme.excluded_from_cost)
    assert any(r.format == "FP8" for r in rows) and any(r.format == "BF16" for r in rows)


def test_interrupt_flag_stops_at_batch_boundary(demo, batches, tmp_path):
    from vlm_autoquant.errors import Interrupted
    from vlm_autoquant.interrupt import StopFlag

    flag = StopFlag()
    flag.set("SIGINT")
    with pytest.raises(Interrupted):
        autoquant.run_auto_quantize(fresh(demo), Scheme(**BASE), batches, tmp_path / "c.pth",
                                    lambda p, s: "", stop=flag)
    assert not list(tmp_path.glob("*.tmp*"))
