"""Export: run -> verified Qwen2.5-VL checkpoint; identity; bad input; interruption; engines."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess

import pytest
import torch

from vlm_autoquant.core.artifacts import MANIFEST_FILE, QUANT_STATE_FILE
from vlm_autoquant.tracking import DEFAULT_EXPERIMENT

from ..conftest import PY, QUICK, ROOT, subprocess_env

EXPORT_SCRIPT = ROOT / "scripts" / "qwen" / "qwen2_5_vl_3b_autoquant_fp8_export.py"


@pytest.fixture(scope="module")
def source(script_run, tmp_path_factory):
    """One real quantization run through the script, in its own MLflow store: (run_id, out, uri).

    The run is conftest.script_run's; its SQLite database is copied here, so the runs, tags and
    registered models these tests add stay out of the shared store. The copy's run still points
    at the shared run's artifacts, which are only read (new runs add their own directories)."""
    import mlflow

    out, shared_uri, _ = script_run
    root = tmp_path_factory.mktemp("export_src")
    shutil.copyfile(shared_uri[len("sqlite:///") :], root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return run.info.run_id, out, uri


@pytest.fixture
def store(source, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", source[2])
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    return source


def export(args, capsys=None) -> tuple[int, str]:
    from vlm_autoquant.cli.export import main

    code = main([str(a) for a in args])
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def copy_demo(demo_dir, target):
    shutil.copytree(demo_dir, target)
    return target


def flip_one_lm_byte(model_dir):
    from vlm_autoquant.model.identity import shard_layout, weight_files

    for shard in weight_files(model_dir):
        layout = shard_layout(shard)
        if "model.norm.weight" in layout:
            start = layout["model.norm.weight"][2]
            with open(shard, "r+b") as f:
                f.seek(start)
                b = f.read(1)
                f.seek(start)
                f.write(bytes([b[0] ^ 1]))
            return
    raise AssertionError("no model.norm.weight in the demo")


def drop_vision(model_dir):
    from safetensors.torch import load_file, save_file

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        t = load_file(str(model_dir / shard))
        save_file(
            {k: v for k, v in t.items() if not k.startswith("visual.")},
            str(model_dir / shard),
            metadata={"format": "pt"},
        )
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("visual.")}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))


def test_export_by_run_id_passes_every_check(store, demo, tmp_path, capsys):
    import mlflow
    from safetensors import safe_open

    run_id, _, uri = store
    root = tmp_path / "ckpt"
    code, err = export(
        [
            "--run-id",
            run_id,
            "--model-dir",
            demo[0],
            "--output-dir",
            root,
            "--register",
            "qwen-demo-fp8",
            "--format",
            "both",
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads((root / "export_report.json").read_text())
    assert report["passed"] and all(c["passed"] for c in report["checks"].values())
    assert report["format"] == "both" and "modelopt.numerics" in report["checks"]
    out = root / "modelopt"  # --format both: ModelOpt's checkpoint beside compressed-tensors'
    assert report["checks"]["modelopt.numerics"]["kl_mean"] <= 1e-4
    assert report["checks"]["modelopt.scales"]["input_scales"] > 0
    assert report["checks"]["modelopt.numerics"]["engine_arithmetic"]["kl_mean"] >= 0.0
    assert report["checks"]["modelopt.vision"]["tensors"] > 0
    assert report["identity"]["match"] and not report["lm_only"]
    for name in (
        "config.json",
        "hf_quant_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "preprocessor_config.json",
        "chat_template.json",
        "generation_config.json",
    ):
        assert (out / name).is_file(), name
    cfg = json.loads((out / "config.json").read_text())
    base = json.loads((demo[0] / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl" and cfg["architectures"] == base["architectures"]
    assert cfg["quantization_config"]["quant_method"] == "modelopt"
    assert {k: v for k, v in cfg.items() if k != "quantization_config"} == base
    top = json.loads((root / "config.json").read_text())
    assert top["quantization_config"]["quant_method"] == "compressed-tensors"
    # FP8 layers as the manifest says, with scales; vision bytes equal the base's
    manifest = json.loads((store[1] / MANIFEST_FILE).read_text())
    fp8 = [r["name"] for r in manifest["layers"] if r["format"] == "FP8"]
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(out / index[f"{fp8[0]}.weight"]), "pt") as f:
        assert f.get_tensor(f"{fp8[0]}.weight").dtype == torch.float8_e4m3fn
        assert f.get_tensor(f"{fp8[0]}.input_scale").dtype == torch.float32
    vis = next(k for k in index if k.startswith("visual."))
    base_index = json.loads((demo[0] / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(out / index[vis]), "pt") as a, safe_open(str(demo[0] / base_index[vis]), "pt") as b:
        assert torch.equal(a.get_tensor(vis).view(torch.uint8), b.get_tensor(vis).view(torch.uint8))
    hfq = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert "visual*" in hfq["exclude_modules"]
    # MLflow: the export's own run, linked both ways
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp_run = client.get_run(report["mlflow"]["run_id"])
    assert exp_run.info.status == "FINISHED" and exp_run.data.tags["source_run_id"] == run_id
    assert "export/kl_mean" in exp_run.data.metrics
    assert client.get_run(run_id).data.tags["export.run_id"] == exp_run.info.run_id
    assert {"export_report.json", "export_files.json"} <= {
        a.path for a in client.list_artifacts(exp_run.info.run_id)
    }
    # --register: an MLflow 3 LoggedModel (MLmodel pyfunc over the compressed-tensors
    # checkpoint), registered, aliased by scheme, carrying the source run's quality metrics
    version = client.get_model_version_by_alias("qwen-demo-fp8", "fp8-balanced-10b")
    assert version.version == report["mlflow"]["registered"]["version"]
    model_id = report["mlflow"]["registered"]["model_id"]
    model_files = {f.path for f in client.list_logged_model_artifacts(model_id)}
    assert "MLmodel" in model_files
    logged = client.get_logged_model(model_id)
    assert logged.source_run_id == run_id and version.tags["source_run_id"] == run_id
    source_kl = client.get_run(run_id).data.metrics["quality/kl_mean"]
    assert {m.key: m.value for m in logged.metrics}["quality/kl_mean"] == source_kl
    generator = mlflow.pyfunc.load_model("models:/qwen-demo-fp8@fp8-balanced-10b")
    texts = generator.predict(["A photo of", "Two dogs"], params={"max_new_tokens": 3})
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts) and any(texts)
    assert not list(tmp_path.glob(".ckpt.partial-*"))


def _assert_usage(code, err, flag, out=None):
    assert code == 2, err
    assert flag in err and "fix:" in err and "Traceback" not in err
    if out is not None:
        assert not out.exists()


def test_unknown_run_id(store, tmp_path, capsys):
    code, err = export(["--run-id", "0" * 32, "--output-dir", tmp_path / "o"], capsys)
    _assert_usage(code, err, "--run-id", tmp_path / "o")


def test_unfinished_run_and_run_without_state(store, tmp_path, capsys):
    import mlflow

    client = mlflow.MlflowClient()
    exp = client.search_experiments()[0].experiment_id
    running = client.create_run(exp).info.run_id
    code, err = export(["--run-id", running, "--output-dir", tmp_path / "o"], capsys)
    _assert_usage(code, err, "--run-id", tmp_path / "o")
    assert "RUNNING" in err
    empty = client.create_run(exp).info.run_id
    client.set_terminated(empty, "FINISHED")
    code, err = export(["--run-id", empty, "--output-dir", tmp_path / "o"], capsys)
    _assert_usage(code, err, "--run-id", tmp_path / "o")
    assert QUANT_STATE_FILE in err


def test_tampered_state_is_refused(store, demo, tmp_path, capsys):
    art = shutil.copytree(store[1], tmp_path / "art")
    with open(art / QUANT_STATE_FILE, "ab") as f:
        f.write(b"\0")
    code, err = export(
        ["--artifacts-dir", art, "--model-dir", demo[0], "--output-dir", tmp_path / "o"], capsys
    )
    _assert_usage(code, err, "--artifacts-dir", tmp_path / "o")
    assert "sha256" in err


def test_other_weights_refused_in_export_and_restore(store, demo, tmp_path, capsys):
    from vlm_autoquant.core.errors import UsageError
    from vlm_autoquant.model import quant_state
    from vlm_autoquant.model.identity import lm_weights_sha256

    other = copy_demo(demo[0], tmp_path / "other")
    flip_one_lm_byte(other)  # one value of one tensor
    assert lm_weights_sha256(other) != lm_weights_sha256(demo[0])
    code, err = export(["--run-id", store[0], "--model-dir", other, "--output-dir", tmp_path / "o"], capsys)
    _assert_usage(code, err, "--model-dir", tmp_path / "o")
    assert "--allow-other-weights" in err
    with pytest.raises(UsageError, match="other LM weights"):
        quant_state.restore(other, store[1] / QUANT_STATE_FILE, torch.device("cpu"))
    model = quant_state.restore(
        other, store[1] / QUANT_STATE_FILE, torch.device("cpu"), allow_other_weights=True
    )
    # the weights are the other dir's (its flipped byte included), the quantizers the run's
    from safetensors import safe_open

    from vlm_autoquant.model.identity import shard_layout, weight_files

    shard = next(f for f in weight_files(other) if "model.norm.weight" in shard_layout(f))
    with safe_open(str(shard), "pt") as f:
        theirs = f.get_tensor("model.norm.weight")
    with safe_open(
        str(next(f for f in weight_files(demo[0]) if "model.norm.weight" in shard_layout(f))), "pt"
    ) as f:
        assert not torch.equal(theirs, f.get_tensor("model.norm.weight"))
    assert torch.equal(dict(model.named_parameters())["model.norm.weight"].cpu(), theirs)
    saved = torch.load(store[1] / QUANT_STATE_FILE, weights_only=True)["quantizer_state"]
    amax = {k: v["_amax"] for k, v in saved.items() if torch.is_tensor(v.get("_amax"))}
    assert amax
    for key, value in amax.items():
        assert torch.equal(model.get_submodule(key).amax.float().cpu(), value.float()), key


def test_output_dir_not_empty_and_disk_full(store, demo, tmp_path, capsys, monkeypatch):
    import collections

    from vlm_autoquant.exporter import inputs as export_inputs

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code, err = export(["--run-id", store[0], "--model-dir", demo[0], "--output-dir", full], capsys)
    _assert_usage(code, err, "--output-dir")
    assert (full / "keep.txt").read_text() == "mine" and "--overwrite" in err
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(export_inputs.shutil, "disk_usage", lambda p: usage(10, 10, 0))
    code, err = export(["--run-id", store[0], "--model-dir", demo[0], "--output-dir", tmp_path / "o"], capsys)
    _assert_usage(code, err, "--output-dir", tmp_path / "o")
    assert "disk space" in err


def test_model_dir_without_vision_tower_needs_lm_only(store, demo, tmp_path, capsys):
    lm = copy_demo(demo[0], tmp_path / "lm")
    drop_vision(lm)  # the LM bytes, hence the identity, are unchanged
    code, err = export(["--run-id", store[0], "--model-dir", lm, "--output-dir", tmp_path / "o"], capsys)
    _assert_usage(code, err, "--model-dir", tmp_path / "o")
    assert "--lm-only" in err
    code, err = export(
        ["--run-id", store[0], "--model-dir", lm, "--output-dir", tmp_path / "o", "--lm-only", "--no-mlflow"],
        capsys,
    )
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "export_report.json").read_text())
    assert report["lm_only"] and report["passed"]
    assert report["checks"]["loadability"]["class"] == "Qwen2ForCausalLM"


def test_interrupted_or_failed_export_leaves_nothing(store, demo, tmp_path, capsys, monkeypatch):
    from vlm_autoquant.exporter import pipeline as export_pipeline

    def boom(staging):
        assert (staging / "config.json").is_file()  # it got as far as a full checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(export_pipeline, "_before_publish", boom)
    code, err = export(
        ["--run-id", store[0], "--model-dir", demo[0], "--output-dir", tmp_path / "o", "--no-mlflow"], capsys
    )
    assert code == 130, err
    assert "Nothing was written" in err and "calibration" not in err
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]
    monkeypatch.setattr(export_pipeline.export_verify, "KL_LIMIT", -1.0)  # a check that fails
    code, err = export(
        ["--run-id", store[0], "--model-dir", demo[0], "--output-dir", tmp_path / "o", "--no-mlflow"], capsys
    )
    assert code == 1 and "numerics" in err
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]
    monkeypatch.setattr(export_pipeline.export_verify, "KL_LIMIT", 1e-4)

    def full(*_args):  # the disk fills up while the vision shard is written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export_pipeline.export, "_write_shard", full)
    code, err = export(
        ["--run-id", store[0], "--model-dir", demo[0], "--output-dir", tmp_path / "o", "--no-mlflow"], capsys
    )
    _assert_usage(code, err, "--output-dir", tmp_path / "o")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


def test_engine_rows_per_format_and_kind_warn_only_on_failures():
    """The pcpt mix (MIXED_PRECISION) loads in vLLM (since 0.30) and fails in SGLang; a
    compressed-tensors per-tensor group fails in TensorRT-LLM; only failures warn."""
    from vlm_autoquant.exporter import engines

    mixed = engines.assess(
        {
            "quantization": {
                "quant_algo": "MIXED_PRECISION",
                "quantized_layers": {
                    "model.layers.0.mlp.up_proj": {"quant_algo": "FP8"},
                    "model.layers.0.mlp.down_proj": {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN"},
                },
            }
        }
    )
    assert mixed["kind"] == engines.MIXED
    assert mixed["engines"]["vllm"]["verdict"] == "loads" and mixed["engines"]["vllm"]["since"] == "0.30"
    assert mixed["engines"]["sglang"]["verdict"] == "fails"
    lines = engines.warn(mixed)
    assert len(lines) == 2 and any("sglang" in x for x in lines)
    assert not any(x.startswith("vllm") for x in lines)
    plain = engines.assess({"quantization": {"quant_algo": "FP8", "exclude_modules": ["lm_head"]}})
    assert plain["kind"] == engines.PER_TENSOR
    assert [x.split()[0] for x in engines.warn(plain)] == ["transformers"]
    ct = engines.assess_ct({"config_groups": {"fp8_per_tensor": {"weights": {"strategy": "tensor"}}}})
    assert [x.split()[0] for x in engines.warn(ct)] == ["tensorrt-llm"]
    for row in [*mixed["engines"].values(), *ct["engines"].values()]:
        assert row["since"] and "/" in row["source"]


def test_identity_ignores_the_vision_tower(demo, tmp_path):
    from vlm_autoquant.model.identity import lm_weights_sha256, shard_layout, weight_files

    other = copy_demo(demo[0], tmp_path / "v")
    for shard in weight_files(other):  # change one vision value: the identity must not move
        vis = [v for k, v in shard_layout(shard).items() if k.startswith("visual.")]
        if vis:
            with open(shard, "r+b") as f:
                f.seek(vis[0][2])
                f.write(b"\x7f")
            break
    assert lm_weights_sha256(other) == lm_weights_sha256(demo[0])


def test_script_reports_bad_input_without_traceback(tmp_path):
    proc = subprocess.run(
        [
            PY,
            str(EXPORT_SCRIPT),
            "--artifacts-dir",
            str(tmp_path / "none"),
            "--output-dir",
            str(tmp_path / "o"),
            "--no-mlflow",
        ],
        cwd=tmp_path,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "--artifacts-dir" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_mlflow_run_export_entry_point(store, demo, tmp_path):
    """`mlflow run . -e export --env-manager local -P run_id=...` into the source run's store."""
    import mlflow

    run_id, _, uri = store
    cmd = [
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        "export",
        "--env-manager",
        "local",
        "-P",
        f"run_id={run_id}",
        "-P",
        f"model_dir={demo[0]}",
        "-P",
        f"output_dir={tmp_path / 'ckpt'}",
    ]
    proc = subprocess.run(
        cmd,
        env=subprocess_env(MLFLOW_TRACKING_URI=uri),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "ckpt" / "export_report.json").read_text())
    assert report["passed"]
    for noise in ("torch_dtype", "Tied weight", "0.00 GiB"):  # ModelOpt's notices at DEBUG
        assert noise not in proc.stderr, proc.stderr[-3000:]
    assert re.search(r"export written: .*\([0-9.]+ KiB, \d+ files\)", proc.stderr)
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(report["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["source_run_id"] == run_id
    assert run.data.params["run_id"] == run_id  # logged by mlflow run itself
    # no --experiment-name: still the README's experiment, beside the run it exports
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_experiment(run.info.experiment_id).name == DEFAULT_EXPERIMENT
    assert run.info.experiment_id == client.get_run(run_id).info.experiment_id
    (pointer,) = client.search_runs(["0"])  # mlflow run's own, in "Default"
    assert pointer.data.tags["continued_in_run"] == run.info.run_id
    assert f"MLflow run {run.info.run_id} in experiment '{DEFAULT_EXPERIMENT}'" in proc.stdout
    assert "next: mlflow ui --backend-store-uri" in proc.stdout


def plant_rounding_ties(model_dir, key):
    """bf16 weights that land exactly on E4M3 rounding ties: amax = 51/512 (a bf16 value), and
    x = k x amax / 448 for k = 10.5, 21, 42, 84, 168 (midpoints between E4M3 codes), all exact in
    bf16. Real bf16 checkpoints hit such ties about once in a hundred weights (the full-size 3B
    export did); multiplying by 448/amax and dividing by amax/448 break them differently."""
    from safetensors.torch import load_file, save_file

    shard = next(f for f in sorted(model_dir.glob("*.safetensors")) if key in load_file(f))
    tensors = load_file(shard)
    amax = 51 / 512
    w = tensors[key].float().clamp(-amax / 2, amax / 2)
    ties = torch.tensor([k * amax / 448 for k in (10.5, 21, 42, 84, 168)])
    w[0, 0] = amax
    w[1, :10] = torch.cat([ties, -ties])
    assert torch.equal(w[1, :10].to(torch.bfloat16).float(), w[1, :10])  # exact in bf16
    tensors[key] = w.to(torch.bfloat16)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_exported_fp8_is_the_fake_quant_model_even_where_quantization_hurts(demo, tmp_path):
    """Every FP8 byte equals the fake-quant weight the search chose (ModelOpt's export divides by
    amax/448 where the fake quant multiplies by 448/amax: the two break exact E4M3 rounding ties
    differently, and bf16 weights hit ties, planted here), and with a planted
    outlier at 8 bits, where quantization costs real KL, the exported model stays far closer to
    the fake-quant model than the fake-quant model is to BF16 (the demo's default run cannot
    tell these apart: its quantization error is itself ~3e-6)."""
    import copy
    import sys

    from safetensors import safe_open

    from vlm_autoquant.cli import main
    from vlm_autoquant.core.errors import Problems
    from vlm_autoquant.exporter import assemble as export_mod
    from vlm_autoquant.exporter import pipeline as export_pipeline
    from vlm_autoquant.exporter import verify as export_verify
    from vlm_autoquant.exporter.inputs import ExportOptions, gather
    from vlm_autoquant.model.lm import load_lm, text_config

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_catalog import plant_outlier

    model_dir = copy_demo(demo[0], tmp_path / "m")
    plant_outlier(model_dir, 1)
    plant_rounding_ties(model_dir, "model.layers.0.self_attn.o_proj.weight")
    assert (
        main(
            [
                "--scheme-name",
                "fp8-all-8b",
                "--model-dir",
                str(model_dir),
                "--calib-file",
                str(demo[1]),
                "--output-dir",
                str(tmp_path / "run"),
                *QUICK,
            ]
        )
        == 0
    )
    problems = Problems()
    inputs = gather(
        ExportOptions(output_dir=tmp_path / "x", artifacts_dir=tmp_path / "run", model_dir=model_dir),
        tmp_path,
        problems,
    )
    problems.raise_if_any()
    cpu = torch.device("cpu")
    model = export_pipeline._restore(inputs, cpu)
    reference = copy.deepcopy(model)
    staging = tmp_path / "staging"
    mo_dir = export_mod.run_modelopt_export(model, staging)
    export_mod.write_configs(model_dir, mo_dir, staging, False)
    export_mod.assemble(model_dir, mo_dir, staging, False)
    modules = dict(reference.named_modules())
    checked = 0
    for f in export_verify.weight_files(staging):
        with safe_open(str(f), "pt") as st:
            for key in (k for k in st.keys() if k.endswith(".weight_scale")):
                layer = key.removesuffix(".weight_scale")
                m = modules[layer]
                fake = (
                    (m.weight.float() * (448.0 / m.weight_quantizer.amax.float()))
                    .clamp(-448, 448)
                    .to(torch.float8_e4m3fn)
                )
                assert torch.equal(
                    st.get_tensor(layer + ".weight").view(torch.uint8), fake.view(torch.uint8)
                ), layer
                checked += 1
    assert checked > 0
    amax = export_verify.quantizer_amax(reference, "input")
    assert export_verify.check_scales(staging, amax)["passed"]
    wrong = {k: v * (2.0 if k.endswith("layers.0.mlp.down_proj") else 1.0) for k, v in amax.items()}
    bad = export_verify.check_scales(staging, wrong)
    assert not bad["passed"] and "layers.0.mlp.down_proj" in bad["errors"][0]
    weight_amax = export_verify.quantizer_amax(reference, "weight")
    scales = export_verify.check_scales(staging, amax, weight_amax)
    assert scales["passed"] and scales["weight_scales"] == checked, scales
    off = {k: v * (1.5 if k.endswith("layers.1.mlp.up_proj") else 1.0) for k, v in weight_amax.items()}
    bad = export_verify.check_scales(staging, amax, off)
    assert not bad["passed"] and "layers.1.mlp.up_proj: weight_scale" in bad["errors"][0], bad
    codes = export_verify.check_weight_codes(staging, reference)
    assert codes["passed"] and codes["layers"] == checked, codes
    with torch.no_grad():  # a base weight the export did not round from: that layer is named
        w = reference.model.layers[2].mlp.down_proj.weight
        saved = w[3, :8].clone()
        w[3, :8] = w[3, :8] * 0.5
        codes = export_verify.check_weight_codes(staging, reference)
        w[3, :8] = saved
    assert not codes["passed"] and codes["layers_differing"] == 1
    assert codes["errors"][0].startswith("model.layers.2.mlp.down_proj:"), codes
    batches, _ = export_verify.held_out_batches(inputs.manifest, staging)
    cfg = text_config(model_dir)
    with torch.no_grad():  # buffers no checkpoint holds come from the restored model
        reference.model.rotary_emb.inv_freq[1:] = torch.nextafter(
            reference.model.rotary_emb.inv_freq[1:], torch.tensor(1.0)
        )
    run = export_verify.RunScales(amax, weight_amax)
    candidate = export_verify.dequantized_lm(staging, cfg, cpu, "modelopt", reference, run)
    assert torch.equal(candidate.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    bf16 = load_lm(model_dir, cfg, cpu)
    exported = export_verify.compare_logits(reference, candidate, batches, cpu)["kl_mean"]
    quantization = export_verify.compare_logits(bf16, reference, batches, cpu)["kl_mean"]
    assert quantization > 1e-5  # the planted outlier makes 8 bits cost something
    # every byte and scale is the run's: in the fake quant's arithmetic, the same logits
    assert exported == 0.0, (exported, quantization)
    assert export_verify.first_divergence(reference, candidate, batches[0], cpu) is None
    with torch.no_grad():  # one weight off in layer 1's o_proj: the report names that module
        w = candidate.model.layers[1].self_attn.o_proj.weight
        w[0, 0] = (w[0, 0].float() * 1.01 + 1e-3).to(w.dtype)
    where = export_verify.first_divergence(reference, candidate, batches[0], cpu)
    assert where["module"] == "model.layers.1.self_attn.o_proj", where
    assert 0 < where["max_abs_diff"] and where["differing_fraction"] < 0.5
    engine = export_verify.dequantized_lm(staging, cfg, cpu, "engine", reference=reference)
    served = export_verify.compare_logits(reference, engine, batches, cpu)["kl_mean"]
    assert served < 0.1 * quantization, (served, quantization)


def test_weights_dequantized_in_the_fake_quant_arithmetic(tmp_path):
    """Given the run's weight amax, the verifier dequantizes FP8 codes exactly as ModelOpt's fake
    quant does (codes x 1 / (448 / amax)), not codes x weight_scale: for this amax the two
    multipliers differ in the last fp32 bit and move some weights one bf16 ulp."""
    from modelopt.torch.quantization.tensor_quant import fp8_eager
    from safetensors.torch import save_file

    from vlm_autoquant.exporter import verify as export_verify
    from vlm_autoquant.search.fp8_kernel import e4m3_codes, fake_quant_scale

    amax = torch.tensor(0.57421875)  # a bf16 value: 1 / (448 / amax) != amax / 448 in fp32
    assert 1 / (448 / amax) != amax / 448
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(64, 256, generator=gen) * amax / 3).clamp(-amax, amax).to(torch.bfloat16)
    x[0, 0] = amax.to(torch.bfloat16)
    layer = "model.layers.0.mlp.down_proj"
    save_file(
        {
            f"{layer}.weight": e4m3_codes(x, fake_quant_scale(amax)),
            f"{layer}.weight_scale": (amax / 448).reshape(()).float(),
        },
        str(tmp_path / "model.safetensors"),
    )
    fake = fp8_eager(x, amax)
    state, _ = export_verify._dequantized_state(tmp_path, {layer: amax})
    assert torch.equal(state[f"{layer}.weight"], fake)
    engine, _ = export_verify._dequantized_state(tmp_path)
    assert not torch.equal(engine[f"{layer}.weight"], fake)  # the test can fail without amax


def test_modelopt_arithmetic_is_modelopt_fake_quant_bit_for_bit():
    """The verifier's "modelopt" arithmetic reproduces ModelOpt's own FP8 fake quant exactly,
    also for an amax that 448 x (amax / 448) does not give back, and on rounding ties."""
    from modelopt.torch.quantization.tensor_quant import fp8_eager

    from vlm_autoquant.exporter import verify as export_verify

    candidates = (torch.arange(1, 4000) / 256).to(torch.bfloat16).float()
    amax = next(a for a in candidates if (a / 448) * 448 != a)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(8, 512, generator=gen) * amax / 3).to(torch.bfloat16)
    ties = torch.tensor([k * amax.item() / 448 for k in (10.5, 21, 42, 84, 168)])
    x[0, :5] = ties.to(torch.bfloat16)
    hook = export_verify._input_quant_hook(amax / 448, "modelopt", amax)
    assert torch.equal(hook(None, (x,))[0], fp8_eager(x, amax))
    dynamic = export_verify._input_quant_hook(None, "modelopt")
    per_token = torch.stack([fp8_eager(row, row.abs().amax().float()) for row in x])
    assert torch.equal(dynamic(None, (x,))[0], per_token)


def lm_tensors(export_dir) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from vlm_autoquant.model.identity import weight_files

    out = {}
    for f in weight_files(export_dir):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys() if not k.startswith("visual.")})
    return out


def test_shared_max_export_is_what_the_engines_serve_byte_for_byte(demo, tmp_path, monkeypatch, capsys):
    """fp8-all-8b (every q/k/v and gate/up group FP8) run and exported once per --fused-scales.
    shared-max: one weight_scale and one input_scale per group, the largest of the per-module
    run's, and vLLM's load transformation (also SGLang's, which always re-quantizes) changes no
    byte. per-module: the siblings' weight scales differ, and the engines re-quantize them."""
    from vlm_autoquant.cli import main
    from vlm_autoquant.exporter.engine_load import served_tensors
    from vlm_autoquant.model.fused import fused_layer_groups

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    exported = {}
    for mode in ("shared-max", "per-module"):
        run = tmp_path / f"run-{mode}"
        assert (
            main(
                [
                    "--scheme-name",
                    "fp8-all-8b",
                    "--model-dir",
                    str(demo[0]),
                    "--calib-file",
                    str(demo[1]),
                    "--output-dir",
                    str(run),
                    "--fused-scales",
                    mode,
                    *QUICK,
                ]
            )
            == 0
        )
        doc = json.loads((run / MANIFEST_FILE).read_text())
        assert doc["export"]["fused_scales"] == mode == doc["scheme"]["fused_scales"]
        code, err = export(
            [
                "--artifacts-dir",
                run,
                "--model-dir",
                demo[0],
                "--output-dir",
                tmp_path / f"x-{mode}",
                "--no-mlflow",
            ],
            capsys,
        )
        assert code == 0, err
        report = json.loads((tmp_path / f"x-{mode}" / "export_report.json").read_text())
        warned = [w for w in report["warnings"] if "fused_scales" in w]
        assert len(warned) == (mode == "per-module"), report["warnings"]
        exported[mode] = lm_tensors(tmp_path / f"x-{mode}")
    shared, old = exported["shared-max"], exported["per-module"]
    groups = fused_layer_groups(
        {k.removesuffix(".weight_scale") for k in shared if k.endswith(".weight_scale")}
    )
    assert len(groups) == 2 * 4  # the demo's 4 layers, all FP8 at 8 bits
    for group in groups:
        for suffix in ("weight_scale", "input_scale"):
            largest = max(float(old[f"{n}.{suffix}"]) for n in group)
            assert [float(shared[f"{n}.{suffix}"]) for n in group] == [largest] * len(group)
    for always in (False, True):  # vLLM, SGLang
        served, stats = served_tensors(shared, always)
        assert stats["groups"] == len(groups) and stats["bytes_changed"] == 0, stats
        for key, value in shared.items():
            assert torch.equal(
                served[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)
            ), key
    assert any(len({float(old[f"{n}.weight_scale"]) for n in g}) > 1 for g in groups)
    served, stats = served_tensors(old)
    assert stats["requantized"] > 0 and stats["bytes_changed"] > 0, stats


def test_the_served_arithmetic_is_checked_against_its_bound(store, demo, tmp_path, capsys, monkeypatch):
    """The serving kernel's arithmetic is a check with a limit, not only a report: a limit no
    export can meet fails the export, and the report shows the limit that was applied."""
    from vlm_autoquant.exporter import verify as export_verify

    code, err = export(
        ["--run-id", store[0], "--model-dir", demo[0], "--output-dir", tmp_path / "ok", "--no-mlflow"], capsys
    )
    assert code == 0, err
    served = json.loads((tmp_path / "ok" / "export_report.json").read_text())["checks"]["numerics"][
        "engine_arithmetic"
    ]
    assert served["passed"] and served["kl_mean"] <= served["kl_limit"]
    assert served["kl_limit"] >= export_verify.ENGINE_KL_FLOOR
    monkeypatch.setattr(export_verify, "ENGINE_KL_FACTOR", -1.0)
    monkeypatch.setattr(export_verify, "ENGINE_KL_FLOOR", -1.0)
    code, err = export(
        ["--run-id", store[0], "--model-dir", demo[0], "--output-dir", tmp_path / "bad", "--no-mlflow"],
        capsys,
    )
    assert code == 1 and "numerics" in err
    assert not (tmp_path / "bad").exists()


def test_the_engine_limit_follows_the_runs_own_kl():
    from vlm_autoquant.exporter.verify import ENGINE_KL_FLOOR, engine_kl_limit

    assert engine_kl_limit(None) == ENGINE_KL_FLOOR  # no quality measured: the floor
    assert engine_kl_limit(ENGINE_KL_FLOOR / 10) == ENGINE_KL_FLOOR
    assert engine_kl_limit(0.2) == pytest.approx(0.2)  # a lossy scheme: its own KL
