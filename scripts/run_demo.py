#!/usr/bin/env python
"""The embedded demo: build a tiny random Qwen2.5-VL checkpoint, then run the main job on it.

    python scripts/run_demo.py [--scheme-name fp8-balanced-10b]

Runs exactly the main entry point's code on the tiny checkpoint with its own generated captions
and small step counts, writing into outputs/demo-<scheme>. Under `mlflow run . -e demo` the
result is logged to that run.
"""

import argparse
import sys
from pathlib import Path

from vlm_autoquant.cli import main
from vlm_autoquant.demo import DEMO_OVERRIDES, build_demo

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scheme-name", default="fp8-balanced-10b")
    p.add_argument("--root", type=Path, default=Path(".demo"))
    args = p.parse_args()
    model_dir, captions = build_demo(args.root)
    sys.exit(main(["--scheme-name", args.scheme_name, "--model-dir", str(model_dir),
                   "--calib-file", str(captions), "--output-dir",
                   f"outputs/demo-{args.scheme_name}", *DEMO_OVERRIDES, "--overwrite"]))
