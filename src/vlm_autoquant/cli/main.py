"""The main and sweep command lines: flags -> validated inputs -> one scheme or a sweep.

Exit codes: 0 done, 1 the run failed, 2 bad input (nothing was loaded or written),
130 stopped by SIGINT/SIGTERM (the search checkpoint is kept; rerun to resume).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path

from ..core.errors import UsageError
from .common import (
    DEFAULT_EXPERIMENT,
    OVERRIDE_FLAGS,
    _check_dependencies_first,
    _check_names_first,
    _epilog,
    add_common,
    configure,
    dashed,
    new_parser,
    optional,
    overrides_from,
    require_dependencies,
    run_guarded,
)

log = logging.getLogger("vlm_autoquant")


def main_parser() -> argparse.ArgumentParser:
    p = new_parser(
        prog="qwen2_5_vl_3b_autoquant_fp8_schemes.py",
        description="AutoQuantize the Qwen2.5-VL language model to a per-layer FP8/BF16 mix "
                    "under an effective-bits budget (NVIDIA ModelOpt), tracked in MLflow.",
        epilog=_epilog())
    p.add_argument("--scheme-name", help="scheme from the catalog (see --list-schemes)")
    p.add_argument("--list-schemes", action="store_true", help="print the catalog and exit")
    p.add_argument("--log-only", action="store_true",
                   help="log a finished --output-dir to MLflow as a new run (after a tracking "
                        "failure), without computing anything")
    add_common(p)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = main_parser()
    args = parser.parse_args(dashed(argv))
    configure(args.debug)
    if args.list_schemes:
        return run_guarded(lambda: _list(args), args.debug, None)
    if args.log_only:
        if args.output_dir is None:
            parser.error("--log-only needs --output-dir (a finished run's directory)")
        return run_guarded(lambda: _log_only(args), args.debug, None)
    if args.output_dir is None and args.scheme_name:
        args.output_dir = Path("outputs") / args.scheme_name
    missing = [f for f, v in (("--scheme-name", args.scheme_name), ("--model-dir", args.model_dir))
               if not v]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return run_guarded(lambda: _run_main(args), args.debug, args.output_dir)


def _list(args: argparse.Namespace) -> int:
    from ..plan.schemes import default_catalog, describe_catalog, load_catalog

    print(describe_catalog(load_catalog(args.catalog or default_catalog())))
    return 0


def options_from(args: argparse.Namespace):
    from ..plan.inputs import RunOptions

    return RunOptions(model_dir=args.model_dir, output_dir=args.output_dir,
                      calib_file=args.calib_file, catalog=args.catalog, overwrite=args.overwrite,
                      save_weights=args.save_weights, grad_checkpointing=args.grad_checkpointing == "on",
                      fp8_kernel=args.fp8_kernel, experiment=args.experiment, gpus=args.gpus,
                      max_gpu_memory=args.max_gpu_memory, parallel=args.parallel)


@contextlib.contextmanager
def _validated(args: argparse.Namespace, names: list[str], single: bool):
    """Validate every input, take the output dir's lock, then plan the searches (tokenizes; no
    weights; may promote or discard search checkpoints, hence under the lock). All problems are
    reported together; the lock is held until the block ends."""
    from ..core.artifacts import COMPARISON_FILE, MANIFEST_FILE, locked_output_dir
    from ..core.errors import Problems
    from ..plan.families import plan
    from ..plan.validate import gather

    problems = Problems()
    marker = MANIFEST_FILE if single else COMPARISON_FILE
    inputs = gather(options_from(args), names, overrides_from(args), problems, OVERRIDE_FLAGS,
                    finished_marker=marker)
    problems.raise_if_any()
    with locked_output_dir(args.output_dir, marker, args.overwrite):
        families = plan(inputs, problems, single)
        problems.raise_if_any()
        yield inputs, families


def _run_main(args: argparse.Namespace) -> int:
    require_dependencies()
    from ..core.timing import Phases, since_process_start

    phases = Phases()
    phases.add("startup", since_process_start())
    with contextlib.ExitStack() as stack:
        from ..search.replicas import prestart, start_for

        # With several --gpus, the other GPUs' processes import while this one validates.
        pool = stack.enter_context(prestart(args.gpus, args.parallel))
        with phases("validate", "inputs, catalog, checkpoint headers, captions, tokenizer, batches"):
            inputs, families = stack.enter_context(_validated(args, [args.scheme_name], True))

        from ..core.interrupt import StopFlag, stop_on_signals

        # They load their replica while this process imports ModelOpt and loads its own.
        replicas = stack.enter_context(start_for(inputs, families[0].placement, pool))
        with phases("import", "ModelOpt and the search's modules"):
            from ..run.pipeline import run_single
        with stop_on_signals(StopFlag()) as stop:
            run_single(inputs, families[0], stop, args.experiment or DEFAULT_EXPERIMENT, phases,
                       replicas)
            stop.raise_if_set()  # a signal after the search: the results are kept, exit 130
    return 0


def _log_only(args: argparse.Namespace) -> int:
    """Log a finished run's output dir (written while tracking was down) as a new MLflow run."""
    import json

    from ..core.artifacts import MANIFEST_FILE
    from ..core.errors import Problem
    from ..run.report import log_scheme
    from ..tracking import tracked_run

    try:
        doc = json.loads((args.output_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        name = doc["scheme"]["name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(Problem("--output-dir", f"{args.output_dir} holds no readable "
                                 f"{MANIFEST_FILE} ({exc})", "pass the --output-dir of a "
                                 "finished run")) from None
    with tracked_run(args.experiment or DEFAULT_EXPERIMENT, name) as tracker:
        log_scheme(tracker, doc, args.output_dir)
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
        epilog=_epilog())
    p.add_argument("--schemes", type=optional(str), default=None,
                   help="comma-separated scheme names (default: the whole catalog)")
    add_common(p)
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
        from ..model.demo import DEMO_OVERRIDES, build_demo

        log.info("no --model-dir: running the embedded demo (tiny random Qwen2.5-VL, own captions)")
        model_dir, captions = build_demo(Path(".demo"))
        demo_args = parser.parse_args(DEMO_OVERRIDES)
        for field in OVERRIDE_FLAGS:  # the demo's sizes, unless given explicitly
            if getattr(args, field) is None:
                setattr(args, field, getattr(demo_args, field))
        args.model_dir = model_dir
        args.calib_file = args.calib_file or captions
        args.output_dir = args.output_dir or Path("outputs/demo-sweep")
    if args.output_dir is None:
        args.output_dir = Path("outputs/sweep")
    return run_guarded(lambda: _run_sweep(args), args.debug, args.output_dir)


def _run_sweep(args: argparse.Namespace) -> int:
    require_dependencies()
    from ..plan.schemes import default_catalog, load_catalog

    names = [n.strip() for n in args.schemes.split(",") if n.strip()] if args.schemes else None
    if names is None:
        try:
            names = list(load_catalog(args.catalog or default_catalog()))
        except UsageError:
            names = []  # gather reports the catalog's problems
    from ..core.interrupt import StopFlag, stop_on_signals
    from ..search.replicas import prestart, start_for

    # With several --gpus, the other GPUs' processes import while this one does and validates.
    with prestart(args.gpus, args.parallel) as pool:
        from ..run.sweep import run_sweep

        with _validated(args, names, single=False) as (inputs, families), \
                start_for(inputs, families[0].placement, pool) as replicas, \
                stop_on_signals(StopFlag()) as stop:
            run_sweep(inputs, families, stop, args.experiment or DEFAULT_EXPERIMENT, replicas)
            stop.raise_if_set()  # a signal after the last scheme: the results are kept, exit 130
    return 0


