#!/usr/bin/env bash
# Run HERE (not on the GPU machine): gather what the GPU benchmarks need into two git-ignored
# folders that the device tool carries: .bench_data/ (real tokenizer + COCO captions from
# ../shared/data) and .whl/ (the wheels of bench/device-wheels.txt).
# On the GPU machine, before a benchmark, install the wheels beside the image's own packages:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared/data}
mkdir -p .bench_data/qwen2_5_vl_tokenizer .bench_data/coco2017_captions .whl
cp "$SHARED"/qwen2_5_vl_tokenizer/{tokenizer.json,tokenizer_config.json,chat_template.json} \
   .bench_data/qwen2_5_vl_tokenizer/
cp "$SHARED"/coco2017_captions/train_sample.txt .bench_data/coco2017_captions/
grep -v '^#' bench/device-wheels.txt | xargs python3 -m pip download -q --no-deps \
  --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 -d .whl
du -sh .whl .bench_data
