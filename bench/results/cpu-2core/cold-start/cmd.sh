#!/bin/bash
# $1 tree; evict the checkpoint, then one quick scheme run of the full-size 3B on the CPU
set -e
rm -rf /tmp/cold/out-$(basename $1)
python /work/main/bench/pagecache.py evict /tmp/xpeak/ckpt-3b 2>/dev/null
cd /tmp/cold && PYTHONPATH=$1/src exec python $1/scripts/qwen/qwen2_5_vl_3b_autoquant_fp8_schemes.py --model-dir /tmp/xpeak/ckpt-3b --calib-file /work/main/.demo/captions.txt --output-dir /tmp/cold/out-$(basename $1) --overwrite --num-calib-samples 64 --num-calib-steps 1 --num-score-steps 1 --num-eval-samples 0 --seq-len 32 --batch-size 1
