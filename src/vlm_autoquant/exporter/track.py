"""What the export logs to MLflow: its own run, linked both ways to the source run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .. import tracking
from ..run.manifest import Manifest
from .inputs import ExportInputs
from .staging import result_files

M_EXPORT_KL = "export/kl_mean"
M_EXPORT_TOP1 = "export/top1_agreement"
M_EXPORT_BYTES = "export/bytes"
M_EXPORT_PASSED = "export/checks_passed"
M_EXPORT_ENGINE_KL = "export/engine_kl_mean"  # serving-kernel arithmetic: reported, not checked


def metrics(report: dict) -> dict[str, float]:
    num = report["checks"]["numerics"]
    out = {
        M_EXPORT_KL: num["kl_mean"],
        M_EXPORT_TOP1: num["top1_agreement"],
        M_EXPORT_ENGINE_KL: (num.get("engine_arithmetic") or {}).get("kl_mean"),
        M_EXPORT_BYTES: report["bytes"],
        M_EXPORT_PASSED: float(sum(c["passed"] for c in report["checks"].values())),
        "memory/peak_gpu_gib": report["memory"]["peak_gpu_gib"],
        "memory/peak_rss_gib": report["memory"]["peak_rss_gib"],
    }
    out.update({f"time/{k}_s": v for k, v in report["timings"].items()})
    return out


def source_run_id(inputs: ExportInputs) -> str | None:
    """The quantization run the export comes from: --run-id, or the run that wrote
    --artifacts-dir (the directory's run-id record)."""
    o = inputs.options
    if o.run_id:
        return o.run_id
    recorded = None
    if o.artifacts_dir is not None:
        recorded = (tracking.recorded_run(Path(o.artifacts_dir)) or (None,))[0]
    return recorded if recorded and tracking.source_run(recorded) is not None else None


def quality_metrics(manifest: Manifest) -> dict[str, float]:
    """The source run's quality metrics, under the names it logged them with."""
    q = manifest.quality.model_dump() if manifest.quality is not None else {}
    names = {
        "kl_mean": tracking.M_KL,
        "top1_agreement": tracking.M_TOP1,
        "ppl_rel_change": tracking.M_PPL_REL,
        "ppl_ref": tracking.M_PPL_REF,
        "ppl_quant": tracking.M_PPL_QUANT,
    }
    return {m: q[k] for k, m in names.items() if q.get(k) is not None}


def log_export(tracker: tracking.Tracker, inputs: ExportInputs, report: dict) -> dict:
    """Tags, metrics, report and file list; optionally the checkpoint and a registered model.

    `source_run_id` means one thing everywhere: the quantization run the checkpoint comes from
    (the export run's tag, the registered version's tag and the LoggedModel's source run).
    """
    o = inputs.options
    source = source_run_id(inputs)
    tracker.set_tags(_tags(inputs, report, source))
    tracker.log_params(
        {"export.model_dir": str(inputs.model_dir), "export.source": o.run_id or str(o.artifacts_dir)}
    )
    tracker.log_metrics(metrics(report))
    with tempfile.TemporaryDirectory() as tmp:
        for name, obj in (("export_report.json", report), ("export_files.json", report["files"])):
            (Path(tmp) / name).write_text(json.dumps(obj, indent=2, default=str))
            tracker.log_artifact(Path(tmp) / name)
    out: dict = {"run_id": tracker.run_id}
    if o.register:
        reg = _registration(tracker, inputs, report, source)
        with result_files(o.output_dir) as files:
            out["registered"] = tracking.register_checkpoint(tracker, files, reg)
    elif o.log_checkpoint:
        with result_files(o.output_dir) as files:
            tracking.log_dir(tracker, files, "checkpoint")
        out["checkpoint_artifacts"] = "checkpoint/"
    if source:
        tracking.tag_run(source, {"export.run_id": tracker.run_id, "export.dir": str(o.output_dir)})
    return out


def _tags(inputs: ExportInputs, report: dict, source: str | None) -> dict:
    """The export run's tags."""
    o = inputs.options
    tags = {
        "scheme": report["scheme"],
        "export.dir": str(o.output_dir),
        "export.lm_only": o.lm_only,
        "export.allow_other_weights": o.allow_other_weights,
        "model.weights_sha256": inputs.weights_sha256,
        "export.format": report["format"],
        "export.kind": report["engines"]["kind"],
    }
    if source:
        tags["source_run_id"] = source
    return tags


def _registration(
    tracker: tracking.Tracker, inputs: ExportInputs, report: dict, source: str | None
) -> tracking.Registration:
    """The registered model version: --register's name, the scheme as alias, its tags."""
    scheme = report["scheme"]
    return tracking.Registration(
        inputs.options.register,
        scheme,
        {
            "scheme": scheme,
            "source_run_id": source or "",
            "export_run_id": tracker.run_id,
            "format": report["format"],
        },
        source,
        quality_metrics(inputs.manifest),
        pyfunc=report["format"] != "modelopt",
    )
