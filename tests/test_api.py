"""The Python API: quantize, sweep, export and restore on the tiny demo checkpoint (CPU)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import vlm_autoquant
from vlm_autoquant.core.artifacts import COMPARISON_FILE, MANIFEST_FILE, QUANT_STATE_FILE

from .conftest import SMALL_DEFAULTS

QUICK = {
    "num_calib_samples": 512,
    "num_calib_steps": 2,
    "num_score_steps": 2,
    "num_eval_samples": 64,
    "seq_len": 128,
}


def test_import_is_cheap_and_the_api_is_there():
    import subprocess

    code = (
        "import sys, vlm_autoquant; f = vlm_autoquant.quantize; "
        "print(sorted(m for m in ('torch', 'modelopt', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    assert out.strip() == "[]"
    assert callable(vlm_autoquant.export) and callable(vlm_autoquant.restore)


def test_bad_input_raises_one_error_type_with_the_cli_problems(tmp_path):
    with pytest.raises(vlm_autoquant.VlmAutoquantError) as info:
        vlm_autoquant.quantize(
            tmp_path / "nope",
            output_dir=tmp_path / "out",
            calib_file=tmp_path / "none.txt",
            effective_bits=9,
            batch_sise=4,
        )
    inputs = {p.input for p in info.value.problems}
    assert inputs == {"batch_sise"}  # an unknown keyword is refused before anything else
    with pytest.raises(vlm_autoquant.VlmAutoquantError) as info:
        vlm_autoquant.quantize(
            tmp_path / "nope", output_dir=tmp_path / "out", calib_file=tmp_path / "none.txt"
        )
    inputs = {p.input for p in info.value.problems}
    assert {"--model-dir", "--calib-file"} <= inputs
    assert all(p.fix for p in info.value.problems)
    assert not (tmp_path / "out").exists()


def test_quantize_returns_the_result_it_wrote(demo, tracking, tmp_path):
    out = tmp_path / "q"
    result = vlm_autoquant.quantize(
        demo[0], "fp8-balanced-10b", output_dir=out, calib_file=demo[1], effective_bits=9, **QUICK
    )
    assert result.output_dir == out
    on_disk = json.loads((out / MANIFEST_FILE).read_text())
    assert result.manifest.scheme.name == on_disk["scheme"]["name"] == "fp8-balanced-10b"
    assert result.manifest.to_json() == on_disk
    assert on_disk["scheme"]["overrides"]["effective_bits"] == 9
    assert on_disk["effective_bits"]["achieved"] <= 9 + 1e-9
    assert (out / QUANT_STATE_FILE).is_file()


def test_sweep_runs_each_named_scheme(demo, tracking, tmp_path):
    cat = tmp_path / "cat.yaml"
    cat.write_text(
        SMALL_DEFAULTS + "schemes:\n"
        "  b9:\n    description: nine\n    effective_bits: 9\n"
        "  b12:\n    description: twelve\n    effective_bits: 12\n"
    )
    result = vlm_autoquant.sweep(
        demo[0], ["b9", "b12"], output_dir=tmp_path / "s", calib_file=demo[1], catalog=cat
    )
    assert result.comparison == tmp_path / "s" / COMPARISON_FILE and result.comparison.is_file()
    assert set(result.manifests) == {"b9", "b12"}
    bits = {n: m.effective_bits.achieved for n, m in result.manifests.items()}
    assert bits["b9"] <= 9 + 1e-9 < bits["b12"] <= 12 + 1e-9


def test_export_of_a_run_dir(script_run, tmp_path):
    out, _, _ = script_run
    done = vlm_autoquant.export(out, output_dir=tmp_path / "ckpt", mlflow=False)
    assert done.output_dir == tmp_path / "ckpt"
    assert done.report["scheme"] == "fp8-balanced-10b"
    assert (tmp_path / "ckpt" / "config.json").is_file()
    with pytest.raises(vlm_autoquant.VlmAutoquantError) as info:
        vlm_autoquant.export(out, output_dir=tmp_path / "x", mlflow=False, lm_onyl=True)
    assert [p.input for p in info.value.problems] == ["lm_onyl"]
    with pytest.raises(vlm_autoquant.VlmAutoquantError) as info:
        vlm_autoquant.export(out, output_dir=tmp_path / "y", mlflow=False, format="gguf")
    assert [p.input for p in info.value.problems] == ["format"]
    assert "compressed-tensors" in str(info.value) and not (tmp_path / "y").exists()


def test_restore_gives_the_run_formats(script_run):
    out, _, _ = script_run
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    model = vlm_autoquant.restore(out, device="cpu")
    fp8 = {
        name
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and getattr(getattr(m, "weight_quantizer", None), "is_enabled", False)
    }
    assert fp8 == {r["name"] for r in manifest["layers"] if r["format"] == "FP8"}
