"""Command lines: argument parsing, the error boundary, exit codes.

Exit codes: 0 done, 1 the run failed, 2 bad input (nothing was loaded or written),
130 stopped by SIGINT/SIGTERM (the search checkpoint is kept; rerun to resume).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import logging
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from typing import get_args, get_origin

from .artifacts import ARTIFACTS
from .tracking import METRICS
from .errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, Interrupted, RunFailed, UsageError
from .schemes import Scheme

log = logging.getLogger("vlm_autoquant")

ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # MLflow sets its loggers' level on import (else INFO)
}
DEFAULT_EXPERIMENT = "qwen2.5-vl-3b-autoquant-fp8"
# Scheme fields a command line may override, and the contract's flag where it is not --<field>.
NOT_OVERRIDABLE = ("name", "description", "formats", "disabled_layers", "cost_excluded_layers",
                   "overrides")
FLAG_NAMES = {"method": "--auto-quantize-method"}
OVERRIDE_FLAGS = {f: FLAG_NAMES.get(f, "--" + f.replace("_", "-"))
                  for f in Scheme.model_fields if f not in NOT_OVERRIDABLE}


_registered: list[Callable] = []


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


def add_overrides(p: argparse.ArgumentParser) -> None:
    """One flag per overridable Scheme field, typed from the model (generated, never listed)."""
    o = p.add_argument_group("overrides (default: the scheme's value)")
    for field, flag in OVERRIDE_FLAGS.items():
        info = Scheme.model_fields[field]
        kind = info.annotation
        choices = list(get_args(kind)) if get_origin(kind) is not None and get_args(kind) else None
        names = [flag] + ([f"--{field.replace('_', '-')}"] if field in FLAG_NAMES else [])
        o.add_argument(*names, dest=field, default=None,
                       type=_optional(str if choices else kind),
                       choices=[None, *choices] if choices else None,
                       metavar="{" + ",".join(choices) + "}" if choices else kind.__name__.upper())


def add_paths(p, **flags: str) -> None:
    """Path flags (`model_dir="help"` -> --model-dir); "" from MLproject means the default."""
    for name, text in flags.items():
        p.add_argument("--" + name.replace("_", "-"), type=_optional(Path), default=None, help=text)


def add_common(p: argparse.ArgumentParser) -> None:
    add_paths(p, model_dir="Qwen2.5-VL checkpoint directory",
              output_dir="where the manifest and state are written (default outputs/<scheme>)",
              calib_file="captions, one per line (default datasets/vlm-quantize-calib/"
                         "coco2017_captions.txt, relative to the working directory)",
              catalog="scheme catalog YAML (default: the catalog shipped with the tool)")
    add_overrides(p)
    p.add_argument("--overwrite", nargs="?", const=True, default=False, type=_flag,
                   help="replace a finished run in --output-dir (scores are reused if settings match)")
    p.add_argument("--save-weights", action="store_true",
                   help="also write the LM's BF16 weights (about 6 GB for the 3B)")
    p.add_argument("--grad-checkpointing", choices=["on", "off"], default="on",
                   help="gradient checkpointing while scoring: on saves memory, off is faster")
    p.add_argument("--fp8-kernel", choices=["auto", "eager", "cuda-ext"], default="auto",
                   help="ModelOpt FP8 fake-quant kernel: auto uses the CUDA extension when its "
                        "build is cached, else eager; cuda-ext builds it once (~45 s)")
    p.add_argument("--gpus", type=_optional(str), default=None,
                   help='GPUs to place the LM on: "all", or indices such as "0,1" (default: GPU 0)')
    p.add_argument("--max-gpu-memory", type=_optional(str), default=None,
                   help='memory the run may use per GPU: one size ("120GiB") or one per GPU '
                        '("120GiB,100GiB"); default: each GPU\'s total')
    p.add_argument("--parallel", choices=["auto", "replicas", "layers"], default="auto",
                   help="with several --gpus: replicas (each GPU holds the LM and searches part of "
                        "the batches), layers (the LM split across them); auto: replicas when "
                        "the LM and the batch fit one GPU")
    p.add_argument("--experiment", default=None, help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def new_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An entry point's parser: its name, what it does, and the epilog as written."""
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


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


def _freeze_heap() -> None:
    """At exit, after every other exit handler: move all objects out of the collector's reach.
    The interpreter's final collections otherwise walk every object torch, transformers,
    ModelOpt and MLflow made (1.8-3 s on the 2-core CPU). Memory is returned to the OS anyway;
    files are written with `with` and runs are ended before this point."""
    gc.freeze()


def configure(debug: bool) -> None:
    """Environment defaults and logging: one line per phase at INFO, library chatter at DEBUG."""
    if _freeze_heap not in _registered:
        atexit.register(_freeze_heap)  # registered first, so it runs after the libraries' own
        _registered.append(_freeze_heap)
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")  # no progress-bar escape codes in logs
    import warnings

    warnings.filterwarnings("ignore", message="transformers .* is not tested with current")
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "alembic", "mlflow", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def dashed(argv: list[str] | None) -> list[str]:
    """`--num_score_steps 4` as `--num-score-steps 4`: MLflow passes undeclared -P params with
    the parameter's own (underscored) name."""
    out = []
    for arg in sys.argv[1:] if argv is None else argv:
        if arg.startswith("--") and "_" in arg.split("=", 1)[0]:
            name, sep, value = arg.partition("=")
            arg = name.replace("_", "-") + sep + value
        out.append(arg)
    return out


def overrides_from(args: argparse.Namespace) -> dict:
    return {field: getattr(args, field) for field in OVERRIDE_FLAGS}


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
    from .schemes import default_catalog, describe_catalog, load_catalog

    print(describe_catalog(load_catalog(args.catalog or default_catalog())))
    return 0


def options_from(args: argparse.Namespace):
    from .validate import RunOptions

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
    from .artifacts import COMPARISON_FILE, MANIFEST_FILE, locked_output_dir
    from .errors import Problems
    from .families import plan
    from .validate import gather

    problems = Problems()
    marker = MANIFEST_FILE if single else COMPARISON_FILE
    inputs = gather(options_from(args), names, overrides_from(args), problems, OVERRIDE_FLAGS,
                    finished_marker=marker)
    problems.raise_if_any()
    with locked_output_dir(args.output_dir, marker, args.overwrite):
        families = plan(inputs, problems, single)
        problems.raise_if_any()
        yield inputs, families


def require_dependencies() -> None:
    """Check installed versions (metadata only) before torch, transformers or ModelOpt load."""
    from .validate import require_dependencies as require

    require()


def _check_dependencies_first(debug: bool) -> int:
    """Exit code of the dependency check alone (0 when all is installed)."""
    def body() -> int:
        require_dependencies()
        return 0
    return run_guarded(body, debug, None)


def _run_main(args: argparse.Namespace) -> int:
    require_dependencies()
    from .timing import Phases, since_process_start

    phases = Phases()
    phases.add("startup", since_process_start())
    with contextlib.ExitStack() as stack:
        from .replicas import prestart, start_for

        # With several --gpus, the other GPUs' processes import while this one validates.
        pool = stack.enter_context(prestart(args.gpus, args.parallel))
        with phases("validate", "inputs, catalog, checkpoint headers, captions, tokenizer, batches"):
            inputs, families = stack.enter_context(_validated(args, [args.scheme_name], True))

        from .interrupt import StopFlag, stop_on_signals

        # They load their replica while this process imports ModelOpt and loads its own.
        replicas = stack.enter_context(start_for(inputs, families[0].placement, pool))
        with phases("import", "ModelOpt and the search's modules"):
            from .pipeline import run_single
        with stop_on_signals(StopFlag()) as stop:
            run_single(inputs, families[0], stop, args.experiment or DEFAULT_EXPERIMENT, phases,
                       replicas)
            stop.raise_if_set()  # a signal after the search: the results are kept, exit 130
    return 0


def _log_only(args: argparse.Namespace) -> int:
    """Log a finished run's output dir (written while tracking was down) as a new MLflow run."""
    import json

    from .artifacts import MANIFEST_FILE
    from .errors import Problem
    from .report import log_scheme
    from .tracking import tracked_run

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
    p.add_argument("--schemes", type=_optional(str), default=None,
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
        from .demo import DEMO_OVERRIDES, build_demo

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


def _check_names_first(args: argparse.Namespace, names: list[str]) -> None:
    """Refuse an unknown scheme or a bad catalog before the demo checkpoint is built."""
    from .errors import Problems
    from .validate import check_schemes

    problems = Problems()
    check_schemes(args.catalog, [n.strip() for n in names if n.strip()], overrides_from(args),
                  OVERRIDE_FLAGS, problems)
    if problems:
        print(f"error: {UsageError(problems.items).render()}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _run_sweep(args: argparse.Namespace) -> int:
    require_dependencies()
    from .schemes import default_catalog, load_catalog

    names = [n.strip() for n in args.schemes.split(",") if n.strip()] if args.schemes else None
    if names is None:
        try:
            names = list(load_catalog(args.catalog or default_catalog()))
        except UsageError:
            names = []  # gather reports the catalog's problems
    from .interrupt import StopFlag, stop_on_signals
    from .replicas import prestart, start_for

    # With several --gpus, the other GPUs' processes import while this one does and validates.
    with prestart(args.gpus, args.parallel) as pool:
        from .sweep import run_sweep

        with _validated(args, names, single=False) as (inputs, families), \
                start_for(inputs, families[0].placement, pool) as replicas, \
                stop_on_signals(StopFlag()) as stop:
            run_sweep(inputs, families, stop, args.experiment or DEFAULT_EXPERIMENT, replicas)
            stop.raise_if_set()  # a signal after the last scheme: the results are kept, exit 130
    return 0


DEMO_HELP = ("The embedded demo: build a tiny random Qwen2.5-VL checkpoint and its own captions "
             "under --root, run the main entry point on it with small step counts (into "
             "outputs/demo-<scheme>), then export that run (into exports/demo-<scheme>); paths "
             "relative to the current directory. Other flags are passed on to the main entry point.")


def demo_parser() -> argparse.ArgumentParser:
    p = new_parser("vlm-autoquant-demo", DEMO_HELP)
    p.add_argument("--scheme-name", default="fp8-balanced-10b")
    p.add_argument("--root", type=Path, default=Path(".demo"),
                   help="where the demo checkpoint and captions are built (default .demo)")
    p.add_argument("--no-export", action="store_true",
                   help="stop after quantizing (skip the export to exports/demo-<scheme>)")
    return p


def demo_main(argv: list[str] | None = None) -> int:
    """`vlm-autoquant-demo` and scripts/run_demo.py: build the demo, then run `main` on it."""
    args, rest = demo_parser().parse_known_args(dashed(argv))
    debug = "--debug" in rest
    configure(debug)
    code = _check_dependencies_first(debug)
    if code:
        return code
    probe = main_parser().parse_args(["--scheme-name", args.scheme_name, "--model-dir", "-", *rest])
    _check_names_first(probe, [args.scheme_name])  # before the checkpoint is built
    from .demo import DEMO_OVERRIDES, build_demo

    model_dir, captions = build_demo(args.root)
    out = f"outputs/demo-{args.scheme_name}"
    code = main(["--scheme-name", args.scheme_name, "--model-dir", str(model_dir),
                 "--calib-file", str(captions), "--output-dir", out, *DEMO_OVERRIDES,
                 "--overwrite", *rest])
    if code or args.no_export:
        return code
    from .export_cli import main as export_main  # step 3 of the day: a servable checkpoint

    log.info("demo: exporting %s to a Qwen2.5-VL FP8 checkpoint in exports/demo-%s", out,
             args.scheme_name)
    return export_main(["--artifacts-dir", out, "--model-dir", str(model_dir), "--output-dir",
                        f"exports/demo-{args.scheme_name}", "--overwrite",
                        *(["--debug"] if debug else [])])
