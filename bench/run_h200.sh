#!/usr/bin/env bash
# The ONE command on the H200 machine (see docs/PERFORMANCE.md). Needs .whl/ and .bench_data/
# from bench/prepare_device.sh. STEPS picks bench_gpu.py steps (default: all).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -c "import modelopt.torch.quantization, mlflow, datasets, pydantic, transformers, torch; \
print('imports ok: torch', torch.__version__, 'transformers', transformers.__version__)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 bench/bench_gpu.py --size 3b --data .bench_data --work /tmp/vlmbench \
  --steps "${STEPS:-driver,read,bare,peer,ext,gcoff,probe}" --out "${OUT:-bench/results}/h200.json"
