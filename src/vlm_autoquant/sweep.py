"""Score once, compare many: run several schemes on one model with one scoring pass per group.

Schemes that agree on every scoring setting (formats, method, calibration, score steps, disabled
and cost-excluded layers) form a group: the group's first scheme calibrates and scores into the
group's ModelOpt search checkpoint; every other scheme re-runs `mtq.auto_quantize` on a fresh copy
of the BF16 LM with that checkpoint, which restores the calibrated amax values and the scores and
only solves for its own budget. The single-scheme driver goes through the very same call, so a
scheme gets the same per-layer formats alone or in a sweep.

A group whose calibration settings match an already calibrated group (e.g. a `kl_div` scheme next
to a `gradient` one with the same formats and data) starts from that group's calibration: its
checkpoint is seeded with the calibrated quantizer states and no scores, so ModelOpt restores the
amax values instead of calibrating again, and only scores.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import artifacts, autoquant, figures, resume
from .constants import COMPARISON_FILE, PARETO_FIGURE, SEARCH_DIR
from .errors import Interrupted, Problems
from .inputs import Data, Inputs, build_data
from .phases import Phases
from .pipeline import (CALIBRATION_KEYS, announce, final_metrics, quantize_scheme,
                       scoring_fingerprint)
from .schemes import Scheme

log = logging.getLogger("vlm_autoquant")
SWEEP_MARKER = COMPARISON_FILE
COLUMNS = ("scheme", "method", "formats", "target_bits", "effective_bits", "all_linears_bits",
           "fp8_layers", "bf16_layers", "kl_mean", "ppl_ref", "ppl_quant", "ppl_rel_change",
           "top1_agreement", "weight_bytes", "compression_ratio", "scoring_group", "scores",
           "calibration")


@dataclass
class Group:
    key: str
    schemes: list[Scheme]
    data: Data
    fingerprint: dict
    checkpoint: Path
    reuse: resume.Reuse = field(default_factory=lambda: resume.Reuse(None))


def data_key(s: Scheme) -> tuple:
    return (s.num_calib_samples, s.num_eval_samples, s.seq_len, s.batch_size, s.seed)


def plan(inputs: Inputs, problems: Problems) -> list[Group]:
    """Group the schemes by scoring settings; build each distinct data split once."""
    datas: dict[tuple, Data] = {}
    groups: dict[str, Group] = {}
    for s in inputs.schemes:
        if data_key(s) not in datas:
            built = build_data(inputs.tokenizer, inputs.captions, s, problems)
            if built is None:
                return []
            datas[data_key(s)] = built
        data = datas[data_key(s)]
        fp = scoring_fingerprint(inputs, s, data)
        key = resume.fingerprint_hash(fp)[:12]
        if key not in groups:
            ckpt = inputs.options.output_dir / SEARCH_DIR / f"group-{key}.pth"
            groups[key] = Group(key, [], data, fp, ckpt)
        groups[key].schemes.append(s)
    for g in groups.values():  # refuse foreign or stale checkpoints before loading anything
        g.reuse = resume.check_reusable(g.checkpoint, g.fingerprint, inputs.options.overwrite)
    return list(groups.values())


def seed_calibration(source: Group, target: Group) -> bool:
    """Start `target`'s checkpoint from `source`'s calibrated quantizer states (no scores)."""
    src = resume.check_reusable(source.checkpoint, source.fingerprint, False)
    if src.stage is None:
        return False
    state = resume.load_verified(source.checkpoint)  # signed record, weights_only=True
    if not isinstance(state, dict) or not state.get("quantizer_states"):
        return False
    state["candidate_stats"] = {}
    state["method"] = target.schemes[0].method
    state["best"] = {"recipe": {}, "constraints": {}, "score": float("inf"), "is_satisfied": False}
    resume.save_with_record(target.checkpoint, target.fingerprint, "calibrated",
                            lambda tmp: torch.save(state, tmp))
    return True


def _calibration_match(a: Group, b: Group) -> bool:
    return all(a.fingerprint.get(k) == b.fingerprint.get(k) for k in CALIBRATION_KEYS)


def comparison_row(m: dict) -> dict:
    q = m.get("quality") or {}
    return {"scheme": m["scheme"]["name"], "method": m["scheme"]["method"],
            "formats": "+".join(m["scheme"]["formats"]),
            "target_bits": m["effective_bits"]["target"],
            "effective_bits": m["effective_bits"]["achieved"],
            "all_linears_bits": m["effective_bits"]["all_linears"],
            "fp8_layers": m["summary"]["fp8"], "bf16_layers": m["summary"]["bf16"],
            "kl_mean": q.get("kl_mean"), "ppl_ref": q.get("ppl_ref"),
            "ppl_quant": q.get("ppl_quant"), "ppl_rel_change": q.get("ppl_rel_change"),
            "top1_agreement": q.get("top1_agreement"),
            "weight_bytes": m["summary"]["weight_bytes"],
            "compression_ratio": m["summary"]["compression_ratio"],
            "scoring_group": m["search"]["scoring_group"], "scores": m["search"]["scores"],
            "calibration": m["search"]["calibration"]}


def run_sweep(inputs: Inputs, groups: list[Group], stop, tracker_factory) -> list[dict]:
    """Run every group; returns one comparison row per scheme (also written and logged)."""
    from .lm import load_lm, pick_device

    opts = inputs.options
    phases = Phases()
    log.info("sweep: %d schemes in %d scoring group(s): %s", len(inputs.schemes), len(groups),
             "; ".join(f"{g.key}: {', '.join(s.name for s in g.schemes)}" for g in groups))
    parent = tracker_factory("sweep", None)
    rows: list[dict] = []
    try:
        kernel = autoquant.select_fp8_kernel(opts.fp8_kernel)
        device = pick_device()
        with phases("load", "LM only, once for the whole sweep"):
            pristine, _ = load_lm(opts.model_dir, inputs.text_config, device)
        done: list[Group] = []
        for g in groups:
            seeded = None
            if g.reuse.stage is None:
                source = next((d for d in done if _calibration_match(d, g)), None)
                if source is not None and seed_calibration(source, g):
                    seeded = source.key
                    log.info("group %s: calibration reused from group %s (no recalibration)",
                             g.key, source.key)
            for i, scheme in enumerate(g.schemes):
                if stop is not None:
                    stop.raise_if_set()  # a signal between schemes: finished ones are kept
                announce(inputs, scheme)
                child = tracker_factory(scheme.name, parent)
                try:
                    model = copy.deepcopy(pristine)
                    scheme_phases = Phases()
                    doc = quantize_scheme(
                        model, scheme, inputs, g.data, opts.output_dir / scheme.name,
                        g.checkpoint, g.fingerprint, lambda: child, scheme_phases, device, stop,
                        {"fp8_kernel": kernel, "calibration_seeded_from": seeded,
                         "sweep_group_index": i})
                    if child is not None:
                        child.log_metrics(final_metrics(scheme_phases))
                        child.end("FINISHED")
                except BaseException as exc:
                    if child is not None:
                        status = "KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) \
                            else "FAILED"
                        child.end(status, f"{type(exc).__name__}: {exc}")
                    raise
                del model
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                for k, v in scheme_phases.seconds.items():
                    phases.add(k, v)
                rows.append(comparison_row(doc))
            done.append(g)
        ran = sum(r["scores"] == "ran" for r in rows)
        log.info("scoring ran %d time(s) for %d schemes in %d group(s)", ran, len(rows), len(groups))
        _write_comparison(rows, opts.output_dir, parent)
        if parent is not None:
            parent.log_metrics({**final_metrics(phases), "sweep/schemes": len(rows),
                                "sweep/scoring_groups": len(groups), "sweep/scoring_runs": ran})
            parent.end("FINISHED")
        return rows
    except BaseException as exc:
        if parent is not None:
            status = "KILLED" if isinstance(exc, (Interrupted, KeyboardInterrupt)) else "FAILED"
            parent.end(status, f"{type(exc).__name__}: {exc}")
        raise


def _write_comparison(rows: list[dict], out_dir: Path, parent) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    fig = figures.pareto([{"scheme": r["scheme"], "effective_bits": r["effective_bits"],
                           "kl_mean": r["kl_mean"], "ppl_rel_change": r["ppl_rel_change"]}
                          for r in rows])
    artifacts.write_text(out_dir / COMPARISON_FILE, buf.getvalue())  # last: marks a finished sweep
    if parent is not None:
        parent.log_table(rows, "comparison.json")
        parent.log_figure(fig, PARETO_FIGURE)
        parent.log_artifact(out_dir / COMPARISON_FILE)
