#!/usr/bin/env python
"""Export a quantization run as a complete, verified Qwen2.5-VL FP8 checkpoint.

    python scripts/qwen/qwen2_5_vl_3b_autoquant_fp8_export.py --run-id RUN \
        --model-dir /models/Qwen2.5-VL-3B-Instruct --output-dir exports/balanced

Run with --help for every flag. Serve the result with vLLM (quantization="modelopt").
"""

import sys

from vlm_autoquant.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
