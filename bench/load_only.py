"""Time only the driver's LM load (after the caller evicted the checkpoint from the page cache).

python bench/load_only.py CKPT RESULT.json
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch  # noqa: E402

from vlm_autoquant.model.lm import load_lm, pick_device, text_config  # noqa: E402

ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
device = pick_device()
torch.empty(1, device=device)  # CUDA context up front: not part of the load
cfg = text_config(ckpt)
t = time.perf_counter()
model = load_lm(ckpt, cfg, device)
if device.type == "cuda":
    torch.cuda.synchronize()
out.write_text(json.dumps({"load_s": time.perf_counter() - t}))
