"""The demo command: build the tiny demo checkpoint, quantize it, export the run."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .common import _check_dependencies_first, _check_names_first, configure, dashed, new_parser
from .export import main as export_main
from .main import main, main_parser

log = logging.getLogger("vlm_autoquant")


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
    from ..model.demo import DEMO_OVERRIDES, build_demo

    model_dir, captions = build_demo(args.root)
    out = f"outputs/demo-{args.scheme_name}"
    code = main(["--scheme-name", args.scheme_name, "--model-dir", str(model_dir),
                 "--calib-file", str(captions), "--output-dir", out, *DEMO_OVERRIDES,
                 "--overwrite", *rest])
    if code or args.no_export:
        return code
    log.info("demo: exporting %s to a Qwen2.5-VL FP8 checkpoint in exports/demo-%s", out,
             args.scheme_name)
    return export_main(["--artifacts-dir", out, "--model-dir", str(model_dir), "--output-dir",
                        f"exports/demo-{args.scheme_name}", "--overwrite",
                        *(["--debug"] if debug else [])])
