"""The library floor: bare `mtq.auto_quantize` on exactly the batches the driver built.

Run as its own process (imports counted, like the driver's):
    python bench/bare_autoquant.py CKPT BATCHES.pt RESULT.json [--floors]

It loads the LM the plain way (`Qwen2ForCausalLM.from_pretrained` with the VL text config), then
(with --floors) times a BF16 forward and forward+backward of one batch, then runs auto_quantize
with the same formats, budget, disabled layers, cost exclusion, loss and step counts as the
driver's scheme. No data loading, evaluation, saving or tracking. It imports nothing from
vlm_autoquant, on purpose: a floor that shared the driver's code would share its overheads.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()
import json  # noqa: E402
import sys  # noqa: E402

import modelopt.torch.quantization as mtq  # noqa: E402
import modelopt.torch.quantization.model_quant as mq  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

T_IMPORT = time.perf_counter() - T0


CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def cuda_time(fn, reps: int = 3) -> float:
    """Median seconds of `fn` (warm: one untimed call first); CUDA events on the GPU."""
    fn()
    times = []
    for _ in range(reps):
        sync()
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            sync()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ckpt, batches_file, result_file = sys.argv[1:4]
    floors = "--floors" in sys.argv
    eager = "--eager" in sys.argv
    t = time.perf_counter()
    vl = AutoConfig.from_pretrained(ckpt)
    fields = vl.text_config.to_dict()
    for k in ("model_type", "architectures", "dtype", "torch_dtype", "transformers_version"):
        fields.pop(k, None)
    rope = dict(fields.get("rope_parameters") or {})
    rope.pop("mrope_section", None)
    rope.pop("type", None)
    rope["rope_type"] = "default"
    fields.update(rope_parameters=rope, tie_word_embeddings=vl.tie_word_embeddings, use_cache=False)
    model = Qwen2ForCausalLM.from_pretrained(
        ckpt, config=Qwen2Config(**fields), dtype=torch.bfloat16, device_map={"": DEVICE}
    )
    model.requires_grad_(False).eval()
    sync()
    t_load = time.perf_counter() - t
    saved = torch.load(batches_file, weights_only=True)
    batches = [{k: v.to(DEVICE) for k, v in b.items()} for b in saved["batches"]]
    cfg = saved["scheme"]
    out = {"import_s": T_IMPORT, "load_s": t_load, "batch_shape": list(batches[0]["input_ids"].shape)}

    def fwd(m, b):
        return m(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits

    def loss(logits, b):
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            b["labels"][:, 1:].flatten(),
            ignore_index=-100,
            reduction="sum",
        )

    if floors:
        t_floor = time.perf_counter()
        b0 = batches[0]
        emb = model.model.embed_tokens.weight

        def fb():
            emb.requires_grad_(True)
            with torch.enable_grad():
                loss(fwd(model, b0), b0).backward()
            emb.grad = None
            emb.requires_grad_(False)

        with torch.no_grad():
            out["bf16_forward_s"] = cuda_time(lambda: fwd(model, b0))
        out["bf16_fwd_bwd_s"] = cuda_time(fb)
        model.gradient_checkpointing_enable({"use_reentrant": True})
        model.train()
        out["bf16_fwd_bwd_gc_s"] = cuda_time(fb)
        model.gradient_checkpointing_disable()
        model.eval()
        n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        tokens = b0["input_ids"].numel()
        out["linear_tflops_forward"] = 2 * n * tokens / out["bf16_forward_s"] / 1e12
        out["floors_s"] = time.perf_counter() - t_floor  # subtracted from the bare total
    if eager:
        from modelopt.torch.quantization import extensions

        extensions.get_cuda_ext_fp8.extension = None
    phase = {"calibrate": 0.0}
    real_calibrate = mq.calibrate

    def timed_calibrate(*a, **k):
        t1 = time.perf_counter()
        try:
            return real_calibrate(*a, **k)
        finally:
            sync()
            phase["calibrate"] += time.perf_counter() - t1

    mq.calibrate = timed_calibrate
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    constraints = {"effective_bits": cfg["effective_bits"]}
    if cfg["cost_excluded_layers"]:
        constraints["cost"] = {"excluded_module_name_patterns": cfg["cost_excluded_layers"]}
    model, state = mtq.auto_quantize(
        model,
        constraints=constraints,
        quantization_formats=cfg["formats"],
        data_loader=batches,
        forward_step=fwd,
        loss_func=loss,
        disabled_layers=cfg["disabled_layers"],
        num_calib_steps=cfg["num_calib_steps"],
        num_score_steps=cfg["num_score_steps"],
        method="gradient",
        verbose=False,
    )
    sync()
    out["auto_quantize_s"] = time.perf_counter() - t
    out["calibrate_s"] = phase["calibrate"]
    out["score_and_solve_s"] = out["auto_quantize_s"] - phase["calibrate"]
    out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0
    out["fp8_groups"] = sum("NONE" not in str(r) for r in state["best"]["recipe"].values())
    out["groups"] = len(state["best"]["recipe"])
    out["formats"] = {k: str(v).split("(")[0] for k, v in state["best"]["recipe"].items()}
    out["total_s"] = time.perf_counter() - T0
    with open(result_file, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
