"""The export command line: flags -> `api.export`, inside the error boundary.

Exit codes: 0 exported and verified, 1 a check or the export failed (nothing written),
2 bad input (nothing loaded or written), 130 interrupted (nothing written).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .. import api
from . import handoff
from .common import (
    add_experiment,
    add_paths,
    add_switch,
    configure,
    dashed,
    new_parser,
    optional,
    run_guarded,
)

log = logging.getLogger("vlm_autoquant")


def parser() -> argparse.ArgumentParser:
    """The export's flags: which run, where from and to, the format, and what MLflow records."""
    p = new_parser(
        prog="qwen2_5_vl_3b_autoquant_fp8_export.py",
        description="Turn a finished quantization run into a complete, verified Qwen2.5-VL "
        "checkpoint (ModelOpt FP8/BF16 LM, original vision tower, tokenizer, "
        "processor) in compressed-tensors or ModelOpt format.",
        epilog="writes export_report.json into --output-dir; exit codes: 0 done, 1 a check "
        "failed (nothing written), 2 bad input, 130 interrupted",
    )
    _add_source(p)
    add_paths(
        p,
        model_dir="the base Qwen2.5-VL checkpoint (default: the one the run recorded)",
        output_dir="where the checkpoint goes (default exports/<run id>, or exports/<name "
        "of --artifacts-dir>)",
    )
    p.add_argument(
        "--format",
        default="compressed-tensors",
        choices=("compressed-tensors", "modelopt", "both"),
        help="checkpoint format: compressed-tensors (vLLM, SGLang, transformers; "
        "default), modelopt (TensorRT-LLM, vLLM), or both (ModelOpt's in "
        "<output-dir>/modelopt/)",
    )
    add_switch(p, "--overwrite", "replace a non-empty --output-dir")
    add_switch(p, "--lm-only", "export the language model alone (for a model dir without vision tower)")
    add_switch(
        p, "--allow-other-weights", "accept a --model-dir whose LM weights differ from the run's (recorded)"
    )
    _add_mlflow_options(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _add_source(p: argparse.ArgumentParser) -> None:
    """--run-id or --artifacts-dir: the run to export."""
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--run-id",
        type=optional(str),
        default=None,
        help="MLflow run id of a quantization run (current MLFLOW_TRACKING_URI)",
    )
    src.add_argument(
        "--artifacts-dir", type=optional(Path), default=None, help="a run's --output-dir instead of --run-id"
    )


def _add_mlflow_options(p: argparse.ArgumentParser) -> None:
    """--log-checkpoint, --register, --experiment, --no-mlflow."""
    add_switch(p, "--log-checkpoint", "also log the checkpoint files as MLflow artifacts")
    p.add_argument(
        "--register",
        type=optional(str),
        default=None,
        metavar="NAME",
        help="register the checkpoint in the MLflow Model Registry as NAME "
        "(a LoggedModel; alias = the scheme name)",
    )
    add_experiment(p)
    p.add_argument("--no-mlflow", action="store_true", help="do not log the export to MLflow")


def _source(args: argparse.Namespace) -> str | Path | None:
    return args.artifacts_dir if args.artifacts_dir is not None else args.run_id


def exported(done: api.ExportResult) -> str:
    """What an export did, the head of its handoff line."""
    return (
        f"exported {done.report['scheme']} (checks passed, KL "
        f"{done.report['checks']['numerics']['kl_mean']:.3g})"
    )


def _run(args: argparse.Namespace) -> int:
    done = api.export(
        _source(args),
        model_dir=args.model_dir,
        output_dir=args.output_dir,
        overwrite=args.overwrite,
        lm_only=args.lm_only,
        allow_other_weights=args.allow_other_weights,
        log_checkpoint=args.log_checkpoint,
        register=args.register,
        experiment=args.experiment,
        mlflow=not args.no_mlflow,
        format=args.format,
    )
    print(handoff.line(exported(done), done.run_id, done.experiment, done.output_dir), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(dashed(argv))
    configure(args.debug)
    return run_guarded(
        lambda: _run(args),
        args.debug,
        api.export_output_dir(_source(args), args.output_dir),
        "Nothing was written to the output dir; rerun the same command to export.",
        experiment=args.experiment,
        run_name="export",
    )
