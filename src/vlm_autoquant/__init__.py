"""AutoQuantize the language model of Qwen2.5-VL to a per-layer FP8/BF16 mix (NVIDIA ModelOpt).

The Python API (api.py): `quantize`, `sweep`, `export` and `restore`, each raising
`VlmAutoquantError` with the problems the CLI would print. The layers, bottom up: core, model,
search, plan, tracking, run, exporter, cli (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = [
    "ExportResult",
    "Result",
    "SweepResult",
    "VlmAutoquantError",
    "export",
    "quantize",
    "restore",
    "sweep",
]


def __getattr__(name: str) -> Any:
    """The API on first use: `import vlm_autoquant` stays cheap (no torch, no MLflow)."""
    if name == "VlmAutoquantError":
        from .core.errors import VlmAutoquantError  # cheap: kept lazy like the rest

        return VlmAutoquantError
    if name in __all__:
        from . import api  # the validation layers: imported on first use, not at package import

        return getattr(api, name)
    raise AttributeError(f"module 'vlm_autoquant' has no attribute {name!r}")
