"""compressed-tensors export: names in every layout, both formats on a pcpt run, and a real load
with transformers' own from_pretrained (text KL, image-plus-text generation)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ..conftest import QUICK


def _layers(rows: list[tuple[str, str | None]]) -> list:
    from vlm_autoquant.run.manifest import LayerRecord

    return [
        LayerRecord(
            name=n,
            group=n,
            format="FP8" if q else "BF16",
            quant_config=q,
            num_weights=64,
            scores={},
            costs={},
            cost_counted=True,
            disabled=False,
        )
        for n, q in rows
    ]


def test_targets_and_ignore_match_every_naming_and_nothing_else():
    """The trap: released keys, transformers' modules and vLLM's names differ; every entry
    must match all three (and the fused projection), read by compressed-tensors' own matcher."""
    from compressed_tensors.utils.match import match_name

    from vlm_autoquant.exporter.ct import quantization_config

    layers = _layers(
        [
            ("model.layers.1.self_attn.q_proj", "FP8_DEFAULT_CFG"),
            ("model.layers.1.self_attn.k_proj", "FP8_DEFAULT_CFG"),
            ("model.layers.1.mlp.gate_proj", None),
            ("model.layers.1.mlp.up_proj", None),
            ("model.layers.1.mlp.down_proj", "FP8_PER_CHANNEL_PER_TOKEN_CFG"),
            ("lm_head", None),
        ]
    )
    cfg = quantization_config(layers).model_dump()
    groups, ignore = cfg["config_groups"], cfg["ignore"]

    def group_of(name):
        return [g for g, s in groups.items() if any(match_name(name, t) for t in s["targets"])]

    def ignored(name):
        return any(match_name(name, t) for t in ignore)

    for name in (
        "model.layers.1.self_attn.q_proj",
        "model.language_model.layers.1.self_attn.q_proj",
        "language_model.model.layers.1.self_attn.qkv_proj",
    ):
        assert group_of(name) == ["fp8_per_tensor"] and not ignored(name), name
    for name in ("model.layers.1.mlp.down_proj", "language_model.model.layers.1.mlp.down_proj"):
        assert group_of(name) == ["fp8_per_channel"] and not ignored(name), name
    for name in (
        "model.layers.1.mlp.gate_proj",
        "model.language_model.layers.1.mlp.up_proj",
        "language_model.model.layers.1.mlp.gate_up_proj",
        "lm_head",
        "language_model.lm_head",
        "visual.blocks.0.attn.qkv",
        "model.visual.blocks.0.mlp.gate_proj",
        "model.visual.merger.mlp.0",
    ):
        assert ignored(name) and not group_of(name), name
    for name in (
        "model.layers.11.self_attn.q_proj",
        "model.layers.1.self_attn.o_proj",
        "model.visual.blocks.1.self_attn.q_proj",
    ):
        assert not group_of(name), name
    assert groups["fp8_per_tensor"]["input_activations"]["dynamic"] is False
    assert groups["fp8_per_channel"]["weights"]["strategy"] == "channel"
    assert groups["fp8_per_channel"]["input_activations"]["strategy"] == "token"


@pytest.fixture(scope="module")
def pcpt_run(demo, tmp_path_factory):
    """One fp8-pcpt-10b run of the demo (both FP8 formats), in its own MLflow store."""
    from ..conftest import run_cli

    root = tmp_path_factory.mktemp("pcpt")
    old, cwd = os.environ.get("MLFLOW_TRACKING_URI"), os.getcwd()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.chdir(root)
    try:
        code = run_cli(
            [
                "--scheme-name",
                "fp8-pcpt-10b",
                "--model-dir",
                demo[0],
                "--calib-file",
                demo[1],
                "--output-dir",
                root / "out",
                *QUICK,
            ]
        )
    finally:
        os.chdir(cwd)
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    assert code == 0
    return root / "out"


@pytest.fixture(scope="module")
def exported(pcpt_run, demo, tmp_path_factory):
    from vlm_autoquant.exporter.inputs import ExportOptions
    from vlm_autoquant.exporter.pipeline import export_run

    out = tmp_path_factory.mktemp("ct") / "ckpt"
    report = export_run(
        ExportOptions(output_dir=out, artifacts_dir=pcpt_run, model_dir=demo[0], format="both")
    )
    return out, report


def test_both_formats_pass_every_check(exported, pcpt_run):
    out, report = exported
    manifest = json.loads((pcpt_run / "manifest.json").read_text())
    formats = {r["quant_config"] for r in manifest["layers"] if r["format"] == "FP8"}
    assert formats == {"FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG"}, formats
    assert report["passed"] and all(c["passed"] for c in report["checks"].values())
    for check in ("formats", "names", "vision", "scales", "weights", "numerics", "loadability"):
        assert report["checks"][check]["passed"], check
        if check != "names":
            assert report["checks"][f"modelopt.{check}"]["passed"], check
    assert report["checks"]["weights"]["layers"] == len(
        [r for r in manifest["layers"] if r["format"] == "FP8"]
    )
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "float-quantized"
    assert sorted(q["config_groups"]) == ["fp8_per_channel", "fp8_per_tensor"]
    assert (out / "modelopt" / "hf_quant_config.json").is_file()
    assert report["engines"]["kind"] == "per-tensor + per-channel + BF16"
    assert report["engines"]["modelopt"]["engines"]["sglang"]["verdict"] == "fails"


def test_transformers_loads_it_as_the_run_computes(exported):
    """The report's check: transformers' loaded model equals the run's model computed in the
    loader's arithmetic (KL within 5%), and an image-plus-text generation ran."""
    _, report = exported
    load = report["checks"]["loadability"]
    assert load["class"] == "Qwen2_5_VLForConditionalGeneration"
    like, got = load["run_in_loader_arithmetic"]["kl_mean"], load["loaded"]["kl_mean"]
    assert like > 0 and abs(got - like) <= 0.05 * like
    assert load["loaded"]["tokens"] == load["run"]["tokens"] > 100
    assert load["image_generation"]["image_tokens"] > 0
    assert load["image_generation"]["new_tokens"] == 4


def test_from_pretrained_quantizes_exactly_the_fp8_layers(exported, pcpt_run, demo):
    """Loaded here independently: FP8 layers carry compressed-tensors schemes, BF16 layers and
    the vision tower none and keep the base's weights; the logits stay close to BF16's."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    out, _ = exported
    manifest = json.loads((pcpt_run / "manifest.json").read_text())
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.bfloat16).eval()
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(demo[0], dtype=torch.bfloat16).eval()
    modules, base_modules = dict(model.named_modules()), dict(base.named_modules())
    for row in manifest["layers"]:
        if row["name"] == "lm_head":
            continue
        name = row["name"].replace("model.", "model.language_model.", 1)
        assert hasattr(modules[name], "quantization_scheme") == (row["format"] == "FP8"), name
        if row["format"] == "BF16":
            assert torch.equal(modules[name].weight, base_modules[name].weight), name
    assert not any(
        hasattr(m, "quantization_scheme") for n, m in modules.items() if n.startswith("model.visual")
    )
    vocab = model.config.get_text_config().vocab_size
    ids = torch.tensor([[9707, 11, 1052, 374, 264, 8251, 389, 279, 1965, 13]]) % vocab
    with torch.inference_mode():
        lq, lb = model(input_ids=ids).logits.float(), base(input_ids=ids).logits.float()
    assert torch.isfinite(lq).all()
    kl = (
        torch.nn.functional.kl_div(lq.log_softmax(-1), lb.log_softmax(-1), log_target=True, reduction="none")
        .sum(-1)
        .mean()
        .item()
    )
    assert 0 < kl < 1e-3


def test_artifacts_dir_export_links_its_source_run(pcpt_run, demo, tmp_path, monkeypatch):
    """An export from --artifacts-dir finds the run that wrote the directory, tags it as
    source_run_id, and registers a ModelOpt-only export as its folder (no pyfunc)."""
    import mlflow

    from vlm_autoquant.exporter.inputs import ExportOptions
    from vlm_autoquant.exporter.pipeline import export_run
    from vlm_autoquant.tracking import Tracker

    uri = f"sqlite:///{pcpt_run.parent / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(pcpt_run.parent)
    client = mlflow.MlflowClient(tracking_uri=uri)
    (source,) = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        if not r.data.tags.get("source_run_id")
    ]
    report = export_run(
        ExportOptions(
            output_dir=tmp_path / "mo",
            artifacts_dir=pcpt_run,
            model_dir=demo[0],
            format="modelopt",
            register="pcpt-mo",
        ),
        lambda name, out: Tracker("exports", name, out_dir=out),
    )
    assert report["passed"] and report["format"] == "modelopt"
    export = client.get_run(report["mlflow"]["run_id"])
    assert export.data.tags["source_run_id"] == source.info.run_id
    assert client.get_run(source.info.run_id).data.tags["export.run_id"] == export.info.run_id
    model = client.get_logged_model(report["mlflow"]["registered"]["model_id"])
    assert model.source_run_id == source.info.run_id
    files = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    assert "hf_quant_config.json" in files and "MLmodel" not in files


@pytest.mark.parametrize("recipe", ["FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG"])
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: packing on the GPU against the CPU"
)
def test_a_layer_packed_on_the_gpu_has_the_cpus_bytes(recipe):
    """The exporter packs each FP8 layer where it is (on the GPU for a GPU export): the codes and
    scales must be the bytes the same layer packs to on the CPU."""
    import copy

    import modelopt.torch.quantization as mtq

    from vlm_autoquant.exporter import ct as export_ct

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 200, bias=True)).to(torch.bfloat16)
    data = [torch.randn(8, 96, dtype=torch.bfloat16) * (i + 1) for i in range(3)]
    mtq.quantize(model, getattr(mtq, recipe), lambda m: [m(x) for x in data])
    scheme = export_ct.fp8_schemes(
        _layers([("0", recipe)]), export_ct.quantization_config(_layers([("0", recipe)]))
    )
    on_cpu = export_ct.compressed_layer(model[0], scheme["0"])
    on_gpu = export_ct.compressed_layer(copy.deepcopy(model).cuda()[0], scheme["0"])
    assert on_cpu.keys() == on_gpu.keys() and on_gpu["weight"].is_cuda
    for key, value in on_cpu.items():
        got = on_gpu[key].cpu()
        assert got.dtype == value.dtype and torch.equal(got.view(torch.uint8), value.view(torch.uint8)), key


def test_the_lm_is_written_shard_by_shard_with_the_tensors_of_one_write(
    pcpt_run, demo, tmp_path, monkeypatch
):
    """Shards are written as they fill (the host never holds the whole LM), and cutting the LM
    into shards changes no tensor, its name or the name order."""
    from safetensors.torch import load_file

    from vlm_autoquant.core.artifacts import MANIFEST_FILE, QUANT_STATE_FILE
    from vlm_autoquant.exporter import ct as export_ct
    from vlm_autoquant.model import quant_state
    from vlm_autoquant.run.manifest import parse

    layers = parse(json.loads((pcpt_run / MANIFEST_FILE).read_text()), "manifest").layers
    model = quant_state.restore(demo[0], pcpt_run / QUANT_STATE_FILE, torch.device("cpu"))
    qcfg = export_ct.quantization_config(layers)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    export_ct._save_shards(export_ct.lm_tensors(model, layers, qcfg), whole)
    one = load_file(whole / "model.safetensors")
    total = sum(t.numel() * t.element_size() for t in one.values())

    drawn, at_writes = [0], []
    saved = export_ct.save_file

    def counting(tensors):
        for item in tensors:
            drawn[0] += 1
            yield item

    def recording(tensors, path, metadata=None):
        at_writes.append(
            (drawn[0], sum(t.numel() * t.element_size() for t in tensors.values()), len(tensors))
        )
        saved(tensors, path, metadata=metadata)

    monkeypatch.setattr(export_ct, "SHARD_BYTES", total // 5)
    monkeypatch.setattr(export_ct, "save_file", recording)
    export_ct._save_shards(counting(export_ct.lm_tensors(model, layers, qcfg)), cut)

    n = len(at_writes)
    assert n >= 5 and at_writes[0][0] < len(one)  # the first shard went out before the last tensor
    assert all(size <= total // 5 or count == 1 for _, size, count in at_writes)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    assert sorted(p.name for p in cut.iterdir()) == sorted([*names, "model.safetensors.index.json"])
    index = json.loads((cut / "model.safetensors.index.json").read_text())["weight_map"]
    order = []
    for name in names:
        part = load_file(cut / name)
        order += sorted(part)
        assert all(index[k] == name for k in part)
        for k, t in part.items():
            assert t.dtype == one[k].dtype and torch.equal(t.view(torch.uint8), one[k].view(torch.uint8)), k
    assert order == sorted(one) and len(index) == len(one)
