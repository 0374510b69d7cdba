"""The save stage: a scheme's files in its output dir, written atomically, and the Manifest
that describes them (`build_manifest`, from the rows `layer_rows` reads off the model), last.

Everything a result needs is on disk before MLflow is touched, so a tracking failure never costs
the result (report.py logs these files, now or later with --log-only).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..core import artifacts
from ..core.artifacts import LAYERS_FILE, LM_WEIGHTS_FILE, MANIFEST_FILE, QUANT_STATE_FILE, SCHEME_FILE
from ..core.timing import gpu_peak_gib, peak_rss_gib
from ..model import identity, quant_state
from ..plan import cost
from ..plan.calib_data import Data
from ..plan.families import Family
from ..plan.inputs import Inputs
from ..plan.placement import measured_peaks_gib
from ..plan.schemes import Scheme
from ..plan.validate import versions
from ..search.autoquant import SearchResult
from . import manifest
from .manifest import (
    BF16,
    FP8,
    Calibration,
    EffectiveBits,
    ExportInfo,
    LayerRecord,
    Manifest,
    Memory,
    ModelInfo,
    Quality,
    SearchInfo,
)


def save_files(
    model: nn.Module, scheme: Scheme, inputs: Inputs, rows: list[LayerRecord], out_dir: Path
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


def save_manifest(out_dir: Path, doc: Manifest) -> None:
    """Written last: its presence marks a finished run."""
    artifacts.write_json(out_dir / MANIFEST_FILE, doc.to_json())


def layer_rows(
    model: nn.Module, result: SearchResult, disabled: list[str], excluded: list[str]
) -> list[LayerRecord]:
    """One row per LM linear; the format is read from the model's enabled weight quantizer."""
    group_of = result.group_of()
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        wq = getattr(module, "weight_quantizer", None)
        fmt = FP8 if wq is not None and wq.is_enabled else BF16
        g = group_of.get(name)
        rows.append(
            LayerRecord(
                name=name,
                group=_group_label(list(g.module_names) if g else [name]),
                format=fmt,
                quant_config=None if fmt == BF16 or g is None else g.chosen,
                num_weights=module.weight.numel(),
                scores=dict(g.scores) if g else {},
                costs=dict(g.costs) if g else {},
                cost_counted=not cost.matches(name, excluded),
                disabled=cost.matches(name, disabled),
            )
        )
    return rows


def _group_label(names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    prefix = names[0].rsplit(".", 1)[0]
    leaves = [n.rsplit(".", 1)[1] for n in names]
    return f"{prefix}.{{{','.join(leaves)}}}"


@dataclass
class Solved:
    """One scheme solved on the searched model, as its manifest records it."""

    scheme: Scheme
    result: SearchResult
    rows: list[LayerRecord]
    quality: dict | None
    search_info: dict  # the search record's keys beyond the result's (scoring_group, fp8_kernel...)
    timings: dict[str, float]
    worker_peaks_gib: dict[str, float] | None = None  # the replicas' measured GPU peaks


def _model_info(model: nn.Module, inputs: Inputs) -> ModelInfo:
    ckpt, model_dir = inputs.checkpoint, inputs.options.model_dir
    return ModelInfo(
        directory=str(model_dir),
        model_type=ckpt.model_type,
        config_sha256=ckpt.config_sha256,
        weights_fingerprint=ckpt.weights_fingerprint,
        weights_sha256=identity.result(model_dir),
        vision_sha256=identity.vision_result(model_dir),
        parameters={
            "lm": sum(p.numel() for p in model.parameters() if p.dtype.is_floating_point),
            "lm_linear_weights": sum(inputs.numels.values()),
            "vision_tensors_skipped": len(ckpt.vision_keys()),
            "vision_bytes_skipped": ckpt.bytes_of(ckpt.vision_keys()),
        },
    )


def _calibration(inputs: Inputs, data: Data, scheme: Scheme) -> Calibration:
    return Calibration(
        file=str(inputs.calib_path),
        sha256=inputs.caption_file.sha256,
        crlf=inputs.caption_file.crlf,
        captions_used=data.used_captions(),
        captions_packed=data.calib.captions,
        batches=data.steps,
        tokens=data.used_tokens()[0],
        padding_fraction=data.used_padding_fraction(),
        truncated=data.calib.truncated,
        seq_len=scheme.seq_len,
        batch_size=scheme.batch_size,
        split=data.split.record,
    )


def _search(solved: Solved) -> SearchInfo:
    scheme, result = solved.scheme, solved.result
    return SearchInfo.model_validate(
        {
            "method": scheme.method,
            "formats": list(scheme.formats),
            "checkpoint": str(result.checkpoint),
            "checkpoint_sha256": artifacts.sha256_file(result.checkpoint),
            "calibration": "ran" if result.calibrated else "restored",
            "scores": "ran" if result.scored else "restored",
            "modelopt_effective_bits": result.achieved_bits,
            "predicted_loss": result.predicted_loss,
            **solved.search_info,
        }
    )


def build_manifest(
    model: nn.Module, solved: Solved, inputs: Inputs, family: Family, out_dir: Path, rel: dict[str, str]
) -> Manifest:
    """The scheme's manifest, from the solved model and the files `save_files` wrote (`rel`)."""
    scheme, summ = solved.scheme, manifest.summary(solved.rows, solved.scheme.excluded_from_cost)
    memory = {
        "peak_gpu_gib": gpu_peak_gib(),
        "peak_rss_gib": peak_rss_gib(),
        "measured_peak_gib_per_gpu": measured_peaks_gib(solved.worker_peaks_gib or {}),
        **(family.placement.record() if family.placement is not None else {}),
    }
    return Manifest(
        scheme=scheme,
        model=_model_info(model, inputs),
        calibration=_calibration(inputs, family.data, scheme),
        effective_bits=EffectiveBits(
            target=scheme.effective_bits,
            achieved=summ.effective_bits_searched,
            all_linears=summ.effective_bits_all_linears,
            excluded_from_cost=scheme.excluded_from_cost,
        ),
        search=_search(solved),
        layers=solved.rows,
        summary=summ,
        quality=None if solved.quality is None else Quality.model_validate(solved.quality),
        versions=versions(),
        timings=solved.timings,
        memory=Memory.model_validate(memory),
        artifacts=rel,
        artifacts_sha256={
            name: artifacts.sha256_file(out_dir / name)
            for name in rel.values()
            if name not in (MANIFEST_FILE, LM_WEIGHTS_FILE)
        },
        export=ExportInfo(fused_scales=scheme.fused_scales),
    )
