"""The verification does each piece of work once: one read of the export's LM for every check,
the run's logits once per batch for both arithmetics, a loader-arithmetic copy that shares the
run's tensors. None of that sharing may hide a failure."""

from __future__ import annotations

import json

import pytest
import torch

from vlm_autoquant.core.errors import Problems

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def restored(script_run, demo, tmp_path_factory):
    """(inputs, reference): the shared script run, gathered for an export and restored on the CPU."""
    from vlm_autoquant.exporter import pipeline
    from vlm_autoquant.exporter.inputs import ExportOptions, gather

    root = tmp_path_factory.mktemp("verify_once")
    problems = Problems()
    inputs = gather(
        ExportOptions(output_dir=root / "x", artifacts_dir=script_run[0], model_dir=demo[0]), root, problems
    )
    problems.raise_if_any()
    return inputs, pipeline._restore(inputs, CPU)


def _two_layers(target) -> tuple[str, torch.Tensor]:
    """An export of two FP8 layers whose amax makes codes x weight_scale differ from the fake
    quant's codes x 1 / (448 / amax) (test_export's case); returns (the first layer, its amax)."""
    from safetensors.torch import save_file

    from vlm_autoquant.search.fp8_kernel import e4m3_codes, fake_quant_scale

    amax = torch.tensor(0.57421875)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in ("model.layers.0.mlp.down_proj", "model.layers.0.mlp.up_proj"):
        x = (torch.randn(64, 256, generator=gen) * amax / 3).clamp(-amax, amax).to(torch.bfloat16)
        tensors[f"{layer}.weight"] = e4m3_codes(x, fake_quant_scale(amax))
        tensors[f"{layer}.weight_scale"] = (amax / 448).reshape(()).float()
    tensors["model.norm.weight"] = torch.ones(256, dtype=torch.bfloat16)
    save_file(tensors, str(target / "model.safetensors"))
    return "model.layers.0.mlp.down_proj", amax


def test_one_read_serves_both_arithmetics_and_stays_as_read(tmp_path):
    """The fake quant's dequantization of the shared read leaves it as read: the serving
    arithmetic built after it from the same read equals one built from the files."""
    from vlm_autoquant.exporter import verify as export_verify

    layer, amax = _two_layers(tmp_path)
    shared = export_verify.ExportedLM.read(tmp_path, CPU)
    as_read = {k: v.clone() for k, v in shared.tensors.items()}
    fake, _ = export_verify._dequantized_state(shared, {layer: amax})
    served, inputs = export_verify._dequantized_state(shared)
    from_files, _ = export_verify._dequantized_state(tmp_path)
    assert not torch.equal(fake[f"{layer}.weight"], served[f"{layer}.weight"])  # the test can fail
    assert served.keys() == from_files.keys() and set(inputs) == {layer, "model.layers.0.mlp.up_proj"}
    for key, value in from_files.items():
        assert torch.equal(served[key], value), key
    assert shared.tensors.keys() == as_read.keys()
    for key, value in as_read.items():
        assert shared.tensors[key].dtype == value.dtype
        assert torch.equal(
            shared.tensors[key].reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8)
        ), key


class _Quantizer(torch.nn.Module):
    """A restored layer's weight quantizer: its amax and the fake-quantized weight it returns."""

    def __init__(self, amax: torch.Tensor, fake: torch.Tensor):
        super().__init__()
        self.amax, self.fake, self.is_enabled = amax, fake, True

    def forward(self, _weight: torch.Tensor) -> torch.Tensor:
        return self.fake


def _run_of(tensors: dict[str, torch.Tensor], amax: torch.Tensor) -> torch.nn.Module:
    """A run's model whose FP8 layers (under their export names) rounded to `tensors`' codes."""
    root = torch.nn.Module()
    for key in (k for k in tensors if k.endswith(".weight_scale")):
        *parents, leaf = key.removesuffix(".weight_scale").split(".")
        parent = root
        for part in parents:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        codes = tensors[key.replace("weight_scale", "weight")]
        m = torch.nn.Linear(codes.shape[1], codes.shape[0], bias=False)
        m.weight_quantizer = _Quantizer(amax, (codes.float() * (amax / 448)).to(torch.bfloat16))
        parent.add_module(leaf, m)
    return root


def test_checks_on_the_shared_read_fail_as_on_the_files(tmp_path):
    """One code and one scale changed in the files after the run: the codes and scales checks
    on one read of them report exactly what they report reading the files themselves."""
    from safetensors.torch import load_file, save_file

    from vlm_autoquant.exporter import verify as export_verify

    layer, amax = _two_layers(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    reference = _run_of(tensors, amax)
    codes = tensors[f"{layer}.weight"].view(torch.uint8).clone()
    codes[0, 0] ^= 1
    tensors[f"{layer}.weight"] = codes.view(torch.float8_e4m3fn)
    tensors["model.layers.0.mlp.up_proj.weight_scale"] = (
        tensors["model.layers.0.mlp.up_proj.weight_scale"] * 2
    )
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shared = export_verify.ExportedLM.read(tmp_path, CPU)
    weight_amax = {"model.layers.0.mlp.down_proj": amax, "model.layers.0.mlp.up_proj": amax}
    assert export_verify.check_weight_codes(shared, reference) == export_verify.check_weight_codes(
        tmp_path, reference
    )
    got = export_verify.check_weight_codes(shared, reference)
    assert not got["passed"] and got["layers"] == 2 and got["layers_differing"] == 1
    assert got["errors"] == [f"{layer}: 1 of {codes.numel()} codes differ from the run's"]
    scales = export_verify.check_scales(shared, {}, weight_amax)
    assert scales == export_verify.check_scales(tmp_path, {}, weight_amax)
    assert not scales["passed"] and scales["weight_scales"] == 2
    assert [e.split(":")[0] for e in scales["errors"]] == ["model.layers.0.mlp.up_proj"]


def test_the_served_arithmetic_sees_scales_the_fake_quant_does_not(restored, tmp_path, monkeypatch):
    """Every weight_scale of the written checkpoint x16, the codes and the run's amax untouched.
    The fake quant's arithmetic dequantizes with the run's amax, so its KL stays 0; the serving
    arithmetic, built after it from the same read of the files and compared with the same
    logits of the run's model, reads the stored scales and fails, as do the scales check and
    transformers' load; the codes still pass."""
    from safetensors.torch import load_file, save_file

    from vlm_autoquant.core.timing import Phases
    from vlm_autoquant.exporter import pipeline as export_pipeline
    from vlm_autoquant.model.identity import weight_files

    inputs, _ = restored
    real_write = export_pipeline.export_ct.write_checkpoint

    def write_then_scale(model, layers, base_dir, out, lm_only):
        qcfg = real_write(model, layers, base_dir, out, lm_only)
        for shard in weight_files(out):
            tensors = load_file(str(shard))
            scaled = {k: v * 16 for k, v in tensors.items() if k.endswith(".weight_scale")}
            save_file({**tensors, **scaled}, str(shard), metadata={"format": "pt"})
        return qcfg

    monkeypatch.setattr(export_pipeline.export_ct, "write_checkpoint", write_then_scale)
    staging = tmp_path / "staging"
    staging.mkdir()
    checks = export_pipeline.build_checkpoint(inputs, staging, Phases())["checks"]
    fp8 = sum(r.format == "FP8" for r in inputs.manifest.layers)
    assert checks["weights"]["passed"] and checks["weights"]["layers"] == fp8
    assert checks["formats"]["passed"] and checks["vision"]["passed"]
    scales = checks["scales"]
    assert not scales["passed"] and all("weight_scale is not the run's" in e for e in scales["errors"])
    numerics = checks["numerics"]
    assert numerics["kl_mean"] == 0.0 and numerics["top1_agreement"] == 1.0
    served = numerics["engine_arithmetic"]
    assert not served["passed"] and served["kl_mean"] > served["kl_limit"], json.dumps(served)
    assert not numerics["passed"] and not checks["loadability"]["passed"]


def test_the_run_is_run_once_per_batch_for_every_candidate():
    """Given the list, the reference runs once per batch over two comparisons, and each
    candidate is still compared with the reference, not with the other candidate."""
    from vlm_autoquant.exporter import verify as export_verify

    class Fixed(torch.nn.Module):
        def __init__(self, row: list[float]):
            super().__init__()
            self.row, self.calls = torch.tensor(row), 0

        def forward(self, input_ids, **_kw):
            self.calls += 1

            class Out:
                logits = self.row.expand(*input_ids.shape, len(self.row))

            return Out()

    batch = {
        "input_ids": torch.zeros(1, 4, dtype=torch.long),
        "position_ids": torch.arange(4)[None],
        "real": torch.ones(1, 4, dtype=torch.bool),
    }
    reference, near, far = Fixed([0.0, 0.0]), Fixed([0.01, 0.0]), Fixed([1.0, 0.0])
    logits: list[torch.Tensor] = []
    got_near = export_verify.compare_logits(reference, near, [batch, batch], CPU, logits)
    got_far = export_verify.compare_logits(reference, far, [batch, batch], CPU, logits)
    assert reference.calls == 2 and len(logits) == 2
    assert got_near == export_verify.compare_logits(Fixed([0.0, 0.0]), near, [batch, batch], CPU)
    assert got_far == export_verify.compare_logits(Fixed([0.0, 0.0]), far, [batch, batch], CPU)
    assert got_far["kl_mean"] > 100 * got_near["kl_mean"] > 0


def test_the_loader_arithmetic_copy_shares_the_run_and_packs_as_the_exporter(restored):
    """The copy's FP8 weights are compressed-tensors' decompression of exactly what the
    exporter packs (ct.compressed_layer), its other tensors are the run's own, and the run's
    model keeps every value and every enabled quantizer."""
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from modelopt.torch.quantization.nn import TensorQuantizer

    from vlm_autoquant.exporter import ct as export_ct
    from vlm_autoquant.exporter.load_check import run_in_loader_arithmetic

    inputs, reference = restored
    layers = inputs.manifest.layers
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    enabled = {n for n, m in reference.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}
    emulated = run_in_loader_arithmetic(reference, layers)
    schemes = export_ct.fp8_schemes(layers, export_ct.quantization_config(layers))
    theirs, mine = dict(reference.named_modules()), dict(emulated.named_modules())
    assert schemes
    for name, scheme in schemes.items():
        packed = export_ct.compressed_layer(theirs[name], scheme)
        want = FloatQuantizationCompressor.decompress(packed, scheme)["weight"]
        assert torch.equal(mine[name].weight.view(torch.int16), want.view(torch.int16)), name
        assert torch.equal(mine[name].weight_scale, packed["weight_scale"]), name
        assert mine[name].weight.data_ptr() != theirs[name].weight.data_ptr()
    shared = emulated.model.embed_tokens.weight.data_ptr() == reference.model.embed_tokens.weight.data_ptr()
    assert shared
    assert not any(m.is_enabled for m in emulated.modules() if isinstance(m, TensorQuantizer))
    now = reference.state_dict()
    assert now.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(now[key], value), key
    assert enabled == {
        n for n, m in reference.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled
    }


@pytest.mark.parametrize("fmt, copies", [("compressed-tensors", 0), ("modelopt", 1), ("both", 1)])
def test_the_restored_model_is_copied_only_where_modelopts_exporter_runs(
    script_run, demo, tmp_path, monkeypatch, fmt, copies
):
    """compressed-tensors' writer and every check only read the restored model, so that export
    holds it once (docs/PERFORMANCE.md: 8.4 against 14.6 GiB peak for a full-size 3B); ModelOpt's
    exporter may re-tune the quantizers it exports, so its checks compare with a copy. Every
    check passes either way."""
    import copy
    import types

    from vlm_autoquant import api
    from vlm_autoquant.exporter import pipeline

    restored, copied = [], []
    real_restore = pipeline._restore

    def restore(inputs, device):
        restored.append(real_restore(inputs, device))
        return restored[-1]

    def deepcopy(obj, memo=None):
        copied.extend(m for m in restored if obj is m)
        return copy.deepcopy(obj, memo)

    monkeypatch.setattr(pipeline, "_restore", restore)
    monkeypatch.setattr(pipeline, "copy", types.SimpleNamespace(deepcopy=deepcopy))
    done = api.export(script_run[0], model_dir=demo[0], output_dir=tmp_path / "x", format=fmt, mlflow=False)
    assert done.report["passed"] and all(c["passed"] for c in done.report["checks"].values())
    assert len(restored) == 1 and len(copied) == copies
