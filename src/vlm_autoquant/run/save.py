"""The save stage: a scheme's files in its output dir, written atomically, manifest last.

Everything a result needs is on disk before MLflow is touched, so a tracking failure never costs
the result (report.py logs these files, now or later with --log-only).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..core import artifacts
from ..core.artifacts import LAYERS_FILE, LM_WEIGHTS_FILE, MANIFEST_FILE, QUANT_STATE_FILE, SCHEME_FILE
from ..core.timing import gpu_peak_gib, peak_rss_gib
from ..model import identity, quant_state
from ..plan.calib_data import Data
from ..plan.inputs import Inputs
from ..plan.placement import LMPlacement, measured_peaks_gib
from ..plan.schemes import Scheme
from ..plan.validate import versions
from ..search.autoquant import SearchResult
from . import manifest
from .manifest import LayerRow


def save_files(
    model: nn.Module, scheme: Scheme, inputs: Inputs, rows: list[LayerRow], out_dir: Path
) -> dict[str, str]:
    """Write the quantized state, the scheme and the per-layer CSV; return the artifact names."""
    rel = {name: name for name in (MANIFEST_FILE, QUANT_STATE_FILE, SCHEME_FILE, LAYERS_FILE)}
    quant_state.save(
        model,
        out_dir / QUANT_STATE_FILE,
        extra={
            "scheme": scheme.name,
            "model_config_sha256": inputs.checkpoint.config_sha256,
            "weights_sha256": identity.result(inputs.options.model_dir),
        },
    )
    if inputs.options.save_weights:
        quant_state.save_weights(model, out_dir / LM_WEIGHTS_FILE)
        rel[LM_WEIGHTS_FILE] = LM_WEIGHTS_FILE
    artifacts.write_text(out_dir / SCHEME_FILE, scheme.to_yaml())
    artifacts.write_text(out_dir / LAYERS_FILE, manifest.layers_csv(rows))
    return rel


def save_manifest(out_dir: Path, doc: dict) -> None:
    """Written last: its presence marks a finished run."""
    artifacts.write_json(out_dir / MANIFEST_FILE, doc)


def build_manifest(
    model: nn.Module,
    scheme: Scheme,
    inputs: Inputs,
    data: Data,
    result: SearchResult,
    rows: list[LayerRow],
    quality: dict | None,
    search_info: dict,
    timings: dict,
    rel: dict,
    out_dir: Path,
    placement: LMPlacement | None = None,
    worker_peaks_gib: dict[str, float] | None = None,
) -> dict:
    excluded = scheme.excluded_from_cost
    summ = manifest.summary(rows, excluded)
    ckpt = inputs.checkpoint
    search = {
        "method": scheme.method,
        "formats": list(scheme.formats),
        "checkpoint": str(result.checkpoint),
        "checkpoint_sha256": artifacts.sha256_file(result.checkpoint),
        "calibration": "ran" if result.calibrated else "restored",
        "scores": "ran" if result.scored else "restored",
        "modelopt_effective_bits": result.achieved_bits,
        "predicted_loss": result.predicted_loss,
        **search_info,
    }
    return manifest.build(
        scheme=scheme.model_dump(),
        model={
            "directory": str(inputs.options.model_dir),
            "model_type": ckpt.model_type,
            "config_sha256": ckpt.config_sha256,
            "weights_fingerprint": ckpt.weights_fingerprint,
            "weights_sha256": identity.result(inputs.options.model_dir),
            "vision_sha256": identity.vision_result(inputs.options.model_dir),
            "parameters": {
                "lm": sum(p.numel() for p in model.parameters() if p.dtype.is_floating_point),
                "lm_linear_weights": sum(inputs.numels.values()),
                "vision_tensors_skipped": len(ckpt.vision_keys()),
                "vision_bytes_skipped": ckpt.bytes_of(ckpt.vision_keys()),
            },
        },
        calibration={
            "file": str(inputs.calib_path),
            "sha256": inputs.caption_file.sha256,
            "crlf": inputs.caption_file.crlf,
            "captions_used": data.used_captions(),
            "captions_packed": data.calib.captions,
            "batches": data.steps,
            "tokens": data.used_tokens()[0],
            "padding_fraction": data.used_padding_fraction(),
            "truncated": data.calib.truncated,
            "seq_len": scheme.seq_len,
            "batch_size": scheme.batch_size,
            "split": data.split.record,
        },
        effective_bits={
            "target": scheme.effective_bits,
            "achieved": summ["effective_bits_searched"],
            "all_linears": summ["effective_bits_all_linears"],
            "excluded_from_cost": excluded,
        },
        search=search,
        rows=rows,
        summary=summ,
        quality=quality,
        versions=versions(),
        timings=timings,
        memory={
            "peak_gpu_gib": gpu_peak_gib(),
            "peak_rss_gib": peak_rss_gib(),
            "measured_peak_gib_per_gpu": measured_peaks_gib(worker_peaks_gib or {}),
            **(placement.record() if placement is not None else {}),
        },
        artifacts=rel,
        artifacts_sha256={
            name: artifacts.sha256_file(out_dir / name)
            for name in rel.values()
            if name not in (MANIFEST_FILE, LM_WEIGHTS_FILE)
        },
        export={"fused_scales": scheme.fused_scales},
    )  # how an engine's fused layers are scaled
