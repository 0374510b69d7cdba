#!/usr/bin/env python
"""AutoQuantize the Qwen2.5-VL-3B language model to per-layer FP8/BF16 for one catalog scheme.

    python scripts/qwen/qwen2_5_vl_3b_autoquant_fp8_schemes.py \
        --scheme-name fp8-balanced-10b --model-dir DIR --output-dir DIR

Run with --help for every flag, the artifacts and the MLflow metric names.
"""

import sys

from vlm_autoquant.cli import main

if __name__ == "__main__":
    sys.exit(main())
