"""Which engines load an export, per format and scheme kind, read from their sources, with versions.

Verdicts: "loads", "loads with a caveat" (the caveat says what differs), "fails" (the engine
refuses the checkpoint or serves it wrongly). `since` is the first version the verdict holds for
where the source history was read, else the version read. Each export reports the rows of its
format and kind in `export_report.json` and warns only about "fails".
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

VLLM, SGLANG, TRTLLM, TRANSFORMERS = "vllm", "sglang", "tensorrt-llm", "transformers"
ENGINES = (VLLM, SGLANG, TRTLLM, TRANSFORMERS)
PER_TENSOR, MIXED, PER_CHANNEL = "per-tensor + BF16", "per-tensor + per-channel + BF16", "per-channel + BF16"
LOADS, CAVEAT, FAILS = "loads", "loads with a caveat", "fails"

V_MO = "vllm-project/vllm vllm/model_executor/layers/quantization/modelopt.py"
V_CT = (
    "vllm-project/vllm vllm/model_executor/layers/quantization/compressed_tensors/"
    "compressed_tensors.py + utils.py (find_matched_target, should_ignore_layer)"
)
S_MO = "sgl-project/sglang python/sglang/srt/layers/quantization/modelopt_quant.py"
S_CT = "sgl-project/sglang python/sglang/srt/layers/quantization/compressed_tensors/compressed_tensors.py"
T_MO = "NVIDIA/TensorRT-LLM tensorrt_llm/quantization/modelopt_config.py, _torch/model_config.py"
T_CT = "NVIDIA/TensorRT-LLM tensorrt_llm/models/quant_config_utils.py"
H_MO = "huggingface/transformers src/transformers/quantizers/auto.py (no modelopt quantizer)"
H_CT = (
    "huggingface/transformers src/transformers/quantizers/quantizer_compressed_tensors.py; "
    "checked here by exporter.load_check"
)

# (format, kind) -> engine -> (verdict, since, source, note)
TABLE: dict[tuple[str, str], dict[str, tuple[str, str, str, str]]] = {
    ("modelopt", PER_TENSOR): {
        VLLM: (
            CAVEAT,
            "0.34 (read)",
            V_MO,
            "fuses q/k/v and gate/up at load and re-quantizes each group to its largest "
            "weight and input scale",
        ),
        SGLANG: (LOADS, "0.5.23 (read)", S_MO, "ModelOptFp8Config, static per-tensor input"),
        TRTLLM: (LOADS, "main 2026 (read)", T_MO, "quant_algo FP8 + exclude_modules"),
        TRANSFORMERS: (
            FAILS,
            "5.17 (read)",
            H_MO,
            "skips quant_method modelopt and upcasts the FP8 bytes without their scales: wrong outputs",
        ),
    },
    ("modelopt", MIXED): {
        VLLM: (LOADS, "0.30", V_MO, "ModelOptMixedPrecisionConfig; before 0.30 it refuses MIXED_PRECISION"),
        SGLANG: (
            FAILS,
            "0.5.23 (read)",
            S_MO,
            "MIXED_PRECISION without NVFP4 is routed to w4afp8, which ignores the ignore "
            "list and block-quantizes every linear, vision included; --quantization "
            "modelopt refuses it",
        ),
        TRTLLM: (LOADS, "main 2026 (read)", T_MO, "MIXED_PRECISION with quantized_layers"),
        TRANSFORMERS: (FAILS, "5.17 (read)", H_MO, "no modelopt quantizer"),
    },
    ("compressed-tensors", PER_TENSOR): {
        VLLM: (
            CAVEAT,
            "0.8 copy (read)",
            V_CT,
            "CompressedTensorsW8A8Fp8 per tensor, static input; fused q/k/v and gate/up "
            "take the group's largest scale at load",
        ),
        SGLANG: (
            CAVEAT,
            "adapted from vLLM 0.8.2 (read)",
            S_CT,
            "CompressedTensorsW8A8Fp8 per tensor, static input (_is_fp8_w8a8); ignore "
            "matched with the fused mapping; fused scales as in vLLM",
        ),
        TRTLLM: (
            FAILS,
            "main 2026 (read)",
            T_CT,
            "8-bit weights must be 'channel' or 'block': 'tensor' raises Unsupported "
            "weights_quant_strategy; use --format modelopt",
        ),
        TRANSFORMERS: (
            CAVEAT,
            "5.17 (read, tested)",
            H_CT,
            "needs compressed-tensors; W8A8 fake quant in bf16 (bf16 scales, which this export writes)",
        ),
    },
    ("compressed-tensors", MIXED): {
        VLLM: (
            CAVEAT,
            "0.8 copy (read)",
            V_CT,
            "one scheme per config group; fused siblings share a group (ModelOpt's search "
            "groups them); fused scales as above",
        ),
        SGLANG: (
            CAVEAT,
            "adapted from vLLM 0.8.2 (read)",
            S_CT,
            "one scheme per config group, per-channel weights with dynamic per-token "
            "input accepted (_is_fp8_w8a8); fused scales as in vLLM",
        ),
        TRTLLM: (
            FAILS,
            "main 2026 (read)",
            T_CT,
            "the per-tensor group raises Unsupported weights_quant_strategy; use --format modelopt",
        ),
        TRANSFORMERS: (CAVEAT, "5.17 (read, tested)", H_CT, "W8A8 fake quant in bf16"),
    },
}
TABLE[("modelopt", PER_CHANNEL)] = {
    **TABLE[("modelopt", MIXED)],
    VLLM: (LOADS, "0.34 (read)", V_MO, "quant_algo FP8_PER_CHANNEL_PER_TOKEN"),
    SGLANG: (FAILS, "0.5.23 (read)", S_MO, "ModelOptFp8Config reads per-tensor FP8 only"),
}
TABLE[("compressed-tensors", PER_CHANNEL)] = {
    **TABLE[("compressed-tensors", MIXED)],
    TRTLLM: (LOADS, "main 2026 (read)", T_CT, "FP8_PER_CHANNEL_PER_TOKEN"),
}


def kind_of(algos: set[str]) -> str:
    """Scheme kind from the FP8 formats an export holds ("FP8", "FP8_PER_CHANNEL_PER_TOKEN")."""
    if "FP8_PER_CHANNEL_PER_TOKEN" in algos:
        return MIXED if "FP8" in algos else PER_CHANNEL
    return PER_TENSOR


def rows(fmt: str, kind: str) -> dict:
    """The table's rows for one export: {engine: {verdict, since, source, caveat}}."""
    return {e: dict(zip(("verdict", "since", "source", "note"), v)) for e, v in TABLE[(fmt, kind)].items()}


def assess(hf_quant: dict) -> dict:
    """The rows for a ModelOpt export (hf_quant_config.json)."""
    q = hf_quant.get("quantization", hf_quant)
    algo = str(q.get("quant_algo"))
    algos = (
        {str(v.get("quant_algo")) for v in q.get("quantized_layers", {}).values()}
        if algo == "MIXED_PRECISION"
        else {algo}
    )
    kind = kind_of(algos)
    return {"format": "modelopt", "quant_algo": algo, "kind": kind, "engines": rows("modelopt", kind)}


def assess_ct(qcfg: dict) -> dict:
    """The rows for a compressed-tensors export (config.json's quantization_config)."""
    algos = {
        "FP8" if s["weights"]["strategy"] == "tensor" else "FP8_PER_CHANNEL_PER_TOKEN"
        for s in qcfg["config_groups"].values()
    }
    kind = kind_of(algos)
    return {
        "format": "compressed-tensors",
        "groups": sorted(qcfg["config_groups"]),
        "kind": kind,
        "engines": rows("compressed-tensors", kind),
    }


def warn(table: dict) -> list[str]:
    """Log (and return) one warning per engine that fails to load or serve this export."""
    lines = [
        f"{engine} {row['since']}: a {table['kind']} {table['format']} export {FAILS}: "
        f"{row['note']} ({row['source']})"
        for engine, row in table["engines"].items()
        if row["verdict"] == FAILS
    ]
    for line in lines:
        log.warning(line)
    return lines
