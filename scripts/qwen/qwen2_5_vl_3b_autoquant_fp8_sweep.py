#!/usr/bin/env python
"""Sweep catalog schemes on one Qwen2.5-VL-3B LM, scoring once per shareable group.

    python scripts/qwen/qwen2_5_vl_3b_autoquant_fp8_sweep.py --model-dir DIR --output-dir DIR \
        [--schemes fp8-all-8b,fp8-balanced-10b]

Without --model-dir it runs the embedded demo. One MLflow parent run (comparison table, Pareto
figure) with a nested child run per scheme (same params, metrics and artifacts as a single run).
"""

import sys

from vlm_autoquant.cli import sweep_main

if __name__ == "__main__":
    sys.exit(sweep_main())
