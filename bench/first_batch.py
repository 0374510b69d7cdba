"""What a cold process's first BF16 batches cost beyond the rest, and what removes it.

    python bench/first_batch.py MODE CHECKPOINT OUT.json [--no-cudnn-sdpa]

In one fresh process on one GPU: import torch and the LM's transformers code, load the LM of
CHECKPOINT (a full-size random 3B from `vlm_autoquant.model.demo.build_checkpoint`), then time two
BF16 forwards and two BF16 forward+backwards (gradient checkpointing on, reentrant, the
embeddings' weight the only one with a gradient, as ModelOpt's scoring runs it) of one 16x512
batch of random tokens. MODE:
  plain        load, then the timed batches;
  tiny         a 1x64 forward and forward+backward right after the load, then the timed batches;
  import-only  import ModelOpt and the search's modules first, then load and time;
  thread       load and run the full-size batches once in a thread while this thread imports
               ModelOpt and the search's modules, then time;
  thread-si    as thread, with Python's thread switch interval at 0.5 ms during the overlap.
--no-cudnn-sdpa turns off PyTorch's cuDNN attention backend first
(`torch.backends.cuda.enable_cudnn_sdp(False)`: scaled_dot_product_attention then takes
FlashAttention), recorded as "cudnn_sdpa" in the JSON.
Prints and writes each step's seconds (a CUDA sync ends each). Without a GPU it runs on the CPU
(the smoke test). No dependency beyond the package.
"""

from __future__ import annotations

import json
import sys
import threading
import time

T0 = time.perf_counter()

from pathlib import Path  # noqa: E402 - the clock starts before torch is imported

import torch  # noqa: E402

MODES = ("plain", "tiny", "import-only", "thread", "thread-si")


def main() -> None:
    args = [a for a in sys.argv[1:] if a != "--no-cudnn-sdpa"]
    mode, ck, out = args[0], Path(args[1]), args[2]
    if mode not in MODES:
        raise SystemExit(f"MODE must be one of {', '.join(MODES)}")
    cudnn_sdpa = "--no-cudnn-sdpa" not in sys.argv
    torch.backends.cuda.enable_cudnn_sdp(cudnn_sdpa)
    t: dict = {"mode": mode, "cudnn_sdpa": cudnn_sdpa, "import_torch": round(time.perf_counter() - T0, 3)}

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # CPU: the smoke test

    def synchronize() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def lap(name: str, t0: float, sync: bool = True) -> None:
        if sync:
            synchronize()
        t[name] = round(time.perf_counter() - t0, 4)
        print(name, t[name], flush=True)

    from vlm_autoquant.core import lean_imports

    lean_imports.install()
    from vlm_autoquant.model.lm import load_lm, text_config

    cfg = text_config(ck)
    t["import_lm"] = round(time.perf_counter() - T0, 3)
    seed = torch.Generator().manual_seed(0)
    ids_cpu = torch.randint(0, min(150000, cfg.vocab_size), (16, 512), generator=seed)

    def fwdbwd(model, ids) -> None:
        model.gradient_checkpointing_enable({"use_reentrant": True})
        model.train()
        emb = model.get_input_embeddings().weight
        emb.requires_grad_(True)
        logits = model(input_ids=ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum"
        ).backward()
        emb.grad = None
        emb.requires_grad_(False)
        model.gradient_checkpointing_disable()
        model.eval()

    def warm(model, ids) -> None:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False).logits.sum().item()
        fwdbwd(model, ids)
        synchronize()

    box: dict = {}

    def load_and_warm(shape: tuple[int, int] | None) -> None:
        s = time.perf_counter()
        m = load_lm(ck, cfg, dev)
        synchronize()
        box["load"] = round(time.perf_counter() - s, 3)
        s = time.perf_counter()
        if shape:
            warm(m, ids_cpu[: shape[0], : shape[1]].to(dev))
        box["warm"] = round(time.perf_counter() - s, 3)
        box["model"] = m

    if mode in ("thread", "thread-si", "import-only"):
        if mode == "thread-si":
            sys.setswitchinterval(0.0005)
        th = None
        if mode != "import-only":
            th = threading.Thread(target=load_and_warm, args=((16, 512),))
            th.start()
        s = time.perf_counter()
        import modelopt.torch.quantization  # noqa: F401

        import vlm_autoquant.run.pipeline  # noqa: F401

        lap("import_modelopt", s, sync=False)
        s = time.perf_counter()
        if th:
            th.join()
        else:
            load_and_warm(None)
        lap("join", s)
        sys.setswitchinterval(0.005)
    else:
        s = time.perf_counter()
        load_and_warm((1, 64) if mode == "tiny" else None)
        lap("load_warm", s)
    model = box.pop("model")
    t.update({"bg_" + k: v for k, v in box.items()})
    ids = ids_cpu.to(dev)
    for i in range(2):
        s = time.perf_counter()
        with torch.no_grad():
            model(input_ids=ids, use_cache=False).logits.float().mean().item()
        lap(f"fwd{i}", s)
    for i in range(2):
        s = time.perf_counter()
        fwdbwd(model, ids)
        lap(f"fwdbwd{i}", s)
    t["total"] = round(time.perf_counter() - T0, 3)
    print(json.dumps(t), flush=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(t, f, indent=1)


if __name__ == "__main__":
    main()
