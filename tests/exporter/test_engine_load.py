"""The engines' load-time transformation of a per-tensor FP8 export, re-implemented."""

from __future__ import annotations

import json

import torch

from vlm_autoquant.exporter.engine_load import requantize_with_max_scale, served_tensors
from vlm_autoquant.model.fused import fused_layer_groups

from ..conftest import DATA

E4M3 = torch.float8_e4m3fn


def test_fused_groups_are_qkv_and_gate_up_per_layer():
    names = [
        f"model.layers.{i}.{p}"
        for i in range(2)
        for p in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    assert fused_layer_groups(names) == [
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
        [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj",
        ],
        ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"],
        [
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.self_attn.k_proj",
            "model.layers.1.self_attn.v_proj",
        ],
    ]


def test_requantize_to_the_largest_scale_rounds_to_the_nearest_code():
    # value 13 x 1.0 at the shared scale 3.0 is 4.33..., whose nearest E4M3 values are 4.0 and
    # 4.5 (spacing 0.5 in [4, 8)): 4.5. The sibling that owns the largest scale keeps its codes.
    codes = [torch.tensor([[13.0, -2.0, 0.0]]).to(E4M3), torch.tensor([[6.0, 448.0, 1.0]]).to(E4M3)]
    scale, out = requantize_with_max_scale(codes, torch.tensor([1.0, 3.0]))
    assert float(scale) == 3.0
    assert out[0].float().tolist() == [[4.5, -0.6875, 0.0]]  # -2/3 -> nearest code 0.6875
    assert torch.equal(out[1].view(torch.uint8), codes[1].view(torch.uint8))


def test_served_tensors_share_both_maxima_and_requantize_only_where_scales_differ():
    t = {}
    for name, ws, xs in (("q_proj", 1.0, 0.5), ("k_proj", 2.0, 0.25), ("v_proj", 2.0, 0.75)):
        t[f"a.{name}.weight"] = torch.tensor([[8.0, -3.0]]).to(E4M3)
        t[f"a.{name}.weight_scale"], t[f"a.{name}.input_scale"] = torch.tensor(ws), torch.tensor(xs)
    for name in ("gate_proj", "up_proj"):  # equal scales: vLLM keeps the bytes as they are
        t[f"b.{name}.weight"] = torch.tensor([[1.0, 2.0]]).to(E4M3)
        t[f"b.{name}.weight_scale"] = torch.tensor(0.5)
        t[f"b.{name}.input_scale"] = torch.tensor(1.0)
    out, stats = served_tensors(t)
    assert stats == {"groups": 2, "requantized": 1, "bytes_changed": 2}  # q's 8 -> 4, -3 -> -1.5
    assert out["a.q_proj.weight"].float().tolist() == [[4.0, -1.5]]
    assert {float(out[f"a.{n}.weight_scale"]) for n in ("q_proj", "k_proj", "v_proj")} == {2.0}
    assert {float(out[f"a.{n}.input_scale"]) for n in ("q_proj", "k_proj", "v_proj")} == {0.75}
    assert torch.equal(t["a.q_proj.weight"].float(), torch.tensor([[8.0, -3.0]]))  # not changed
    assert served_tensors(t, always=True)[1]["requantized"] == 2  # SGLang: every group


def test_the_export_warns_only_for_per_tensor_fp8_groups_kept_per_module():
    from vlm_autoquant.exporter.engine_load import fused_scales_warning
    from vlm_autoquant.run.manifest import MANIFEST_VERSION, Manifest

    example = json.loads((DATA / "manifest_v1_example.json").read_text())

    def manifest(rule, config):
        row = {k: v for k, v in example["layers"][0].items() if k not in ("name", "format", "quant_config")}
        layers = [
            {
                **row,
                "name": f"model.layers.0.self_attn.{p}_proj",
                "format": "FP8" if config else "BF16",
                "quant_config": config,
            }
            for p in "qkvo"
        ]
        doc = {
            **example,
            "manifest_version": MANIFEST_VERSION,
            "layers": layers,
            "export": {"fused_scales": rule},
        }
        return Manifest.model_validate(doc)

    kept = fused_scales_warning(manifest("per-module", "FP8_DEFAULT_CFG"))
    assert "--fused-scales shared-max" in kept
    assert fused_scales_warning(manifest("shared-max", "FP8_DEFAULT_CFG")) is None
    assert fused_scales_warning(manifest("per-module", "FP8_PER_CHANNEL_PER_TOKEN_CFG")) is None
    assert fused_scales_warning(manifest("per-module", None)) is None  # BF16
