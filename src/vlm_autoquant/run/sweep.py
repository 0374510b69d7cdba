"""Score once, compare many: several schemes on one model, one search per family.

Each family (families.py) is searched once over the union of its members' formats; every member
is then solved, evaluated and saved (`settle_scheme`) and logged as a child run
(`report_scheme`), as a single run is; beside a free core the reports are logged while the next
member works (reports.py). A scheme that fails is marked FAILED in its child run with the
reason, and the sweep goes on; the comparison lists it, and the process exits non-zero at the
end naming it. A signal still stops the whole sweep at once; the finished schemes' reports are
logged first.
"""

from __future__ import annotations

import csv
import io
import logging
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .. import tracking
from ..core import artifacts
from ..core.artifacts import COMPARISON_FILE, PARETO_FIGURE
from ..core.errors import Interrupted, RunFailed
from ..core.interrupt import StopFlag
from ..core.timing import Phases
from ..model.weights import sharing_weights
from ..plan.families import Family, calibration_source
from ..plan.inputs import Inputs
from ..plan.schemes import Scheme
from ..search import autoquant, fp8_kernel
from ..search.autoquant import Search
from ..tracking import M_SPEARMAN
from . import figures
from .manifest import Manifest
from .pipeline import Target, announce, load, report_scheme, search_family, searching_with, settle_scheme
from .reports import Reports

if TYPE_CHECKING:
    from ..search.replicas import Replicas

log = logging.getLogger("vlm_autoquant")
COLUMNS = (
    "scheme",
    "status",
    "method",
    "formats",
    "target_bits",
    "effective_bits",
    "all_linears_bits",
    "fp8_layers",
    "bf16_layers",
    "predicted_loss",
    "kl_mean",
    "ppl_ref",
    "ppl_quant",
    "ppl_rel_change",
    "top1_agreement",
    "weight_bytes",
    "compression_ratio",
    "scoring_group",
    "scores",
    "calibration",
    "error",
)


def comparison_row(m: Manifest) -> dict:
    """A finished scheme's row of comparison.csv, read from its manifest."""
    q = m.quality
    return {
        "scheme": m.scheme.name,
        "status": "FINISHED",
        "method": m.scheme.method,
        "formats": "+".join(m.scheme.formats),
        "target_bits": m.effective_bits.target,
        "effective_bits": m.effective_bits.achieved,
        "all_linears_bits": m.effective_bits.all_linears,
        "fp8_layers": m.summary.fp8,
        "bf16_layers": m.summary.bf16,
        "predicted_loss": m.search.predicted_loss,
        **{
            k: getattr(q, k) if q is not None else None
            for k in ("kl_mean", "ppl_ref", "ppl_quant", "ppl_rel_change", "top1_agreement")
        },
        "weight_bytes": m.summary.weight_bytes,
        "compression_ratio": m.summary.compression_ratio,
        "scoring_group": m.search.scoring_group,
        "scores": m.search.scores,
        "calibration": m.search.calibration,
        "error": "",
    }


def failed_row(scheme: Scheme, family: Family, exc: BaseException) -> dict:
    return {
        **dict.fromkeys(COLUMNS, None),
        "scheme": scheme.name,
        "status": "FAILED",
        "method": scheme.method,
        "formats": "+".join(scheme.formats),
        "target_bits": scheme.effective_bits,
        "scoring_group": family.key,
        "error": f"{type(exc).__name__}: {exc}",
    }


@dataclass
class SweepRun:
    """What every family of one sweep shares: its inputs, stop flag, phase clock, MLflow
    parent run and experiment, and the thread its schemes' reports are logged in."""

    inputs: Inputs
    stop: StopFlag
    phases: Phases
    parent: tracking.Tracker
    experiment: str | None
    reports: Reports


@dataclass
class ChildRun:
    """A member's child run, entered: `stack` ends it (FINISHED, KILLED or FAILED)."""

    scheme: Scheme
    stack: ExitStack
    tracker: tracking.Tracker


def run_family(
    model: nn.Module, family: Family, run: SweepRun, info: dict, replicas: "Replicas | None" = None
) -> list[dict]:
    """Open every member's child run (beside a free core, their MLflow processes start while the
    family searches), search the family once, then finish each member; failures are rows, not
    raises. On an interrupt, the runs not yet handed to their scheme end KILLED."""
    children: list[ChildRun | None] = []
    try:
        for scheme in family.schemes:
            stack = ExitStack()
            children.append(ChildRun(scheme, stack, stack.enter_context(_child_run(run, scheme))))
        try:
            found: Search | Exception = search_family(
                model, family, run.stop, run.inputs, run.phases, replicas
            )
        except (Interrupted, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001 - every member fails with the reason
            found = exc
        rows = []
        for i, child in enumerate(children):
            run.stop.raise_if_set()  # a signal between schemes: the finished ones are kept
            children[i] = None  # from here ended by `_member_row`, or by its report
            shared = {"scores": "shared", "calibration": "shared"} if i else {}
            rows.append(
                _member_row(model, found, family, run, {**info, "sweep_group_index": i, **shared}, child)
            )
        return rows
    except BaseException as exc:
        for child in children:
            if child is not None:
                child.stack.__exit__(type(exc), exc, exc.__traceback__)
        raise


def _member_row(
    model: nn.Module, found: Search | Exception, family: Family, run: SweepRun, info: dict, child: ChildRun
) -> dict:
    """A member's comparison row: finished (`_finish_member`), or failed with the reason
    (`found`: the search's exception when the search failed)."""
    scheme = child.scheme
    announce(run.inputs, scheme)
    try:
        if isinstance(found, Exception):
            with child.stack:
                raise found
        return comparison_row(_finish_member(model, found, family, run, info, child))
    except (Interrupted, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - the sweep goes on; the row says why
        log.error("%s FAILED: %s: %s", scheme.name, type(exc).__name__, exc)
        return failed_row(scheme, family, exc)


def _child_run(run: SweepRun, scheme: Scheme) -> AbstractContextManager[tracking.Tracker]:
    out_dir = run.inputs.options.output_dir / scheme.name
    return tracking.tracked_run(run.experiment, scheme.name, run.parent, out_dir=out_dir)


def _finish_member(
    model: nn.Module, found: Search, family: Family, run: SweepRun, info: dict, child: ChildRun
) -> Manifest:
    """One member solved and saved in its child run, with its own phase clock (added to the
    sweep's); its report is handed to `run.reports`, which ends the child run."""
    scheme = child.scheme
    with child.stack:  # FAILED with the reason if this raises
        own = Phases()
        target = Target(run.inputs.options.output_dir / scheme.name, child.tracker, own, info)
        doc = settle_scheme(model, found, scheme, family, run.inputs, target)
        for key, seconds in own.seconds.items():
            run.phases.add(key, seconds)
        handed = child.stack.pop_all()
    run.reports.submit((scheme, family), _report_member, handed, target, doc, family, run)
    return doc


def _report_member(
    child_run: ExitStack, target: Target, doc: Manifest, family: Family, run: SweepRun
) -> None:
    """The member's report (in the reports' thread where they go beside the next member), then
    its child run ended (FINISHED, or FAILED with the reason). A report made in turn counts in
    the sweep's `log` phase; one made beside, only the time the sweep waits for it at the end."""
    with child_run:
        report_scheme(target, doc, family, run.inputs, f"{doc.scheme.name}'s report")
    if not run.reports.beside:
        run.phases.add("log", target.phases.seconds["log"])


def _with_failed_reports(rows: list[dict], reports: Reports) -> list[dict]:
    """`rows` with each scheme whose report failed marked FAILED with the reason."""
    failed = {}
    for (scheme, family), exc in reports.failed():
        log.error("%s FAILED: %s: %s", scheme.name, type(exc).__name__, exc)
        failed[scheme.name] = failed_row(scheme, family, exc)
    return [failed.get(r["scheme"], r) for r in rows]


def run_sweep(
    inputs: Inputs,
    families: list[Family],
    stop: StopFlag,
    experiment: str | None,
    replicas: "Replicas | None" = None,
) -> list[dict]:
    """Run every family; write and log the comparison; raise RunFailed naming failed schemes.
    `replicas`: the data-parallel replicas the CLI started where the placement has them."""
    opts = inputs.options
    log.info(
        "sweep: %d schemes in %d search(es): %s",
        len(inputs.schemes),
        len(families),
        "; ".join(
            f"{f.key} [{'+'.join(f.spec.formats)}]: {', '.join(s.name for s in f.schemes)}" for f in families
        ),
    )
    with tracking.tracked_run(
        experiment, "sweep", system_metrics=torch.cuda.is_available(), out_dir=opts.output_dir
    ) as parent:
        parent.log_params(
            {
                "model_dir": str(opts.model_dir),
                "calib_file": str(inputs.calib_path),
                "catalog": str(opts.catalog or "default"),
                "schemes": ",".join(s.name for s in inputs.schemes),
            }
        )
        reports = Reports(beside=tracking.tracker_in_child())  # inline on two cores: reports.py
        run = SweepRun(inputs, stop, Phases(), parent, experiment, reports)
        with run.reports:  # leaving waits for the finished schemes' reports, whatever ended it
            rows = _run_families(run, families, replicas)
            if run.reports.beside:
                with run.phases("log", "waiting for the schemes' reports after the last scheme"):
                    run.reports.wait()
        rows = _with_failed_reports(rows, run.reports)
        order = {s.name: i for i, s in enumerate(inputs.schemes)}
        rows.sort(key=lambda r: order[r["scheme"]])  # the catalog's order, not the run order
        _write_comparison(rows, opts.output_dir, parent, run.phases, len(families))
    failed = [r["scheme"] for r in rows if r["status"] != "FINISHED"]
    if failed:
        raise RunFailed(
            f"{len(failed)} of {len(rows)} schemes failed: {', '.join(failed)} "
            f"(reasons in {opts.output_dir / COMPARISON_FILE} and their MLflow runs)"
        )
    return rows


def _run_families(run: SweepRun, families: list[Family], replicas: "Replicas | None") -> list[dict]:
    """Every family's rows, in run order (run_order), on one loaded LM."""
    kernel = fp8_kernel.select_fp8_kernel(run.inputs.options.fp8_kernel)
    rows: list[dict] = []
    with searching_with(replicas, kernel):
        ordered = run_order(families)
        pristine = load(run.inputs, ordered[0].placement, run.phases)
        done: list[Family] = []
        for n, family in enumerate(ordered):
            seeded = _seed(family, done)
            # The last family searches the loaded LM itself; earlier ones a copy of it.
            model = pristine if n == len(families) - 1 else sharing_weights(pristine)
            on = replicas if _replicated(family) else None
            if replicas is not None and on is None:
                replicas.close()  # this process searches the rest alone, outside the group
            info = {"fp8_kernel": kernel, "calibration_seeded_from": seeded}
            rows += run_family(model, family, run, info, on)
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            done.append(family)
    return rows


def _replicated(family: Family) -> bool:
    return family.placement is not None and bool(family.placement.replicas)


def run_order(families: list[Family]) -> list[Family]:
    """The families searched on replicas first (after them the replicas are closed, and the rest
    search on rank 0's GPU alone: families._share_replicas); within each, wider
    candidate sets first, so that a narrower family can start from their calibration."""
    return sorted(families, key=lambda f: (not _replicated(f), -len(f.spec.formats)))


def _seed(family: Family, done: list[Family]) -> str | None:
    if family.reuse.stage is not None:
        return None
    source = calibration_source(family, done)
    if source is None or not source.checkpoint.exists():  # seed_calibration verifies it
        return None
    if not autoquant.seed_calibration(
        source.checkpoint, family.checkpoint, family.spec.method, family.fingerprint, family.spec.formats
    ):
        return None
    log.info("search %s: calibration reused from search %s", family.key, source.key)
    return source.key


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None for fewer than 3 points."""
    if len(xs) < 3:
        return None

    def ranks(v: list[float]):
        v = np.asarray(v, dtype=float)
        order = v.argsort(kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for value in np.unique(v):
            r[v == value] = r[v == value].mean()
        return r

    rx, ry = ranks(xs), ranks(ys)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _spearmans(scored: list[dict]) -> tuple[dict[str, float | None], str | None]:
    """Spearman of predicted loss vs KL per method (predicted losses are sums of one method's
    scores: ranks compare within a method only), and the method with the most schemes."""
    by_method: dict[str, list[dict]] = {}
    for r in scored:
        by_method.setdefault(r["method"], []).append(r)
    rhos = {
        m: spearman([r["predicted_loss"] for r in rs], [r["kl_mean"] for r in rs])
        for m, rs in by_method.items()
    }
    return rhos, max(by_method, key=lambda m: len(by_method[m]), default=None)


def _write_comparison(
    rows: list[dict], out_dir: Path, parent: tracking.Tracker, phases: Phases, searches: int
) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    ok = [r for r in rows if r["status"] == "FINISHED"]
    scored = [r for r in ok if r["kl_mean"] is not None]
    rhos, main_method = _spearmans(scored)
    rho = rhos.get(main_method)
    artifacts.write_text(out_dir / COMPARISON_FILE, buf.getvalue())  # marks a finished sweep
    ran = sum(r["scores"] == "ran" for r in ok)
    log.info(
        "sweep: %d finished, %d failed; scoring ran %d time(s) in %d search(es)%s",
        len(ok),
        len(rows) - len(ok),
        ran,
        searches,
        f"; predicted loss vs KL ({main_method} schemes): Spearman {rho:.3f}" if rho is not None else "",
    )
    _log_comparison(parent, rows, out_dir, scored)
    parent.log_metrics(
        {f"time/{k}_s": v for k, v in phases.seconds.items()}
        | {
            "time/total_s": phases.total(),
            "sweep/schemes": len(rows),
            "sweep/failed": len(rows) - len(ok),
            "sweep/scoring_groups": searches,
            "sweep/scoring_runs": ran,
            M_SPEARMAN: rho,
        }
        | {f"{M_SPEARMAN}/{m}": v for m, v in rhos.items()}
    )


def _log_comparison(parent: tracking.Tracker, rows: list[dict], out_dir: Path, scored: list[dict]) -> None:
    """The comparison's table, figures, file and per-scheme metrics on the parent run."""
    ok = [r for r in rows if r["status"] == "FINISHED"]
    parent.log_table(rows, "comparison.json")
    parent.log_figure(
        figures.pareto(
            [{k: r[k] for k in ("scheme", "effective_bits", "kl_mean", "ppl_rel_change")} for r in ok]
        ),
        PARETO_FIGURE,
    )
    if scored:
        parent.log_figure(figures.predicted_vs_measured(scored), "predicted_vs_kl.png")
    parent.log_artifact(out_dir / COMPARISON_FILE)
    for r in ok:
        parent.log_metrics(
            {
                f"sweep/predicted_loss/{r['scheme']}": r["predicted_loss"],
                f"sweep/kl_mean/{r['scheme']}": r["kl_mean"],
            }
        )
