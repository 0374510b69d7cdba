"""manifest.py: per-layer rows, the summary's arithmetic, the CSV, and the typed manifest: the
keys it writes, its version, the problems it names and what it keeps on a round trip."""

from __future__ import annotations

import copy
import csv
import io
import json
import subprocess

import pytest

from vlm_autoquant.core.artifacts import MANIFEST_FILE
from vlm_autoquant.core.errors import UsageError
from vlm_autoquant.run import manifest
from vlm_autoquant.run.manifest import MANIFEST_VERSION, LayerRow, layers_csv, summary

from ..conftest import DATA, PY, run_cli, subprocess_env

# A manifest.json written by vlm-autoquant before `manifest_version` existed (the demo's
# fp8-balanced-10b run; `layers` cut to four rows).
V1_EXAMPLE = DATA / "manifest_v1_example.json"


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
    assert s.fp8 == 1 and s.bf16 == 2 and s.layers == 3
    assert s.effective_bits_searched == pytest.approx((300 * 8 + 100 * 16) / 400)
    assert s.effective_bits_all_linears == pytest.approx((300 * 8 + 700 * 16) / 1000)
    assert s.weight_bytes == 300 + 700 * 2 and s.weight_bytes_bf16 == 2000
    assert s.compression_ratio == pytest.approx(2000 / 1700)


def test_csv_has_a_column_per_candidate_score_and_cost():
    rows = [row("model.layers.3.self_attn.o_proj", "FP8", 64)]
    (rec,) = list(csv.DictReader(io.StringIO(layers_csv(rows))))
    assert rec["format"] == "FP8" and float(rec["cost:FP8_DEFAULT_CFG"]) == 32.0
    assert float(rec["cost:BF16"]) == 64.0 and float(rec["score:FP8_DEFAULT_CFG"]) == 1.0
    assert rows[0].position() == (3, "o_proj")


def _v1() -> dict:
    return json.loads(V1_EXAMPLE.read_text())


def _current() -> dict:
    """The example as this version writes it: the same keys, plus manifest_version."""
    return {**_v1(), "manifest_version": MANIFEST_VERSION}


def test_a_manifest_written_now_has_the_old_keys_plus_its_version(script_run):
    old, new = _v1(), json.loads((script_run[0] / MANIFEST_FILE).read_text())
    assert set(new) == set(old) | {"manifest_version"}
    assert new["manifest_version"] == MANIFEST_VERSION
    assert {k for row in new["layers"] for k in row} == {k for row in old["layers"] for k in row}
    for section in ("scheme", "model", "calibration", "effective_bits", "summary", "quality", "export"):
        assert set(new[section]) == set(old[section]), section
    assert set(old["search"]) <= set(new["search"])  # a sweep adds its own bookkeeping keys


def test_an_old_manifest_is_refused_saying_which_version_wrote_it_and_what_to_do(tmp_path):
    with pytest.raises(UsageError) as info:
        manifest.read(V1_EXAMPLE, "--artifacts-dir", "unused")
    (p,) = info.value.problems
    assert p.input == str(V1_EXAMPLE)
    assert "no manifest_version" in p.message and "layout 1" in p.message
    assert f"reads manifest_version {MANIFEST_VERSION}" in p.message
    assert "rerun the scheme" in p.fix and "vlm-autoquant that wrote it" in p.fix


def test_log_only_of_an_old_run_exits_2_naming_the_file(tmp_path, tracking, capsys):
    run = tmp_path / "old"
    run.mkdir()
    (run / MANIFEST_FILE).write_text(V1_EXAMPLE.read_text())
    code = run_cli(["--log-only", "--output-dir", run])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert str(run / MANIFEST_FILE) in err and "no manifest_version" in err and "rerun the scheme" in err


def test_a_newer_manifest_is_refused_with_the_versions():
    doc = {**_current(), "manifest_version": MANIFEST_VERSION + 1}
    (p,) = manifest.field_problems(doc, "m.json")
    assert p.input == "m.json"
    assert f"manifest_version {MANIFEST_VERSION + 1}, newer than the {MANIFEST_VERSION}" in p.message
    assert "upgrade vlm-autoquant" in p.fix


def test_each_invalid_field_is_named_by_its_path():
    doc = _current()
    doc["scheme"]["seq_len"] = "abc"
    del doc["model"]["directory"]
    doc["layers"][3]["format"] = "INT4"
    doc["layers"][2]["num_weights"] = "many"  # an earlier bad row is the one reported
    doc["calibration"]["file"] = None
    found = {p.input: p for p in manifest.field_problems(doc, "m.json")}
    assert set(found) == {
        "m.json: scheme.seq_len",
        "m.json: model.directory",
        "m.json: layers[2].num_weights",
        "m.json: calibration.file",
    }
    assert "'abc'" in found["m.json: scheme.seq_len"].message
    assert "missing" in found["m.json: model.directory"].message
    assert all(p.fix for p in found.values())
    assert manifest.field_problems([1, 2], "m.json")[0].message == "is not a JSON object"
    with pytest.raises(UsageError):
        manifest.parse(doc, "m.json")


def test_unknown_keys_are_kept_on_a_round_trip():
    doc = _current()
    doc["written_by_a_plugin"] = {"x": 1}
    doc["layers"][0]["note"] = "kept"
    doc["search"]["sweep_group_index"] = 2
    m = manifest.parse(copy.deepcopy(doc), "m.json")
    assert m.to_json() == doc
    assert m.layers[0].name == doc["layers"][0]["name"] and m.search.fp8_kernel == "eager (CPU)"
    assert m.model.directory == doc["model"]["directory"] and m.calibration.file == doc["calibration"]["file"]
    assert m.export.fused_scales == "shared-max" and m.summary.fp8 == doc["summary"]["fp8"]
    fp8 = {r["name"]: r["quant_config"] for r in doc["layers"] if r["format"] == "FP8"}
    assert m.fp8_layers() == fp8 and len(fp8) == 2
    assert m.sha256_of("quantized_state.pt") == doc["artifacts_sha256"]["quantized_state.pt"]
    assert m.sha256_of("absent.bin") is None


def test_reading_a_manifest_loads_neither_torch_nor_modelopt(tmp_path):
    path = tmp_path / MANIFEST_FILE
    path.write_text(json.dumps(_current()))
    code = (
        "import sys; from pathlib import Path; from vlm_autoquant.run import manifest; "
        f"m = manifest.read(Path({str(path)!r}), 'x', 'y'); print(m.scheme.name); "
        "print(sorted(k for k in ('torch', 'modelopt') if k in sys.modules))"
    )
    proc = subprocess.run([PY, "-c", code], env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["fp8-balanced-10b", "[]"]
