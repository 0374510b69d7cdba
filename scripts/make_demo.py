#!/usr/bin/env python
"""Build the embedded demo: a tiny random Qwen2.5-VL checkpoint and its own caption file.

    python scripts/make_demo.py [--root .demo]

Prints the model directory and caption file it wrote.
"""

import argparse
from pathlib import Path

from vlm_autoquant.model.demo import build_demo

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(".demo"))
    args = p.parse_args()
    model_dir, captions = build_demo(args.root)
    print(f"model: {model_dir}\ncaptions: {captions}")
