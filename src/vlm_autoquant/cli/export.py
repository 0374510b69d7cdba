"""The export command line: flags -> ExportOptions -> export_run, inside the error boundary.

Exit codes: 0 exported and verified, 1 a check or the export failed (nothing written),
2 bad input (nothing loaded or written), 130 interrupted (nothing written).
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from .common import DEFAULT_EXPERIMENT, add_paths, configure, dashed, flag, new_parser, optional, run_guarded

log = logging.getLogger("vlm_autoquant")


def parser() -> argparse.ArgumentParser:
    p = new_parser(
        prog="qwen2_5_vl_3b_autoquant_fp8_export.py",
        description="Turn a finished quantization run into a complete, verified Qwen2.5-VL "
                    "checkpoint (ModelOpt FP8/BF16 LM, original vision tower, tokenizer, "
                    "processor), served with vLLM quantization='modelopt'.",
        epilog="writes export_report.json into --output-dir; exit codes: 0 done, 1 a check "
               "failed (nothing written), 2 bad input, 130 interrupted")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run-id", type=optional(str), default=None,
                     help="MLflow run id of a quantization run (current MLFLOW_TRACKING_URI)")
    src.add_argument("--artifacts-dir", type=optional(Path), default=None,
                     help="a run's --output-dir instead of --run-id")
    add_paths(p, model_dir="the base Qwen2.5-VL checkpoint (default: the one the run recorded)",
              output_dir="where the checkpoint goes (default exports/<run id>, or exports/<name "
                         "of --artifacts-dir>)")
    p.add_argument("--overwrite", nargs="?", const=True, default=False, type=flag,
                   help="replace a non-empty --output-dir")
    p.add_argument("--lm-only", nargs="?", const=True, default=False, type=flag,
                   help="export the language model alone (for a model dir without vision tower)")
    p.add_argument("--allow-other-weights", nargs="?", const=True, default=False, type=flag,
                   help="accept a --model-dir whose LM weights differ from the run's (recorded)")
    p.add_argument("--log-checkpoint", nargs="?", const=True, default=False, type=flag,
                   help="also log the checkpoint files as MLflow artifacts")
    p.add_argument("--register", type=optional(str), default=None, metavar="NAME",
                   help="register the checkpoint in the MLflow Model Registry as NAME "
                        "(a LoggedModel; alias = the scheme name)")
    p.add_argument("--experiment", default=None, help=f"MLflow experiment (default {DEFAULT_EXPERIMENT})")
    p.add_argument("--no-mlflow", action="store_true", help="do not log the export to MLflow")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def options_from(args: argparse.Namespace):
    from ..exporter.inputs import ExportOptions

    out = args.output_dir or Path("exports") / (args.run_id or Path(args.artifacts_dir or "x").name)
    return ExportOptions(output_dir=out, run_id=args.run_id, artifacts_dir=args.artifacts_dir,
                         model_dir=args.model_dir, overwrite=args.overwrite, lm_only=args.lm_only,
                         allow_other_weights=args.allow_other_weights,
                         log_checkpoint=args.log_checkpoint, register=args.register,
                         experiment=args.experiment)


def _run(args: argparse.Namespace) -> int:
    from ..core.errors import Problems
    from ..core.interrupt import StopFlag, stop_on_signals
    from ..exporter.pipeline import export_run

    tracker_factory = None
    if not args.no_mlflow:
        from ..tracking import Tracker, check_reachable, source_run

        problems = Problems()
        check_reachable(problems)
        problems.raise_if_any()
        experiment = args.experiment or DEFAULT_EXPERIMENT
        launched = os.environ.get("MLFLOW_RUN_ID")
        if launched and (source_run(launched) or {}).get("status") != "RUNNING":
            del os.environ["MLFLOW_RUN_ID"]  # launched by a run already done (the demo): own run
        tracker_factory = lambda name: Tracker(experiment, name)  # noqa: E731
    with stop_on_signals(StopFlag()) as stop:
        report = export_run(options_from(args), tracker_factory, stop)
    print(f"exported {report['scheme']} to {options_from(args).output_dir}: checks passed, "
          f"KL {report['checks']['numerics']['kl_mean']:.3g}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(dashed(argv))
    configure(args.debug)
    return run_guarded(lambda: _run(args), args.debug, None)
