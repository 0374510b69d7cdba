"""The export, end to end: validate, restore, ModelOpt export, assemble, verify, publish, track.

Everything is written into a hidden staging directory beside --output-dir, which is renamed into
place only after every check passed; any failure or signal removes it, so --output-dir holds a
complete, verified checkpoint or is left as it was.
"""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..core import artifacts, bytecode, lean_imports
from ..core.errors import Interrupted, Problem, RunFailed, UsageError
from ..core.timing import Phases, gpu_peak_gib, human_bytes, peak_rss_gib
from ..model import quant_state
from ..model.lm import load_lm, pick_device, text_config
from ..search.fp8_kernel import run_arithmetic
from ..tracking import remember
from . import assemble as export
from . import ct as export_ct
from . import engine_load, engines, load_check
from . import track as export_track
from . import verify as export_verify
from .inputs import COMPRESSED_TENSORS, MODELOPT, ExportInputs, ExportOptions, checked
from .staging import BOOKKEEPING, STAGING_MARKER, mark_finished, staging_dir

if TYPE_CHECKING:
    from ..core.interrupt import StopFlag
    from ..tracking import Tracker

log = logging.getLogger("vlm_autoquant")
REPORT_FILE = artifacts.EXPORT_REPORT_FILE
BOTH = "both"
MODELOPT_DIR = "modelopt"  # --format both: ModelOpt's checkpoint beside compressed-tensors'

# Test hook: called with the staging directory just before it is renamed into place.
_before_publish = None


@dataclass
class Work:
    """What each format's export and checks share."""

    inputs: ExportInputs
    reference: nn.Module  # the restored run: ModelOpt's fake quant in the run's arithmetic
    device: torch.device
    run_kernel: str | None  # the manifest's search.fp8_kernel
    phases: Phases
    held_out: export_verify.HeldOut | None = None  # the first verify's, for the next format's


def verify(work: Work, out: Path, hf_quant: dict, fmt: str = MODELOPT) -> dict:
    """Checks (a)-(d) on the staged checkpoint, and its scales and FP8 codes against the run's.

    `fmt` compressed-tensors: `hf_quant` is its quantization_config; the names check, bf16
    scales and transformers' own from_pretrained (load_check) replace ModelOpt's specifics.
    The LM's shards are read once, onto the device, for the codes and both numerics models;
    the vision bytes are hashed in a thread meanwhile.
    """
    inputs, reference, device = work.inputs, work.reference, work.device
    lm_only, ct = inputs.options.lm_only, fmt == COMPRESSED_TENSORS
    declared = export_ct.declared(hf_quant, [r.name for r in inputs.manifest.layers]) if ct else hf_quant
    checks = {"formats": export_verify.check_formats(inputs.manifest, out, declared)}
    if ct:
        checks["names"] = export_ct.check_names(hf_quant, inputs.manifest.layers)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="vision-check") as pool:
        vision = None if lm_only else pool.submit(export_verify.check_vision, inputs.model_dir, out)
        checks["vision"] = {"passed": True, "skipped": "--lm-only"} if lm_only else None  # hashed below
        run = export_verify.RunScales(
            export_verify.quantizer_amax(reference, "input"),
            export_verify.quantizer_amax(reference, "weight"),
            work.run_kernel,
        )
        exported = export_verify.ExportedLM.read(out, device)
        checks["scales"] = _check_scales(reference, out if ct else exported, run, ct)
        checks["weights"] = export_verify.check_weight_codes(exported, reference)
        held = _held_out(work, out)
        checks["numerics"] = _numerics(work, exported, run, held)
        del exported  # transformers' load below reads its own copy
        if not (ct and inputs.options.format == BOTH):  # no other format compares with them
            held.reference_logits.clear()
        if vision is not None:
            checks["vision"] = vision.result()
    checks["loadability"] = (
        load_check.check(out, reference, inputs.manifest.layers, held.batches, device, lm_only)
        if ct
        else export_verify.check_loadable(out, lm_only)
    )
    return checks


def _held_out(work: Work, out: Path) -> export_verify.HeldOut:
    """The held-out batches, made once per export (the tokenizer is the staged export's)."""
    if work.held_out is None:
        work.held_out = export_verify.HeldOut(*export_verify.held_out_batches(work.inputs.manifest, out))
    return work.held_out


def _check_scales(
    reference: nn.Module, out: Path | export_verify.ExportedLM, run: export_verify.RunScales, ct: bool
) -> dict:
    """The stored scales are the run's amax / 448, and none is implausible."""
    amax, weight_amax = run.input_amax, run.weight_amax
    scales = (
        export_ct.check_scales(out, amax, weight_amax)
        if ct
        else export_verify.check_scales(out, amax, weight_amax)
    )
    implausible = export_verify.implausible_scales(reference)
    if implausible:
        scales["passed"] = False
        scales["errors"] = (implausible + scales["errors"])[:20]
    return scales


def _numerics(
    work: Work, exported: export_verify.ExportedLM, run: export_verify.RunScales, held: export_verify.HeldOut
) -> dict:
    """The exported files' logits against the run's model: in the run's fake-quant arithmetic
    (the check) and in a serving kernel's (`_engine_arithmetic`); the run's model runs once per
    batch for both (`held.reference_logits`)."""
    reference, device, batches = work.reference, work.device, held.batches
    cfg = text_config(work.inputs.model_dir)
    candidate = export_verify.dequantized_lm(exported, cfg, device, "modelopt", reference, run)
    numerics = {
        **export_verify.compare_logits(reference, candidate, batches, device, held.reference_logits),
        "arithmetic": "modelopt fake quant (x * 448/amax)",
        "captions": held.source,
    }
    if not numerics["passed"] and batches:  # say where it first differs
        numerics["first_divergence"] = export_verify.first_divergence(
            reference, candidate, batches[0], device
        )
    del candidate
    numerics["engine_arithmetic"] = _engine_arithmetic(work, exported, cfg, held)
    numerics["passed"] &= numerics["engine_arithmetic"]["passed"]
    return numerics


def _engine_arithmetic(
    work: Work, exported: export_verify.ExportedLM, cfg, held: export_verify.HeldOut
) -> dict:
    """The exported files in a serving kernel's arithmetic against the run's model, within
    export_verify.engine_kl_limit of it."""
    engine = export_verify.dequantized_lm(exported, cfg, work.device, "engine", reference=work.reference)
    served = export_verify.compare_logits(
        work.reference, engine, held.batches, work.device, held.reference_logits
    )
    del engine
    quality = work.inputs.manifest.quality
    run_kl = quality.kl_mean if quality is not None else None
    limit = export_verify.engine_kl_limit(run_kl)
    return {
        "passed": served["tokens"] > 0 and served["kl_mean"] <= limit,
        "kl_limit": limit,
        "kl_mean": served["kl_mean"],
        "top1_agreement": served["top1_agreement"],
        "arithmetic": "serving kernel (x * 1/input_scale)",
    }


def _restore(inputs: ExportInputs, device: torch.device):
    model = load_lm(inputs.model_dir, text_config(inputs.model_dir), device)
    return quant_state.apply(model, inputs.payload or inputs.state_file, inputs.manifest)


def _report(
    inputs: ExportInputs,
    checks: dict,
    table: dict,
    warnings: list[str],
    files: dict[str, int],
    phases: Phases,
) -> dict:
    o, m = inputs.options, inputs.manifest
    return {
        "passed": all(c["passed"] for c in checks.values()),
        "checks": checks,
        "scheme": m.scheme.name,
        "format": o.format,
        "source": {"run_id": o.run_id, "artifacts_dir": str(o.artifacts_dir or "") or None},
        "model_dir": str(inputs.model_dir),
        "lm_only": o.lm_only,
        "identity": {
            "recorded": inputs.recorded_sha256,
            "model_dir": inputs.weights_sha256,
            "match": inputs.recorded_sha256 == inputs.weights_sha256,
            "allow_other_weights": o.allow_other_weights,
        },
        "engines": table,
        "warnings": warnings,
        "files": files,
        "bytes": sum(files.values()),
        "timings": dict(phases.seconds),
        "memory": {"peak_gpu_gib": gpu_peak_gib(), "peak_rss_gib": peak_rss_gib()},
    }


def _publish(staging: Path, out: Path) -> None:
    """Rename the staged checkpoint into place (an old one, with --overwrite, goes after).

    `out` is the real directory (symlinks resolved by the caller), so a symlinked --output-dir
    keeps its link and the checkpoint is written where it points."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [staging, *staging.rglob("*")]:  # mkdtemp and ModelOpt leave some at 0600/0700
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    if _before_publish is not None:
        _before_publish(staging)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.partial-old-{os.getpid()}")
        (out / STAGING_MARKER).write_text("{}\n")  # a kill before the rmtree: swept next time
        os.replace(out, old)
    os.replace(staging, out)
    (out / STAGING_MARKER).unlink(missing_ok=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _modelopt(work: Work, model: nn.Module, out: Path) -> tuple[dict, dict]:
    """ModelOpt's format in `out`: (checks, hf_quant_config)."""
    o, phases = work.inputs.options, work.phases
    with phases("modelopt_export", "export_hf_checkpoint"):
        mo_dir = export.run_modelopt_export(model, out, work.run_kernel)
    with phases("assemble", "vision bytes copied, shards indexed"):
        hf_quant = export.write_configs(work.inputs.model_dir, mo_dir, out, o.lm_only)
        export.assemble(work.inputs.model_dir, mo_dir, out, o.lm_only)
        shutil.rmtree(mo_dir)
    with phases("verify", "formats, vision bytes, scales, codes, numerics, loadability"):
        return verify(work, out, hf_quant), hf_quant


def _compressed_tensors(work: Work, out: Path) -> tuple[dict, dict]:
    """compressed-tensors' format in `out`: (checks, quantization_config)."""
    with work.phases("ct_export", "compressed-tensors config and compressor, vision bytes"):
        qcfg = export_ct.write_checkpoint(
            work.reference,
            work.inputs.manifest.layers,
            work.inputs.model_dir,
            out,
            work.inputs.options.lm_only,
        )
    with work.phases("ct_verify", "formats, names, vision, scales, codes, numerics, load"):
        return verify(work, out, qcfg, COMPRESSED_TENSORS), qcfg


def _write_formats(work: Work, model: nn.Module, staging: Path) -> tuple[dict, dict]:
    """Each chosen format written and checked in `staging`: (checks, engine table per format)."""
    fmt = work.inputs.options.format
    checks, tables = {}, {}
    if fmt in (COMPRESSED_TENSORS, BOTH):
        checks, qcfg = _compressed_tensors(work, staging)
        tables[COMPRESSED_TENSORS] = engines.assess_ct(qcfg)
    if fmt in (MODELOPT, BOTH):  # both: a signal during the first format raised at its end (Phases.between)
        target = staging / MODELOPT_DIR if fmt == BOTH else staging
        target.mkdir(exist_ok=True)
        mo_checks, hf_quant = _modelopt(work, model, target)
        prefix = "modelopt." if fmt == BOTH else ""
        checks.update({prefix + k: v for k, v in mo_checks.items()})
        tables[MODELOPT] = engines.assess(hf_quant)
    return checks, tables


def _warnings(inputs: ExportInputs, tables: dict) -> list[str]:
    """Engine failures, fused-scale notes, missing base files and --lm-only, in that order."""
    missing = [f for f in export.REQUIRED_BASE_FILES if not (inputs.model_dir / f).is_file()]
    warnings = [w for t in tables.values() for w in engines.warn(t)]
    fused = engine_load.fused_scales_warning(inputs.manifest)
    if fused:
        log.warning(fused)
        warnings.append(fused)
    warnings += [f"{inputs.model_dir} has no {f}: the export lacks it too" for f in missing]
    if inputs.options.lm_only:
        warnings.append("--lm-only: no vision tower; the export is a text-only Qwen2ForCausalLM")
    return warnings


def build_checkpoint(inputs: ExportInputs, staging: Path, phases: Phases) -> dict:
    """Restore, export in the chosen format(s), assemble and verify in `staging`; the report.

    With --format both, compressed-tensors fills `staging` and ModelOpt's format goes to
    `staging/modelopt/` (MODELOPT_DIR); its checks are reported as `modelopt.<check>`.
    ModelOpt's FP8 fake quant runs throughout in the arithmetic of the kernel the run used
    (`fp8_kernel.run_arithmetic`; never a JIT build of its CUDA extension here), so the
    reference is the model the run evaluated and the export holds its codes. The restored model
    is held once for compressed-tensors alone, twice when ModelOpt's exporter runs.
    """
    o, device = inputs.options, pick_device()
    run_kernel = inputs.manifest.search.fp8_kernel
    with run_arithmetic(run_kernel) as arithmetic:
        log.info("FP8 fake quant: the run used %s; here: %s", run_kernel or "eager", arithmetic)
        with phases("restore", f"LM of {inputs.model_dir} + {inputs.state_file.name}"):
            model = _restore(inputs, device)
        # ModelOpt's export may re-tune the quantizers it exports: its checks compare with a copy.
        # compressed-tensors' writer and every check only read the model: no copy.
        reference = copy.deepcopy(model) if o.format in (MODELOPT, BOTH) else model
        work = Work(inputs, reference, device, run_kernel, phases)
        checks, tables = _write_formats(work, model, staging)
        del model
        checks["numerics"]["fp8_arithmetic"] = {"run": run_kernel, "here": arithmetic}
    table = tables[MODELOPT] if o.format == MODELOPT else tables[COMPRESSED_TENSORS]
    if o.format == BOTH:
        table = {**table, "modelopt": tables[MODELOPT]}
    files = {k: v for k, v in export.file_list(staging).items() if k not in BOOKKEEPING}
    return _report(inputs, checks, table, _warnings(inputs, tables), files, phases)


def _failed(report: dict) -> str:
    bad = {
        k: {x: y for x, y in c.items() if x != "passed"}
        for k, c in report["checks"].items()
        if not c["passed"]
    }
    return json.dumps(bad, default=str)[:2000]


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return True
    text = str(exc)
    return any(
        m in text
        for m in (
            "No space left on device",
            "os error 28",
            "File too large",
            "os error 27",
            "Disk quota exceeded",
            "os error 122",
        )
    )


def export_checkpoint(inputs: ExportInputs, staging: Path, phases: Phases) -> dict:
    """Build in `staging` (beside the real --output-dir); publish only a fully verified result."""
    out = Path(os.path.realpath(inputs.options.output_dir))
    try:
        report = build_checkpoint(inputs, staging, phases)
        if not report["passed"]:
            raise RunFailed(
                f"the export failed its checks; nothing was written to "
                f"{inputs.options.output_dir}. Failed: {_failed(report)}"
            )
        artifacts.write_json(staging / REPORT_FILE, report)
        mark_finished(staging, out)
        _publish(staging, out)
    except Exception as exc:  # safetensors reports a full disk as its own error type
        if _disk_full(exc):
            raise UsageError(
                Problem(
                    "--output-dir",
                    f"the disk filled up while writing the export ({exc}); nothing was left behind",
                    "free disk space or choose another --output-dir",
                )
            ) from exc
        raise
    log.info(
        "export written: %s (%s, %d files)",
        inputs.options.output_dir,
        human_bytes(report["bytes"]),
        len(report["files"]),
    )
    return report


def export_run(options: ExportOptions, tracker_factory=None, stop=None) -> dict:
    """Export a quantization run into a verified Qwen2.5-VL checkpoint; return the report.

    Args:
        options: the run (run_id or artifacts_dir), model_dir, output_dir and flags.
        tracker_factory: `(name, output dir) -> tracking.Tracker` for the export's own MLflow
            run (recorded in the output dir, so a killed export's run is closed by the next
            one), or None.
        stop: an interrupt.StopFlag checked between phases, or None.
    Raises UsageError (exit 2) for bad input, RunFailed (exit 1) when a check fails.
    The output dir is locked for the whole export (a second export into it is refused).
    """
    lean_imports.install()
    with checked(options) as (inputs, phases):
        return export_gathered(inputs, phases, tracker_factory, stop)


def export_gathered(
    inputs: ExportInputs, phases: Phases, tracker_factory=None, stop: StopFlag | None = None
) -> dict:
    """`export_run` once `exporter.inputs.checked` has checked the inputs (the artifacts it
    fetched must still be on disk)."""
    bytecode.warn_if_compiled_from_source(log)
    options = inputs.options
    if stop is not None:  # a signal stops the export at the next phase boundary
        phases.between = stop.raise_if_set
    target = Path(os.path.realpath(options.output_dir))  # a symlink is written through
    with (
        artifacts.locked_output_dir(target, REPORT_FILE, options.overwrite),
        staging_dir(target) as staging,
    ):
        tracker = (
            tracker_factory(f"export-{inputs.manifest.scheme.name}", target) if tracker_factory else None
        )
        return _export_tracked(inputs, staging, phases, tracker)


def _export_tracked(inputs: ExportInputs, staging: Path, phases: Phases, tracker: Tracker | None) -> dict:
    """The export inside its lock, its MLflow run ended on every path out."""
    try:
        report = export_checkpoint(inputs, staging, phases)
        if tracker is not None:
            remember(Path(os.path.realpath(inputs.options.output_dir)), tracker.wait().run_id)
            report["mlflow"] = export_track.log_export(tracker, inputs, report)
            artifacts.write_json(inputs.options.output_dir / REPORT_FILE, report)
            tracker.end("FINISHED")
    except BaseException as exc:
        if tracker is not None:
            killed = isinstance(exc, (Interrupted, KeyboardInterrupt))
            try:
                tracker.end("KILLED" if killed else "FAILED", f"{type(exc).__name__}: {exc}")
            except Exception as end_exc:  # noqa: BLE001 - the original error matters more
                log.warning("could not end the export's MLflow run: %s", end_exc)
        raise
    return report
