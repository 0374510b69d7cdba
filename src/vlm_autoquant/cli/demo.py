"""The demo command: build the tiny demo checkpoint, quantize it, export the run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .. import api
from . import handoff
from .common import (
    _check_dependencies_first,
    _check_names_first,
    add_experiment,
    configure,
    dashed,
    new_parser,
    run_guarded,
    run_kwargs,
)
from .export import exported
from .main import main_parser, quantized_line

log = logging.getLogger("vlm_autoquant")


DEMO_HELP = (
    "The embedded demo: build a tiny random Qwen2.5-VL checkpoint and its own captions "
    "under --root, run the main entry point on it with small step counts (into "
    "outputs/demo-<scheme>), then export that run (into exports/demo-<scheme>); paths "
    "relative to the current directory. Other flags are passed on to the main entry point."
)


def demo_parser() -> argparse.ArgumentParser:
    p = new_parser("vlm-autoquant-demo", DEMO_HELP)
    p.add_argument(
        "--scheme-name",
        default=api.DEFAULT_SCHEME,
        help=f"scheme from the catalog (default {api.DEFAULT_SCHEME})",
    )
    add_experiment(p)
    p.add_argument(
        "--root",
        type=Path,
        default=Path(".demo"),
        help="where the demo checkpoint and captions are built (default .demo)",
    )
    p.add_argument(
        "--no-export",
        action="store_true",
        help="stop after quantizing (skip the export to exports/demo-<scheme>)",
    )
    return p


def demo_main(argv: list[str] | None = None) -> int:
    """`vlm-autoquant-demo` and scripts/run_demo.py: build the demo, quantize it, export it."""
    args, rest = demo_parser().parse_known_args(dashed(argv))
    args.scheme_name = args.scheme_name or api.DEFAULT_SCHEME  # MLproject may pass ""
    rest += ["--experiment", args.experiment] if args.experiment else []
    debug = "--debug" in rest
    configure(debug)
    code = _check_dependencies_first(debug)
    if code:
        return code
    given = main_parser().parse_args(["--scheme-name", args.scheme_name, "--model-dir", "-", *rest])
    _check_names_first(given, [args.scheme_name])  # before the checkpoint is built
    out = Path(f"outputs/demo-{args.scheme_name}")
    return run_guarded(
        lambda: _demo(args, given, out), debug, out, experiment=args.experiment, run_name=args.scheme_name
    )


def _demo(args: argparse.Namespace, given: argparse.Namespace, out: Path) -> int:
    from ..model.demo import DEMO_OVERRIDES, build_demo  # torch: after the checks

    model_dir, captions = build_demo(args.root)
    kwargs = {**run_kwargs(given), "overwrite": True}
    kwargs.update({k: v for k, v in DEMO_OVERRIDES.items() if kwargs.get(k) is None})
    done = api.quantize(model_dir, args.scheme_name, output_dir=out, calib_file=captions, **kwargs)
    print(quantized_line(args.scheme_name, done, model_dir), flush=True)
    if args.no_export:
        return 0
    log.info("demo: exporting %s to a Qwen2.5-VL FP8 checkpoint in exports/demo-%s", out, args.scheme_name)
    made = api.export(
        out,
        model_dir=model_dir,
        output_dir=f"exports/demo-{args.scheme_name}",
        overwrite=True,
        experiment=args.experiment,
    )
    print(handoff.line(exported(made), made.run_id, made.experiment, made.output_dir), flush=True)
    return 0
