#!/usr/bin/env python
"""The embedded demo: build a tiny random Qwen2.5-VL checkpoint, then run the main job on it.

    python scripts/run_demo.py [--scheme-name fp8-balanced-10b] [--root .demo]

The same as the `vlm-autoquant-demo` console command: runs exactly the main entry point's code on
the tiny checkpoint (built under --root) with its own generated captions and small step counts,
writing into outputs/demo-<scheme>, both relative to the current directory. Under
`mlflow run . -e demo` the result is logged to that run.
"""

import sys

from vlm_autoquant.cli import demo_main

if __name__ == "__main__":
    sys.exit(demo_main())
