"""Which serving engines can serve an export, per ModelOpt quant_algo, with the source of each claim.

The table is about the checkpoint format (`hf_quant_config.json`), for Qwen2.5-VL. "yes" means
the engine's ModelOpt loader maps that algorithm to an FP8 kernel; "no" means the layers would not
be served as FP8. Claims not read in an engine's source are marked "unverified".
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

VLLM = "vllm"
TRTLLM = "tensorrt-llm"
SGLANG = "sglang"
ENGINES = (VLLM, TRTLLM, SGLANG)

VLLM_MODELOPT = ("vllm-project/vllm vllm/model_executor/layers/quantization/modelopt.py "
                 "(ModelOptFp8Config; ModelOptMixedPrecisionConfig.get_quant_method maps "
                 "per-layer FP8, NVFP4, W4A16_NVFP4, MXFP8 only, anything else -> "
                 "UnquantizedLinearMethod)")
VLLM_DOCS = "vllm-project/vllm docs/features/quantization/modelopt.md (supported quant_algo list)"
TRTLLM_DOCS = ("NVIDIA/TensorRT-LLM docs 'Numerical Precision' / LLM API QuantAlgo "
               "(FP8, FP8_PER_CHANNEL_PER_TOKEN, MIXED_PRECISION); not verified here")
SGLANG_MODELOPT = ("sgl-project/sglang python/sglang/srt/layers/quantization/modelopt_quant.py "
                   "(ModelOptFp8Config: per-tensor FP8 with static input scale)")
SGLANG_MIXED = ("sgl-project/sglang PR adding ModelOptMixedPrecisionConfig (routed for NemotronH "
                "models); not verified for Qwen2.5-VL")

# quant_algo (whole model, or one layer of a MIXED_PRECISION model) -> engine -> (verdict, source)
SUPPORT: dict[str, dict[str, tuple[str, str]]] = {
    "FP8": {VLLM: ("yes", VLLM_MODELOPT), TRTLLM: ("yes", TRTLLM_DOCS),
            SGLANG: ("yes", SGLANG_MODELOPT)},
    "FP8_PER_CHANNEL_PER_TOKEN": {VLLM: ("yes", VLLM_DOCS), TRTLLM: ("yes", TRTLLM_DOCS),
                                  SGLANG: ("unverified", SGLANG_MODELOPT)},
    "MIXED_PRECISION": {VLLM: ("per layer", VLLM_MODELOPT), TRTLLM: ("yes", TRTLLM_DOCS),
                        SGLANG: ("unverified", SGLANG_MIXED)},
}
# Inside a MIXED_PRECISION model: which per-layer algorithms each engine maps to a kernel.
MIXED_LAYER_ALGOS = {VLLM: {"FP8", "NVFP4", "W4A16_NVFP4", "MXFP8"}}


def layer_algos(hf_quant: dict) -> dict[str, str]:
    """{layer: quant_algo} of the quantized layers in ModelOpt's hf_quant_config.json."""
    q = hf_quant.get("quantization", hf_quant)
    if q.get("quant_algo") == "MIXED_PRECISION":
        return {k: str(v.get("quant_algo")) for k, v in q.get("quantized_layers", {}).items()}
    return {}


def assess(hf_quant: dict) -> dict:
    """The engine table for this export, plus the layers each engine would not serve as FP8."""
    q = hf_quant.get("quantization", hf_quant)
    algo = str(q.get("quant_algo"))
    layers = layer_algos(hf_quant)
    out = {"quant_algo": algo, "layer_algos": sorted(set(layers.values())), "engines": {}}
    for engine in ENGINES:
        verdict, source = SUPPORT.get(algo, {}).get(engine, ("unknown", "no source"))
        unserved: dict[str, str] = {}
        if algo == "MIXED_PRECISION" and engine in MIXED_LAYER_ALGOS:
            unserved = {n: a for n, a in sorted(layers.items())
                        if a not in MIXED_LAYER_ALGOS[engine]}
            verdict = "partial" if unserved else "yes"
        out["engines"][engine] = {"verdict": verdict, "source": source,
                                  "layers_not_served_as_fp8": unserved}
    return out


def warn(table: dict) -> list[str]:
    """Log (and return) one warning per engine that cannot serve part or all of the export."""
    lines = []
    for engine, row in table["engines"].items():
        if row["layers_not_served_as_fp8"]:
            unserved = row["layers_not_served_as_fp8"]
            names = list(unserved)
            lines.append(f"{engine} cannot serve {len(names)} layer(s) of this export as FP8 "
                         f"({', '.join(sorted(set(unserved.values())))}): "
                         f"{', '.join(names[:6])}{' ...' if len(names) > 6 else ''}. Its ModelOpt "
                         "mixed-precision loader would leave them unquantized; serve with "
                         "TensorRT-LLM or export an FP8_DEFAULT_CFG-only scheme.")
        elif row["verdict"] in ("no", "unknown", "unverified"):
            lines.append(f"{engine}: serving a {table['quant_algo']} ModelOpt checkpoint is "
                         f"{row['verdict']} ({row['source']}); test it before relying on it")
    for line in lines:
        log.warning(line)
    return lines
