"""The main and sweep command lines: flags -> validated inputs -> one scheme or a sweep.

Exit codes: 0 done, 1 the run failed, 2 bad input (nothing was loaded or written),
130 stopped by SIGINT/SIGTERM (the search checkpoint is kept; rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

from .. import api
from ..core import paths
from ..core.artifacts import MANIFEST_FILE
from ..core.errors import Problem, Problems, UsageError
from ..plan.schemes import default_catalog, describe_catalog, load_catalog
from ..tracking import check_reachable, tracked_run
from . import handoff
from .common import (
    _check_dependencies_first,
    _check_names_first,
    _epilog,
    add_common,
    configure,
    dashed,
    new_parser,
    optional,
    run_guarded,
    run_kwargs,
)

log = logging.getLogger("vlm_autoquant")


def main_parser() -> argparse.ArgumentParser:
    p = new_parser(
        prog="qwen2_5_vl_3b_autoquant_fp8_schemes.py",
        description="AutoQuantize the Qwen2.5-VL language model to a per-layer FP8/BF16 mix "
        "under an effective-bits budget (NVIDIA ModelOpt), tracked in MLflow.",
        epilog=_epilog(),
    )
    p.add_argument(
        "--scheme-name",
        default=api.DEFAULT_SCHEME,
        help=f"scheme from the catalog (default {api.DEFAULT_SCHEME}; see --list-schemes)",
    )
    p.add_argument("--list-schemes", action="store_true", help="print the catalog and exit")
    p.add_argument(
        "--log-only",
        action="store_true",
        help="log a finished --output-dir to MLflow as a new run (after a tracking "
        "failure), without computing anything",
    )
    add_common(p, "where the manifest and state are written (default outputs/<scheme>)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = main_parser()
    args = parser.parse_args(dashed(argv))
    configure(args.debug)
    if args.list_schemes:
        return run_guarded(lambda: _list(args), args.debug, None)
    if args.log_only:
        return run_guarded(lambda: _log_only(args), args.debug, None, experiment=args.experiment)
    args.scheme_name = args.scheme_name or api.DEFAULT_SCHEME  # MLproject may pass ""
    if args.output_dir is None:
        args.output_dir = Path("outputs") / args.scheme_name
    return run_guarded(
        lambda: _run_main(args),
        args.debug,
        args.output_dir,
        experiment=args.experiment,
        run_name=args.scheme_name,
    )


def _require(flag: str, value: object, what: str, fix: str) -> None:
    """A usage error naming `flag` when it was left out."""
    if value is None or value == "":
        raise UsageError(Problem(flag, f"is missing ({what})", fix))


def _list(args: argparse.Namespace) -> int:
    print(describe_catalog(load_catalog(args.catalog or default_catalog())))
    return 0


def _run_main(args: argparse.Namespace) -> int:
    _require(
        "--model-dir",
        args.model_dir,
        "the Qwen2.5-VL checkpoint to quantize",
        "pass --model-dir /path/to/Qwen2.5-VL-3B-Instruct (or try the embedded demo: vlm-autoquant-demo)",
    )
    done = api.quantize(
        args.model_dir,
        args.scheme_name,
        output_dir=args.output_dir,
        calib_file=args.calib_file,
        **run_kwargs(args),
    )
    print(quantized_line(args.scheme_name, done, args.model_dir), flush=True)
    return 0


def quantized_line(scheme: str, done: api.Result, model_dir: Path) -> str:
    """The handoff line of a finished scheme: its run, its output and the export command."""
    export = None if done.run_id is None else handoff.export_command(done.run_id, model_dir, done.experiment)
    return handoff.line(scheme, done.run_id, done.experiment, done.output_dir, export)


def _log_only(args: argparse.Namespace) -> int:
    """Log a finished run's output dir (written while tracking was down) as a new MLflow run.

    The manifest is read once and every artifact is checked against it (`checked_artifacts`)
    before the MLflow run is made; what is logged are the bytes that were checked."""
    from ..run.manifest import field_problems  # torch: only for --log-only
    from ..run.report import checked_artifacts, log_scheme  # torch: only for --log-only

    _require(
        "--output-dir",
        args.output_dir,
        "--log-only logs a finished run's directory",
        "pass the --output-dir of a finished run",
    )
    try:
        raw = paths.read_regular(args.output_dir / MANIFEST_FILE, 64 << 20)
        doc = json.loads(raw)
        name = doc["scheme"]["name"]
    except (OSError, paths.NotARegularFile, ValueError, KeyError, TypeError) as exc:
        raise UsageError(
            Problem(
                "--output-dir",
                f"{args.output_dir} holds no readable {MANIFEST_FILE} ({exc})",
                "pass the --output-dir of a finished run",
            )
        ) from None
    problems = Problems(field_problems(doc, str(args.output_dir / MANIFEST_FILE)))
    check_reachable(problems, args.experiment)
    problems.raise_if_any()
    with tempfile.TemporaryDirectory(prefix="vlm-log-only-") as tmp:
        files = checked_artifacts(doc, raw, args.output_dir, Path(tmp))
        with tracked_run(args.experiment, name) as tracker:
            log_scheme(tracker, doc, args.output_dir, files)
            tracker.set_tags({"logged_later_from": str(args.output_dir.resolve())})
    log.info("logged %s as MLflow run %s", args.output_dir, tracker.run_id)
    return 0


def sweep_parser() -> argparse.ArgumentParser:
    p = new_parser(
        prog="qwen2_5_vl_3b_autoquant_fp8_sweep.py",
        description="Run several catalog schemes on one model, with one calibration and scoring "
        "pass per method (a search over the union of their formats); one MLflow "
        "parent run with a child run per scheme. A failing scheme does not stop the "
        "others. Without --model-dir it runs the embedded demo.",
        epilog=_epilog(),
    )
    p.add_argument(
        "--schemes",
        type=optional(str),
        default=None,
        help="comma-separated scheme names (default: the whole catalog)",
    )
    add_common(
        p,
        "where the comparison and one folder per scheme are written (default "
        "outputs/sweep; without --model-dir, outputs/demo-sweep)",
    )
    return p


def sweep_main(argv: list[str] | None = None) -> int:
    parser = sweep_parser()
    args = parser.parse_args(dashed(argv))
    configure(args.debug)
    if args.model_dir is None:
        code = _check_dependencies_first(args.debug)  # building the demo imports torch
        if code:
            return code
        _check_names_first(args, (args.schemes or "").split(","))
        from ..model.demo import DEMO_OVERRIDES, build_demo  # torch: only for the demo

        log.info("no --model-dir: running the embedded demo (tiny random Qwen2.5-VL, own captions)")
        model_dir, captions = build_demo(Path(".demo"))
        for field, value in DEMO_OVERRIDES.items():  # the demo's sizes, unless given explicitly
            if getattr(args, field) is None:
                setattr(args, field, value)
        args.model_dir = model_dir
        args.calib_file = args.calib_file or captions
        args.output_dir = args.output_dir or Path("outputs/demo-sweep")
    if args.output_dir is None:
        args.output_dir = Path("outputs/sweep")
    return run_guarded(
        lambda: _run_sweep(args), args.debug, args.output_dir, experiment=args.experiment, run_name="sweep"
    )


def _run_sweep(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.schemes.split(",") if n.strip()] if args.schemes else None
    done = api.sweep(
        args.model_dir, names, output_dir=args.output_dir, calib_file=args.calib_file, **run_kwargs(args)
    )
    print(handoff.line("sweep", done.run_id, done.experiment, done.output_dir), flush=True)
    return 0
