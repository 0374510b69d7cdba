"""One scheme, top to bottom: load, search, solve, evaluate, save, report.

    validate (cli) -> data (families.plan) -> load -> search -> solve -> evaluate -> save -> report

The sweep (sweep.py) runs the same `search_family` and `finish_scheme` for several schemes.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .. import tracking
from ..model import identity
from ..plan.families import Family
from ..plan.placement import LMPlacement
from ..search import autoquant, fp8_kernel, resume
from ..search.autoquant import Search
from ..search.spec import SearchCheckpoint
from . import quality, report, save
from .manifest import FP8, Manifest

if TYPE_CHECKING:
    from ..search.replicas import Replicas
from ..core.interrupt import StopFlag
from ..core.timing import Phases, batch_note, since_process_start
from ..model.lm import load_lm, pick_device
from ..plan.inputs import Inputs
from ..plan.memory_plan import Dims
from ..plan.schemes import Scheme

log = logging.getLogger("vlm_autoquant")


def load(inputs: Inputs, placement: LMPlacement | None, phases: Phases) -> nn.Module:
    """The LM alone, on one device or placed across the GPUs by the memory plan."""
    where = {}
    if placement is not None:
        log.info("memory plan and placement:\n%s", placement.summary(Dims.from_config(inputs.text_config)))
        where = {"device_map": placement.device_map, "max_memory": placement.max_memory}
    identity.start(inputs.options.model_dir)  # the LM weights' digest, hashed while they load
    identity.start(inputs.options.model_dir, vision=True)  # the vision tower's, recorded beside
    with phases("load", f"LM only, {len(inputs.checkpoint.vision_keys())} vision tensors unread"):
        return load_lm(inputs.options.model_dir, inputs.text_config, pick_device(), **where)


@contextlib.contextmanager
def searching_with(replicas: "Replicas | None", kernel: str) -> Iterator["Replicas | None"]:
    """The searches of this block on `replicas` (the CLI started them: `replicas.start_for`;
    None: this process searches alone), closed on exit, so evaluation, saving and tracking run
    in this process alone."""
    if replicas is None:
        yield None
        return
    replicas.fp8_kernel = kernel
    try:
        yield replicas
    finally:
        replicas.close(ok=replicas.failure is None)


def search_family(
    model: nn.Module,
    family: Family,
    stop: StopFlag | None,
    inputs: Inputs,
    phases: Phases,
    replicas: "Replicas | None" = None,
) -> Search:
    """Calibrate and score the family's union of formats on `model` (or restore both); with
    `replicas`, each searches its share of the batches and ModelOpt reduces the results."""
    device = next(model.parameters()).device
    batches = [
        {k: v.to(device, non_blocking=True) for k, v in b.items()}
        for b in family.data.calib.batches[: family.data.steps]
    ]
    checkpoint = SearchCheckpoint(
        family.checkpoint, lambda p, stage, src=None: resume.write_record(p, family.fingerprint, stage, src)
    )
    checkpointing = family.grad_checkpointing(inputs.options)
    args = (family.spec, batches, checkpoint, stop, checkpointing)
    found = replicas.search(model, *args) if replicas is not None else autoquant.search(model, *args)
    for key, ran in (("calibrate", found.calibrated), ("score", found.scored)):
        if ran:  # the line that ends autoquant's "<phase>: started"
            secs = found.timings.get(key, 0.0)
            phases.record(key, secs, batch_note(found.batch_seconds.get(key, []), secs))
        else:
            phases.add(key, found.timings.get(key, 0.0))
    phases.add("search_setup", found.timings.get("search_setup", 0.0))
    log.info(
        "search %s: calibration %s, scores %s, formats %s (%s)",
        family.key,
        "ran" if found.calibrated else "restored",
        "ran" if found.scored else "restored",
        "+".join(family.spec.formats),
        family.checkpoint,
    )
    return found


@dataclass
class Target:
    """Where one scheme's result goes: its output dir, its MLflow run, the clock of its phases,
    and the keys its manifest's search record adds (scoring_group, fp8_kernel...)."""

    out_dir: Path
    tracker: tracking.Tracker
    phases: Phases
    search_info: dict


def _evaluate(model: nn.Module, family: Family, phases: Phases) -> dict | None:
    if family.data.eval is None:
        return None
    with phases("evaluate", f"{len(family.data.eval.batches)} held-out batches"):
        qual = quality.evaluate(model, family.data.eval.batches, next(model.parameters()).device)
    log.info(
        "quality: KL %.4g, top-1 %.4f, ppl %.4g -> %.4g",
        qual["kl_mean"],
        qual["top1_agreement"],
        qual["ppl_ref"],
        qual["ppl_quant"],
    )
    return qual


def finish_scheme(
    model: nn.Module, found: Search, scheme: Scheme, family: Family, inputs: Inputs, target: Target
) -> Manifest:
    """Solve `scheme` on the searched model, evaluate, save to `target.out_dir`, then log it."""
    doc = settle_scheme(model, found, scheme, family, inputs, target)
    report_scheme(target, doc, family, inputs)
    return doc


def settle_scheme(
    model: nn.Module, found: Search, scheme: Scheme, family: Family, inputs: Inputs, target: Target
) -> Manifest:
    """Solve `scheme` on the searched model, evaluate, and save to `target.out_dir`: everything
    but the report (`report_scheme`), which needs nothing of the model."""
    phases, out_dir = target.phases, target.out_dir
    with phases("solve"):
        result = autoquant.solve(model, found, list(scheme.formats), scheme.effective_bits)
    rows = save.layer_rows(model, result, scheme.disabled_layers, scheme.excluded_from_cost)
    log.info(
        "%s: %d/%d LM linears FP8, %.3f effective bits (target %g)",
        scheme.name,
        sum(r.format == FP8 for r in rows),
        len(rows),
        result.achieved_bits,
        scheme.effective_bits,
    )
    qual = _evaluate(model, family, phases)
    with phases("save"):
        rel = save.save_files(model, scheme, inputs, rows, out_dir)
    timings = {**phases.seconds, "run": phases.total(), "process": since_process_start()}
    info = {"scoring_group": family.key, **target.search_info}
    solved = save.Solved(scheme, result, rows, qual, info, timings, found.worker_peaks_gib)
    doc = save.build_manifest(model, solved, inputs, family, out_dir, rel)
    save.save_manifest(out_dir, doc)
    return doc


def report_scheme(target: Target, doc: Manifest, family: Family, inputs: Inputs, detail: str = "") -> None:
    """The saved scheme's report on its MLflow run, and its time/log_s and time/total_s."""
    phases, tracker = target.phases, target.tracker
    with phases("log", detail):
        log_finished(tracker, doc, target.out_dir, family, inputs)
    tracker.log_metrics({"time/log_s": phases.seconds["log"], "time/total_s": phases.total()})


def log_finished(
    tracker: tracking.Tracker, doc: Manifest, out_dir: Path, family: Family, inputs: Inputs
) -> None:
    """The saved scheme's report, wherever the tracker lives (in a child process, report.py's
    imports happen there). A tracker process that died still leaves the --log-only command."""
    split = family.data.split
    try:
        tracker.log_with(report.log_finished, doc, out_dir, split.calib, split.eval, inputs.calib_path)
    except tracking.TrackerGone as exc:
        raise report.not_logged(exc, out_dir, tracker.experiment) from exc


def announce(inputs: Inputs, scheme: Scheme) -> None:
    """One line for the resolved scheme (the whole of it is written to scheme.yaml)."""
    s = scheme
    log.info(
        "scheme %s: %s, %s, %g bits, calib %dx%d x %d steps, score %d steps%s",
        s.name,
        s.method,
        "+".join(s.formats),
        s.effective_bits,
        s.batch_size,
        s.seq_len,
        s.num_calib_steps,
        s.num_score_steps,
        ", overrides " + " ".join(f"{k}={v}" for k, v in s.overrides.items()) if s.overrides else "",
    )
    log.info(
        "model %s, calibration %s, output %s",
        inputs.options.model_dir,
        inputs.calib_path,
        inputs.options.output_dir,
    )


def run_single(
    inputs: Inputs,
    family: Family,
    stop: StopFlag,
    experiment: str | None,
    phases: Phases,
    replicas: "Replicas | None" = None,
) -> Manifest:
    """The `main` entry point: one scheme into --output-dir, tracked as one MLflow run
    (`replicas`: the data-parallel replicas the CLI started where the placement has them)."""
    scheme, out_dir = family.schemes[0], inputs.options.output_dir
    announce(inputs, scheme)
    if family.reuse.stage:
        log.info(
            "resuming: %s search checkpoint %s matches these settings", family.reuse.stage, family.checkpoint
        )
    with tracking.tracked_run(
        experiment, scheme.name, system_metrics=torch.cuda.is_available(), out_dir=out_dir, separate=True
    ) as tracker:
        kernel = fp8_kernel.select_fp8_kernel(inputs.options.fp8_kernel)
        with searching_with(replicas, kernel):
            model = load(inputs, family.placement, phases)
            found = search_family(model, family, stop, inputs, phases, replicas)
        info = {"fp8_kernel": kernel, "resumed_from": family.reuse.stage}
        doc = finish_scheme(model, found, scheme, family, inputs, Target(out_dir, tracker, phases, info))
    log.info("done in %.1f s: %s", phases.total(), out_dir / "manifest.json")
    return doc
