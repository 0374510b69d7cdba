"""What the export logs to MLflow: its own run, linked both ways to the source run."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from .. import tracking
from .inputs import ExportInputs
from .staging import result_files

M_EXPORT_KL = "export/kl_mean"
M_EXPORT_TOP1 = "export/top1_agreement"
M_EXPORT_BYTES = "export/bytes"
M_EXPORT_PASSED = "export/checks_passed"
M_EXPORT_ENGINE_KL = "export/engine_kl_mean"  # serving-kernel arithmetic: reported, not checked


def metrics(report: dict) -> dict[str, float]:
    num = report["checks"]["numerics"]
    out = {M_EXPORT_KL: num["kl_mean"], M_EXPORT_TOP1: num["top1_agreement"],
           M_EXPORT_ENGINE_KL: (num.get("engine_arithmetic") or {}).get("kl_mean"),
           M_EXPORT_BYTES: report["bytes"],
           M_EXPORT_PASSED: float(sum(c["passed"] for c in report["checks"].values())),
           "memory/peak_gpu_gib": report["memory"]["peak_gpu_gib"],
           "memory/peak_rss_gib": report["memory"]["peak_rss_gib"]}
    out.update({f"time/{k}_s": v for k, v in report["timings"].items()})
    return out


def log_export(tracker: tracking.Tracker, inputs: ExportInputs, report: dict) -> dict:
    """Tags, metrics, report and file list; optionally the checkpoint and a registered model."""
    o = inputs.options
    scheme = report["scheme"]
    tags = {"scheme": scheme, "export.dir": str(o.output_dir), "export.lm_only": o.lm_only,
            "export.allow_other_weights": o.allow_other_weights,
            "model.weights_sha256": inputs.weights_sha256,
            "export.quant_algo": report["engines"]["quant_algo"]}
    if o.run_id:
        tags["source_run_id"] = o.run_id
    tracker.set_tags(tags)
    tracker.log_params({"export.model_dir": str(inputs.model_dir),
                        "export.source": o.run_id or str(o.artifacts_dir)})
    tracker.log_metrics(metrics(report))
    with tempfile.TemporaryDirectory() as tmp:
        for name, obj in (("export_report.json", report), ("export_files.json", report["files"])):
            (Path(tmp) / name).write_text(json.dumps(obj, indent=2, default=str))
            tracker.log_artifact(Path(tmp) / name)
    out: dict = {"run_id": tracker.run_id}
    if o.register:
        with result_files(o.output_dir) as files:
            out["registered"] = tracking.register_checkpoint(
                tracker, files, o.register, scheme,
                {"scheme": scheme, "source_run_id": o.run_id or ""})
    elif o.log_checkpoint:
        with result_files(o.output_dir) as files:
            tracking.log_dir(tracker, files, "checkpoint")
        out["checkpoint_artifacts"] = "checkpoint/"
    if o.run_id:
        tracking.tag_run(o.run_id, {"export.run_id": tracker.run_id,
                                    "export.dir": str(o.output_dir)})
    return out
