import sys, time
t0 = time.perf_counter()
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from vlm_autoquant.model import prefetch
th = prefetch.start(Path("/tmp/xpeak/ckpt-3b")) if sys.argv[1] == "on" else None
import torch
from transformers import Qwen2ForCausalLM
t1 = time.perf_counter()
import modelopt.torch.quantization
t2 = time.perf_counter()
# then read every LM byte, as the load would
for path, s, e in prefetch.lm_ranges(Path("/tmp/xpeak/ckpt-3b")):
    with open(path, "rb", buffering=0) as f:
        f.seek(s); left = e - s
        while left:
            n = len(f.read(min(64 << 20, left))); left -= n
t3 = time.perf_counter()
print(sys.argv[1], f"imports {t1-t0:.2f} modelopt {t2-t1:.2f} read {t3-t2:.2f} total {t3-t0:.2f}")
