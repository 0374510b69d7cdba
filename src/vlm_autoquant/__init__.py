"""AutoQuantize the language model of Qwen2.5-VL to a per-layer FP8/BF16 mix (NVIDIA ModelOpt).

Stages, one module each: schemes (catalog), checkpoint (inspection), lm (LM-only loading),
calib_data (captions), cost (effective bits), autoquant (the ModelOpt call), manifest,
quant_state, quality, figures, tracking (MLflow), inputs (validation), pipeline (one scheme),
sweep (many schemes), resume, artifacts, interrupt, cli.
"""

__version__ = "0.1.0"
