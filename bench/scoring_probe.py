"""Where calibration and scoring time goes, on one loaded LM (one process, one model load).

    python bench/scoring_probe.py CKPT CAPTIONS RESULT.json [--batch-sizes 4,8,16,32]
        [--profile] [--variants]

For each batch size (rows of 512 tokens): BF16 forward and forward+backward per batch, and
ModelOpt's calibration and scoring per batch (mtq.auto_quantize on a fresh copy, few steps), with
peak memory. --variants compares, at batch 8: gradient checkpointing on/off during scoring and
ModelOpt's FP8 CUDA extension against its eager PyTorch path. --profile runs torch.profiler over
two scoring batches and reports the CUDA time by kernel family.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from modelopt.torch.quantization import extensions  # noqa: E402
from modelopt.torch.quantization.algorithms import (  # noqa: E402
    AutoQuantizeGradientSearcher,
)

from vlm_autoquant.search import autoquant  # noqa: E402
from vlm_autoquant.plan.calib_data import load_captions, pack, split_captions  # noqa: E402
from vlm_autoquant.model.lm import load_lm, pick_device, text_config  # noqa: E402
from vlm_autoquant.plan.schemes import Scheme  # noqa: E402

CUDA = torch.cuda.is_available()
SEQ = 512


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def median_time(fn, reps: int = 3) -> float:
    fn()
    out = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return sorted(out)[len(out) // 2]


def scheme(batch: int, calib: int, score: int) -> Scheme:
    return Scheme(name="probe", description="probe", formats=["FP8_DEFAULT_CFG"],
                  effective_bits=12.0, method="gradient", num_calib_samples=1, num_calib_steps=calib,
                  num_score_steps=score, num_eval_samples=0, seq_len=SEQ, batch_size=batch, seed=0,
                  disabled_layers=["*lm_head*"])


def search_per_batch(pristine, batches, s: Scheme, workdir: Path, grad_ckpt: bool = True,
                     profile: bool = False) -> dict:
    """Calibration and scoring seconds per batch for one auto_quantize call on a fresh copy."""
    model = copy.deepcopy(pristine)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    ckpt = workdir / f"probe-{time.time_ns()}.pth"
    prof_result = {}
    real = AutoQuantizeGradientSearcher.__dict__["estimate_sensitivity_scores"]
    if profile:
        def profiled(self):
            from torch.profiler import ProfilerActivity, profile as tprofile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
            with tprofile(activities=acts) as p:
                real(self)
            prof_result["events"] = p.key_averages()
        AutoQuantizeGradientSearcher.estimate_sensitivity_scores = profiled
    try:
        _, run = autoquant.run_auto_quantize(model, s, batches[: max(s.num_calib_steps,
                                                                     s.num_score_steps)],
                                             ckpt, lambda p, stage: "", grad_checkpointing=grad_ckpt)
    finally:
        AutoQuantizeGradientSearcher.estimate_sensitivity_scores = real
    out = {"calibrate_per_batch_s": run.timings["calibrate"] / s.num_calib_steps,
           "score_per_batch_s": run.timings["score"] / s.num_score_steps,
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if CUDA else 0.0}
    if profile:
        out["profile"] = kernel_families(prof_result["events"])
    del model
    if CUDA:
        torch.cuda.empty_cache()
    return out


FAMILIES = (("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "matmul", "addmm", "mm")),
            ("attention", ("flash", "fmha", "attention", "efficient")),
            ("fp8 fake-quant casts", ("float8", "e4m3", "fake")),
            ("copy / cast", ("copy", "cast", "convert", "to_copy")),
            ("reduction", ("reduce", "sum", "max", "norm")),
            ("elementwise", ("elementwise", "vectorized", "unrolled", "mul", "add", "pow", "clamp")))


def kernel_families(events) -> dict:
    """CUDA (or CPU, without a GPU) self time by kernel family, plus the top kernels."""
    key = "self_device_time_total" if CUDA else "self_cpu_time_total"
    rows = []
    for e in events:
        t = getattr(e, key, 0) or 0
        if t > 0 and (not CUDA or e.device_type.name == "CUDA"):
            rows.append((e.key, t / 1e6, e.count))
    total = sum(t for _, t, _ in rows) or 1.0
    fam: dict[str, float] = {}
    for name, t, _ in rows:
        low = name.lower()
        label = next((f for f, keys in FAMILIES if any(k in low for k in keys)), "other")
        fam[label] = fam.get(label, 0.0) + t
    top = sorted(rows, key=lambda r: -r[1])[:15]
    return {"total_s": total, "families_s": dict(sorted(fam.items(), key=lambda kv: -kv[1])),
            "top": [{"kernel": n[:120], "s": t, "calls": c} for n, t, c in top]}


def main() -> None:
    ckpt, captions_file, result_file = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    args = sys.argv[4:]
    sizes = [4, 8, 16, 32]
    if "--batch-sizes" in args:
        sizes = [int(x) for x in args[args.index("--batch-sizes") + 1].split(",")]
    workdir = result_file.parent / "probe_work"
    workdir.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpt)
    caps = split_captions(load_captions(captions_file), 20000, 0, 0).calib
    pristine = load_lm(ckpt, text_config(ckpt), pick_device())
    extensions.get_cuda_ext_fp8.extension = None  # eager unless a variant says otherwise
    result: dict = {"seq_len": SEQ, "batch_scan": {}}
    for b in sizes:
        batches = [{k: v.to(pick_device()) for k, v in x.items()}
                   for x in pack(tok, caps, SEQ, b, 0).batches[:4]]
        if len(batches) < 4:
            continue
        b0 = batches[0]
        fwd = lambda: pristine(input_ids=b0["input_ids"], position_ids=b0["position_ids"],
                               use_cache=False).logits
        with torch.no_grad():
            t_fwd = median_time(fwd)
        emb = pristine.model.embed_tokens.weight

        def fb():
            emb.requires_grad_(True)
            with torch.enable_grad():
                logits = fwd()
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), b0["labels"][:, 1:].flatten(),
                    ignore_index=-100, reduction="sum").backward()
            emb.grad = None
            emb.requires_grad_(False)

        t_fb = median_time(fb)
        row = {"bf16_forward_s": t_fwd, "bf16_fwd_bwd_s": t_fb,
               **search_per_batch(pristine, batches, scheme(b, 2, 3), workdir)}
        tokens = b * SEQ
        row.update({f"{k[:-2]}_tokens_per_s": tokens / v for k, v in list(row.items())
                    if k.endswith("_s") and "peak" not in k})
        result["batch_scan"][b] = row
        print(f"batch {b:3d}: " + ", ".join(f"{k}={v:.4g}" for k, v in row.items()), flush=True)
    if "--variants" in args:
        batches = [{k: v.to(pick_device()) for k, v in x.items()}
                   for x in pack(tok, caps, SEQ, 8, 0).batches[:4]]
        s = scheme(8, 3, 4)
        variants = {"eager, grad ckpt on": search_per_batch(pristine, batches, s, workdir),
                    "eager, grad ckpt off": search_per_batch(pristine, batches, s, workdir, False)}
        if CUDA:
            del extensions.get_cuda_ext_fp8.extension
            t = time.perf_counter()
            ok = extensions.get_cuda_ext_fp8(raise_if_failed=False) is not None
            result["cuda_ext_load_s"] = time.perf_counter() - t
            if ok:
                variants["cuda-ext, grad ckpt on"] = search_per_batch(pristine, batches, s, workdir)
                variants["cuda-ext, grad ckpt off"] = search_per_batch(pristine, batches, s, workdir,
                                                                       False)
            extensions.get_cuda_ext_fp8.extension = None
        result["variants_batch8"] = variants
        for k, v in variants.items():
            print(f"{k:26s}: " + ", ".join(f"{a}={b:.4g}" for a, b in v.items()), flush=True)
    if "--profile" in args:
        batches = [{k: v.to(pick_device()) for k, v in x.items()}
                   for x in pack(tok, caps, SEQ, 8, 0).batches[:2]]
        for label, gc in (("grad ckpt on", True), ("grad ckpt off", False)):
            r = search_per_batch(pristine, batches, scheme(8, 1, 2), workdir, gc, profile=True)
            result.setdefault("profile_batch8", {})[label] = r
            fam = r["profile"]["families_s"]
            print(f"profile ({label}, 2 scoring batches): " +
                  ", ".join(f"{k}={v:.3f}s" for k, v in fam.items()), flush=True)
    result_file.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
