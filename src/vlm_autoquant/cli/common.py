"""What every command line shares: flag types, the shared flags, logging set-up and the error
boundary that turns problems into messages and exit codes.

Exit codes: 0 done, 1 the run failed, 2 bad input (nothing was loaded or written),
130 stopped by SIGINT/SIGTERM (the search checkpoint is kept; rerun to resume).
"""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import get_args, get_origin

from .. import tracking
from ..api import DEFAULT_EXPERIMENT
from ..core import artifacts, paths
from ..core.artifacts import ARTIFACTS
from ..core.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Interrupted,
    Problems,
    RunFailed,
    UsageError,
)
from ..core.interrupt import terminate_as_interrupt
from ..model import identity
from ..plan.inputs import FLAG_NAMES, OVERRIDE_FLAGS
from ..plan.schemes import Scheme
from ..plan.validate import check_schemes
from ..plan.validate import require_dependencies as require
from ..tracking import METRICS, mark_launch_failed
from ..tracking_store import log_to_stderr, redact

log = logging.getLogger("vlm_autoquant")


ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # MLflow sets its loggers' level on import (else INFO)
}
BOOL_METAVAR = "true|false"  # `--flag` alone means true; MLproject passes `--flag false`
_registered: list[Callable] = []


def optional(kind: Callable) -> Callable:
    """MLproject passes "" for an override left empty: that means "use the scheme's value"."""

    def parse(text: str):
        return None if text == "" else kind(text)

    parse.__name__ = kind.__name__
    return parse


def flag(text: str) -> bool:
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
        o.add_argument(
            *names,
            dest=field,
            default=None,
            type=optional(str if choices else kind),
            choices=[None, *choices] if choices else None,
            metavar="{" + ",".join(choices) + "}" if choices else kind.__name__.upper(),
        )


def add_paths(p, **flags: str) -> None:
    """Path flags (`model_dir="help"` -> --model-dir); "" from MLproject means the default."""
    for name, text in flags.items():
        p.add_argument("--" + name.replace("_", "-"), type=optional(Path), default=None, help=text)


def add_experiment(p: argparse.ArgumentParser) -> None:
    """--experiment (alias --experiment-name, as `mlflow run` spells it)."""
    p.add_argument(
        "--experiment",
        "--experiment-name",
        dest="experiment",
        default=None,
        help=f"MLflow experiment (default {DEFAULT_EXPERIMENT}, also under `mlflow "
        "run`; MLFLOW_EXPERIMENT_NAME or `mlflow run --experiment-name` choose "
        "another)",
    )


def add_switch(p: argparse.ArgumentParser, name: str, help: str) -> None:
    """A flag that is off by default, on when given bare, and also takes true/false (MLproject
    passes every parameter with a value)."""
    p.add_argument(name, nargs="?", const=True, default=False, type=flag, metavar=BOOL_METAVAR, help=help)


def add_common(p: argparse.ArgumentParser, output_help: str) -> None:
    """The flags every quantization command takes: paths, overrides, run and GPU options."""
    add_paths(
        p,
        model_dir="Qwen2.5-VL checkpoint directory",
        output_dir=output_help,
        calib_file="captions, one per line (default datasets/vlm-quantize-calib/"
        "coco2017_captions.txt, relative to the working directory)",
        catalog="scheme catalog YAML (default: the catalog shipped with the tool)",
    )
    add_overrides(p)
    add_switch(
        p, "--overwrite", "replace a finished run in --output-dir (scores are reused if settings match)"
    )
    _add_run_options(p)
    _add_gpu_options(p)
    add_experiment(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """--save-weights, --grad-checkpointing, --fp8-kernel."""
    p.add_argument(
        "--save-weights", action="store_true", help="also write the LM's BF16 weights (about 6 GB for the 3B)"
    )
    p.add_argument(
        "--grad-checkpointing",
        choices=["auto", "on", "off"],
        default="auto",
        help="gradient checkpointing while scoring: on saves memory, off is faster; auto (the "
        "default) turns it off where the memory plan fits the batch without it, else on",
    )
    p.add_argument(
        "--fp8-kernel",
        choices=["auto", "eager", "cuda-ext"],
        default="auto",
        help="ModelOpt FP8 fake-quant kernel: auto uses the CUDA extension when its "
        "build is cached, else eager; cuda-ext builds it once (~45 s)",
    )


def _add_gpu_options(p: argparse.ArgumentParser) -> None:
    """--gpus, --max-gpu-memory, --parallel."""
    p.add_argument(
        "--gpus",
        type=optional(str),
        default=None,
        help='GPUs to place the LM on: "all", or indices such as "0,1" (default: GPU 0)',
    )
    p.add_argument(
        "--max-gpu-memory",
        type=optional(str),
        default=None,
        help='memory the run may use per GPU: one size ("120GiB") or one per GPU '
        '("120GiB,100GiB"); default: each GPU\'s total',
    )
    p.add_argument(
        "--parallel",
        choices=["auto", "replicas", "layers"],
        default="auto",
        help="with several --gpus: replicas (each GPU holds the LM and searches part of "
        "the batches), layers (the LM split across them); auto: replicas when "
        "the LM and the batch fit one GPU",
    )


class _Parser(argparse.ArgumentParser):
    """argparse with a short error: the problem and where the flags are listed, no usage dump."""

    def error(self, message: str):  # type: ignore[override]
        _mark_launch_failed(None, Path(self.prog).stem, f"{message} (see {self.prog} --help)")
        self.exit(EXIT_USAGE, f"error: {message}\n    fix: see `{self.prog} --help` for every flag\n")


def new_parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An entry point's parser: its name, what it does, and the epilog as written."""
    return _Parser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


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

    warnings.filterwarnings("ignore", message="transformers .* is not tested with current")
    log_to_stderr(debug)  # and, without --debug, no FutureWarning


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


def run_kwargs(args: argparse.Namespace) -> dict:
    """The API's keyword arguments of the shared flags: run options and scheme overrides."""
    return {
        "catalog": args.catalog,
        "overwrite": args.overwrite,
        "save_weights": args.save_weights,
        "grad_checkpointing": {"on": True, "off": False}.get(args.grad_checkpointing),  # auto: None
        "fp8_kernel": args.fp8_kernel,
        "experiment": args.experiment,
        "gpus": args.gpus,
        "max_gpu_memory": args.max_gpu_memory,
        "parallel": args.parallel,
        **overrides_from(args),
    }


INTERRUPTED_NOTE = (
    "Finished calibration/scoring was kept in the search checkpoint: rerun the same command to resume."
)


def run_guarded(
    body: Callable[[], int],
    debug: bool,
    output_dir: Path | None,
    interrupted_note: str = INTERRUPTED_NOTE,
    experiment: str | None = None,
    run_name: str = "run",
) -> int:
    """The error boundary: clean messages and exit codes; no partial output left behind.

    A dir the run created is removed when it holds only our bookkeeping, unless it records an
    MLflow run this process could not end (the next run into it closes that run).
    Under `mlflow run`, a failure before the run was tracked still ends its MLflow run FAILED,
    named `run_name`, in `experiment`, with the message as its failure_reason."""
    existed = output_dir is not None and paths.exists(output_dir)
    try:
        with terminate_as_interrupt():
            return body()
    except UsageError as exc:
        print(f"error: {redact(exc.render())}", file=sys.stderr)
        _mark_launch_failed(experiment, run_name, redact(exc.render()))
        code = EXIT_USAGE
    except (Interrupted, KeyboardInterrupt) as exc:
        print(f"stopped ({exc or 'KeyboardInterrupt'}). {interrupted_note}", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except RunFailed as exc:
        if debug:
            raise
        print(f"error: {redact(exc)}", file=sys.stderr)
        _mark_launch_failed(experiment, run_name, redact(exc))
        code = EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 - the boundary turns everything into a message
        if debug:
            raise
        _print_crash(exc)
        _mark_launch_failed(experiment, run_name, f"{type(exc).__name__}: {redact(exc)}")
        code = EXIT_FAILURE
    identity.cancel()  # a weights digest still under way: the process exits without waiting for it
    if output_dir is not None and not existed:
        _remove_if_only_bookkeeping(output_dir)
    return code


def _print_crash(exc: Exception) -> None:
    """An unexpected error in one message: out of GPU memory with its fix, else type and text."""
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
        print(
            "error: out of GPU memory. The 3B LM peaks at 39 GiB with 16x512 batches and "
            "22 GiB with 8x512.\n    fix: rerun with --batch-size 8 --num-calib-steps 32 "
            "--num-score-steps 16 --overwrite (the same tokens in smaller batches; "
            "--overwrite discards the search checkpoint made for the old batch shape)",
            file=sys.stderr,
        )
    else:
        print(
            f"error: {type(exc).__name__}: {redact(exc)}\n(rerun with --debug for the traceback)",
            file=sys.stderr,
        )


def _remove_if_only_bookkeeping(output_dir: Path) -> None:
    """Remove a dir this process created when it holds only our bookkeeping."""
    if paths.exists(output_dir) and artifacts.only_our_bookkeeping(
        output_dir, tracking.ended_here(output_dir)
    ):
        shutil.rmtree(output_dir, ignore_errors=True)  # we made it and it holds nothing


def _mark_launch_failed(experiment: str | None, run_name: str, reason: str) -> None:
    if os.environ.get("MLFLOW_RUN_ID"):  # only `mlflow run` made a run before ours
        mark_launch_failed(experiment, run_name, reason)


def require_dependencies() -> None:
    """Check installed versions (metadata only) before torch, transformers or ModelOpt load."""
    require()


def _check_dependencies_first(debug: bool) -> int:
    """Exit code of the dependency check alone (0 when all is installed)."""

    def body() -> int:
        require_dependencies()
        return 0

    return run_guarded(body, debug, None)


def _check_names_first(args: argparse.Namespace, names: list[str]) -> None:
    """Refuse an unknown scheme or a bad catalog before the demo checkpoint is built."""
    problems = Problems()
    check_schemes(
        args.catalog, [n.strip() for n in names if n.strip()], overrides_from(args), OVERRIDE_FLAGS, problems
    )
    if problems:
        print(f"error: {UsageError(problems.items).render()}", file=sys.stderr)
        _mark_launch_failed(args.experiment, ",".join(names) or "sweep", UsageError(problems.items).render())
        raise SystemExit(EXIT_USAGE)
