"""Names other tools rely on: artifact files, metric keys, defaults. Defined once, here."""

from __future__ import annotations

from pathlib import Path

# The default catalog ships with the package: schemes.default_catalog().
# Relative to the current directory (the project root under `mlflow run`).
DEFAULT_CALIB_FILE = Path("datasets/vlm-quantize-calib/coco2017_captions.txt")

MANIFEST_SCHEMA_VERSION = 1

# Artifacts written into --output-dir (and logged to MLflow under the same names).
MANIFEST_FILE = "manifest.json"
QUANT_STATE_FILE = "quantized_state.pt"
LM_WEIGHTS_FILE = "lm_weights.safetensors"
SCHEME_FILE = "scheme.yaml"
LAYERS_FILE = "layers.csv"
SENSITIVITY_FIGURE = "sensitivity.png"
SEARCH_DIR = "search"
SEARCH_CHECKPOINT = "autoquant_search.pth"
SEARCH_RECORD = "autoquant_search.json"
COMPARISON_FILE = "comparison.csv"
PARETO_FIGURE = "pareto.png"

ARTIFACTS = {
    MANIFEST_FILE: "per-layer formats, scores and costs; versioned JSON",
    QUANT_STATE_FILE: "ModelOpt state + quantizer amax values (restore onto the original checkpoint)",
    SCHEME_FILE: "the resolved scheme, overrides applied",
    LAYERS_FILE: "one row per LM linear: name, group, format, scores, costs",
    SENSITIVITY_FIGURE: "(MLflow only, mlflow.log_figure) per-layer FP8 sensitivity by format",
}

# Metric keys (stable; listed in the README and in --help).
M_BITS_ACHIEVED = "effective_bits/achieved"
M_BITS_TARGET = "effective_bits/target"
M_BITS_ALL = "effective_bits/all_linears"
M_LAYERS_FP8 = "layers/fp8"
M_LAYERS_BF16 = "layers/bf16"
M_KL = "quality/kl_mean"
M_PPL_REF = "quality/ppl_ref"
M_PPL_QUANT = "quality/ppl_quant"
M_PPL_REL = "quality/ppl_rel_change"
M_TOP1 = "quality/top1_agreement"
M_WEIGHT_BYTES = "size/weight_bytes"
M_WEIGHT_BYTES_BF16 = "size/weight_bytes_bf16"
M_COMPRESSION = "size/compression_ratio"
M_PADDING = "data/padding_fraction"
M_CALIB_TOKENS = "data/calib_tokens"
M_PEAK_GPU = "memory/peak_gpu_gib"
M_PEAK_RSS = "memory/peak_rss_gib"
TIME_PREFIX = "time/"  # time/<phase>_s, one per phase
SENSITIVITY_PREFIX = "sensitivity/"  # sensitivity/<format>/<projection>, step = decoder layer index
FORMAT_PREFIX = "fp8/"  # fp8/<projection>: 1 if FP8 else 0, step = decoder layer index

METRICS = {
    M_BITS_ACHIEVED: "effective bits over the layers the search may quantize (cost-counted)",
    M_BITS_TARGET: "the effective-bits budget",
    M_BITS_ALL: "effective bits over all LM linears, lm_head included",
    M_LAYERS_FP8: "LM linear modules in FP8",
    M_LAYERS_BF16: "LM linear modules left in BF16",
    M_KL: "mean per-token KL(BF16 || quantized) on the held-out captions",
    M_PPL_REF: "perplexity of the BF16 LM on the held-out captions",
    M_PPL_QUANT: "perplexity of the quantized LM on the same tokens",
    M_PPL_REL: "ppl_quant / ppl_ref - 1",
    M_TOP1: "fraction of tokens whose top-1 next token matches BF16",
    M_WEIGHT_BYTES: "LM linear weight bytes after quantization (FP8 = 1 byte, BF16 = 2)",
    M_WEIGHT_BYTES_BF16: "LM linear weight bytes in BF16",
    M_COMPRESSION: "weight_bytes_bf16 / weight_bytes",
    M_PADDING: "padding tokens / all tokens in the calibration batches",
    M_CALIB_TOKENS: "real (non-padding) tokens in the calibration batches",
    M_PEAK_GPU: "peak CUDA memory allocated (GiB; 0 on CPU)",
    M_PEAK_RSS: "peak host resident memory (GiB)",
    TIME_PREFIX + "<phase>_s": "wall time per phase: load, data, calibrate, score, solve, evaluate, save, log",
    SENSITIVITY_PREFIX + "<format>/<projection>": "summed sensitivity score, step = decoder layer",
    FORMAT_PREFIX + "<projection>": "1 when that layer's projection is FP8, step = decoder layer",
}

ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}
DEFAULT_EXPERIMENT = "qwen2.5-vl-3b-autoquant-fp8"
