"""Command lines: argument parsing, the error boundary, exit codes.

Exit codes: 0 done, 1 the run failed, 2 bad input (nothing was loaded or written),
130 stopped by SIGINT/SIGTERM (the search checkpoint is kept; rerun to resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from .constants import ARTIFACTS, DEFAULT_CALIB_FILE, DEFAULT_EXPERIMENT, ENV_DEFAULTS, METRICS
from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, Interrupted, RunFailed, UsageError

log = logging.getLogger("vlm_autoquant")

# CLI flag -> scheme field, for the overrides that take their default from the scheme.
OVERRIDE_FLAGS = {
    "effective_bits": "--effective-bits", "method": "--auto-quantize-method",
    "num_score_steps": "--num-score-steps", "num_calib_steps": "--num-calib-steps",
    "num_calib_samples": "--num-calib-samples", "num_eval_samples": "--num-eval-samples",
    "seq_len": "--seq-len", "batch_size": "--batch-size", "seed": "--seed",
}


def _optional(kind: Callable) -> Callable:
    """MLproject passes "" for an override left empty: that means "use the scheme's value"."""
    def parse(text: str):
        return None if text == "" else kind(text)
    parse.__name__ = kind.__name__
    return parse


def _flag(text: str) -> bool:
    """`--overwrite` alone means true; MLproject passes --overwrite true|false."""
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _epilog() -> str:
    lines = ["artifacts written to --output-dir (and logged to MLflow):"]
    lines += [f"  {k:24} {v}" for k, v in ARTIFACTS.items()]
    lines += ["", "MLflow metrics:"] + [f"  {k:34} {v}" for k, v in METRICS.items()]
    lines += ["", "exit codes: 0 done, 1 run failed, 2 bad input, 130 interrupted (rerun to resume)"]
    return "\n".join(lines)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", type=_optional(Path), default=None,
                   help="Qwen2.5-VL checkpoint directory")
    p.add_argument("--output-dir", type=_optional(Path), default=None,
                   help="where the manifest and state are written (default outputs/<scheme>)")
    p.add_argument("--calib-file", type=_optional(Path), default=None,
                   help=f"captions, one per line (default {DEFAULT_CALIB_FILE}, from the project root)")
    p.add_argument("--catalog", type=_optional(Path), default=None,
                   help="scheme catalog YAML (default configs/schemes.yaml)")
    o = p.add_argument_group("overrides (default: the scheme's value)")
    o.add_argument("--effective-bits", type=_optional(float), default=None)
    o.add_argument("--auto-quantize-method", type=_optional(str), default=None,
                   choices=[None, "gradient", "kl_div"], metavar="{gradient,kl_div}")
    for field in ("num_score_steps", "num_calib_steps", "num_calib_samples", "num_eval_samples",
                  "seq_len", "batch_size", "seed"):
        o.add_argument(OVERRIDE_FLAGS[field], type=_optional(int), default=None, metavar="N")
    p.add_argument("--overwrite", nargs="?", const=True, default=False, type=_flag,
                   help="replace a finished run in --output-dir (scores are reused if settings match)")
    p.add_argument("--save-weights", action="store_true",
                   help="also write the LM's BF16 weights (about 6 GB for the 3B)")
    p.add_argument("--grad-checkpointing", choices=["on", "off"], default="on",
                   help="gradient checkpointing while scoring: on saves memory, off is faster")
    p.add_argument("--fp8-kernel", choices=["auto", "eager", "cuda-ext"], default="auto",
                   help="ModelOpt FP8 fake-quant kernel: auto uses the CUDA extension when its "
                        "build is cached, else eager; cuda-ext builds it once (~45 s)")
    p.add_argument("--experiment", default=None, help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def main_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwen2_5_vl_3b_autoquant_fp8_schemes.py",
        description="AutoQuantize the Qwen2.5-VL language model to a per-layer FP8/BF16 mix "
                    "under an effective-bits budget (NVIDIA ModelOpt), tracked in MLflow.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scheme-name", help="scheme from the catalog (see --list-schemes)")
    p.add_argument("--list-schemes", action="store_true", help="print the catalog and exit")
    add_common(p)
    return p


def configure(debug: bool) -> None:
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _attr(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def overrides_from(args: argparse.Namespace) -> dict:
    return {field: getattr(args, _attr(flag)) for field, flag in OVERRIDE_FLAGS.items()}


def run_guarded(body: Callable[[], int], debug: bool, output_dir: Path | None) -> int:
    """The error boundary: clean messages and exit codes; no partial output left behind."""
    from . import artifacts, paths
    from .interrupt import terminate_as_interrupt

    existed = output_dir is not None and paths.exists(output_dir)
    try:
        with terminate_as_interrupt():
            return body()
    except UsageError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        code = EXIT_USAGE
    except (Interrupted, KeyboardInterrupt) as exc:
        print(f"stopped ({exc or 'KeyboardInterrupt'}). Finished calibration/scoring was kept in "
              "the search checkpoint: rerun the same command to resume.", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except RunFailed as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - the boundary turns everything into a message
        if debug:
            raise
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            print("error: out of GPU memory. The 3B LM peaks at 39 GiB with 16x512 batches and "
                  "22 GiB with 8x512.\n    fix: rerun with --batch-size 8 --num-calib-steps 32 "
                  "--num-score-steps 16 --overwrite (the same tokens in smaller batches; "
                  "--overwrite discards the search checkpoint made for the old batch shape)",
                  file=sys.stderr)
        else:
            print(f"error: {type(exc).__name__}: {exc}\n(rerun with --debug for the traceback)",
                  file=sys.stderr)
        code = EXIT_FAILURE
    if output_dir is not None and not existed and paths.exists(output_dir) \
            and artifacts.only_our_bookkeeping(output_dir):
        shutil.rmtree(output_dir, ignore_errors=True)  # we made it and it holds nothing
    return code


def main(argv: list[str] | None = None) -> int:
    parser = main_parser()
    args = parser.parse_args(argv)
    configure(args.debug)
    if args.list_schemes:
        return run_guarded(lambda: _list(args), args.debug, None)
    if args.output_dir is None and args.scheme_name:
        args.output_dir = Path("outputs") / args.scheme_name
    missing = [f for f, v in (("--scheme-name", args.scheme_name), ("--model-dir", args.model_dir))
               if not v]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    return run_guarded(lambda: _run_main(args), args.debug, args.output_dir)


def _list(args: argparse.Namespace) -> int:
    from .constants import DEFAULT_CATALOG
    from .schemes import describe_catalog, load_catalog

    print(describe_catalog(load_catalog(args.catalog or DEFAULT_CATALOG)))
    return 0


def options_from(args: argparse.Namespace):
    from .inputs import RunOptions

    return RunOptions(model_dir=args.model_dir, output_dir=args.output_dir,
                      calib_file=args.calib_file, catalog=args.catalog, overwrite=args.overwrite,
                      save_weights=args.save_weights, grad_checkpointing=args.grad_checkpointing == "on",
                      fp8_kernel=args.fp8_kernel, experiment=args.experiment)


def _run_main(args: argparse.Namespace) -> int:
    from .errors import Problems
    from .inputs import build_data, gather

    import time

    from .phases import since_process_start

    t0 = time.perf_counter()
    problems = Problems()
    inputs = gather(options_from(args), [args.scheme_name], overrides_from(args), problems,
                    OVERRIDE_FLAGS)
    data = build_data(inputs.tokenizer, inputs.captions, inputs.schemes[0], problems) \
        if inputs is not None else None
    problems.raise_if_any()
    validate = time.perf_counter() - t0

    from .interrupt import StopFlag, stop_on_signals
    from .pipeline import run_single
    from .tracking import Tracker

    from .artifacts import locked_output_dir
    from .constants import MANIFEST_FILE

    experiment = args.experiment or DEFAULT_EXPERIMENT
    with locked_output_dir(args.output_dir, MANIFEST_FILE, args.overwrite), \
            stop_on_signals(StopFlag()) as stop:
        run_single(inputs, data, stop, lambda name: Tracker(experiment, name),
                   {"startup": since_process_start(), "validate": validate - data.seconds})
        stop.raise_if_set()  # a signal after the search: results are kept, exit 130
    return 0


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwen2_5_vl_3b_autoquant_fp8_sweep.py",
        description="Run several catalog schemes on one model, scoring once per shareable group; "
                    "one MLflow parent run with a child run per scheme. Without --model-dir it "
                    "runs the embedded demo (a tiny random checkpoint built on the spot).",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schemes", type=_optional(str), default=None,
                   help="comma-separated scheme names (default: the whole catalog)")
    add_common(p)
    return p


def sweep_main(argv: list[str] | None = None) -> int:
    parser = sweep_parser()
    args = parser.parse_args(argv)
    configure(args.debug)
    if args.model_dir is None:
        from .demo import DEMO_OVERRIDES, build_demo

        log.info("no --model-dir: running the embedded demo (tiny random Qwen2.5-VL, own captions)")
        model_dir, captions = build_demo(Path(".demo"))
        demo_args = parser.parse_args(DEMO_OVERRIDES)
        for flag in OVERRIDE_FLAGS.values():  # the demo's sizes, unless given explicitly
            if getattr(args, _attr(flag)) is None:
                setattr(args, _attr(flag), getattr(demo_args, _attr(flag)))
        args.model_dir = model_dir
        args.calib_file = args.calib_file or captions
        args.output_dir = args.output_dir or Path("outputs/demo-sweep")
    if args.output_dir is None:
        args.output_dir = Path("outputs/sweep")
    return run_guarded(lambda: _run_sweep(args), args.debug, args.output_dir)


def _run_sweep(args: argparse.Namespace) -> int:
    from .constants import DEFAULT_CATALOG
    from .errors import Problems
    from .inputs import gather
    from .schemes import load_catalog

    problems = Problems()
    try:
        catalog_names = list(load_catalog(args.catalog or DEFAULT_CATALOG))
    except UsageError as exc:
        problems.extend(exc.problems)
        catalog_names = []
    names = [n.strip() for n in args.schemes.split(",") if n.strip()] if args.schemes \
        else catalog_names
    options = options_from(args)
    from .sweep import SWEEP_MARKER, plan, run_sweep

    inputs = gather(options, names, overrides_from(args), problems, OVERRIDE_FLAGS,
                    finished_marker=SWEEP_MARKER)
    if inputs is None:
        problems.raise_if_any()

    from .artifacts import locked_output_dir
    from .interrupt import StopFlag, stop_on_signals
    from .tracking import Tracker

    experiment = args.experiment or DEFAULT_EXPERIMENT

    def tracker(name: str, parent):
        return Tracker(experiment, name, nested=parent is not None, parent=parent)

    # plan() inspects (and may promote or discard) search checkpoints: only under the lock.
    with locked_output_dir(args.output_dir, SWEEP_MARKER, args.overwrite):
        groups = plan(inputs, problems)
        problems.raise_if_any()
        with stop_on_signals(StopFlag()) as stop:
            run_sweep(inputs, groups, stop, tracker)
            stop.raise_if_set()  # a signal after the last scheme: results are kept, exit 130
    return 0
