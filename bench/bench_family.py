"""Qwen2.5-VL family benchmark: a random full-size checkpoint through the driver on given GPUs.

    python bench/bench_family.py --dry-run --size 72b --gpus 4          # plan only, no GPU
    python bench/bench_family.py --size 7b --gpus 0 --work /tmp/fam     # on a CUDA machine
    python bench/bench_family.py --size 32b --gpus 0,1 --tag replicas -- --parallel replicas

The GPU path builds the checkpoint (after checking the disk), runs the driver with the default
scheme, samples per-GPU utilisation and memory (pynvml, else nvidia-smi) while it runs, then
times a BF16 forward+backward on the same placement, and writes a JSON next to the printout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from transformers import Qwen2Config  # noqa: E402

from vlm_autoquant.model import demo  # noqa: E402
from vlm_autoquant.model.lm import meta_model  # noqa: E402
from vlm_autoquant.plan.memory_plan import GIB, Dims, Shape, usable  # noqa: E402
from vlm_autoquant.plan.placement import Devices, plan_run  # noqa: E402

DRIVER = ROOT / "scripts" / "qwen" / "qwen2_5_vl_3b_autoquant_fp8_schemes.py"
sys.path.insert(0, str(ROOT / "bench"))
from _common import env_for  # noqa: E402
from bench_catalog import OUTLIER_LAYER, plant_outlier  # noqa: E402

H200_GIB = 139.8  # torch's total_memory of one H200 (143,771 MiB)


def size_config(size: str) -> Qwen2Config:
    dims = demo.SIZES[size]
    text = {k: v for k, v in dims["text"].items() if k != "mrope_section"}
    text.setdefault("tie_word_embeddings", True)
    return Qwen2Config(**text)


def dry_run(size: str, n_gpus: int, gib: float, batch: int, seq: int) -> str:
    cfg = size_config(size)
    dims = Dims.from_config(cfg)
    devices = Devices(meta_model(cfg), dims, list(range(n_gpus)), usable({g: gib for g in range(n_gpus)}))
    lp, calib, score = plan_run(devices, Shape(batch, seq), 16, 8)
    head = (
        f"Qwen2.5-VL-{size.upper()} LM on {n_gpus}x {gib:.1f} GiB (usable 90%): "
        f"{dims.total_params() / 1e9:.2f}B parameters, {dims.layers} layers; default "
        f"{batch}x{seq} -> {lp.plan.batch_size}x{seq}, {calib} calibration / {score} scoring "
        "steps (same tokens)"
    )
    return head + "\n" + lp.summary(dims) + "\n" + json.dumps(lp.record(), indent=1)


class Sampler(threading.Thread):
    """Per-GPU utilisation (%) and memory used (GiB) every `period` s, via pynvml or nvidia-smi."""

    def __init__(self, gpus: list[int], period: float = 0.5):
        super().__init__(daemon=True)
        self.gpus, self.period, self.samples, self.stop = gpus, period, [], threading.Event()

    def read(self) -> list[tuple[float, float]]:
        try:
            import pynvml

            pynvml.nvmlInit()
            out = []
            for g in self.gpus:
                h = pynvml.nvmlDeviceGetHandleByIndex(g)
                out.append(
                    (
                        pynvml.nvmlDeviceGetUtilizationRates(h).gpu,
                        pynvml.nvmlDeviceGetMemoryInfo(h).used / GIB,
                    )
                )
            return out
        except Exception:  # noqa: BLE001 - no pynvml: ask nvidia-smi
            text = subprocess.run(
                [
                    "nvidia-smi",
                    "--query-gpu=index,utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                ],
                capture_output=True,
                text=True,
            ).stdout
            rows = {int(r.split(",")[0]): r.split(",") for r in text.strip().splitlines()}
            return [(float(rows[g][1]), float(rows[g][2]) / 1024) for g in self.gpus]

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), self.read()))
            time.sleep(self.period)


def bf16_step_seconds(model_dir: Path, device_map, batch: int, seq: int, steps: int = 3) -> float:
    """Seconds per BF16 forward+backward (grad checkpointing, embedding grads only: what the
    gradient search runs without its quantizers) on the same placement."""
    import torch
    import torch.nn.functional as F

    from vlm_autoquant.model.lm import load_lm, text_config

    model = load_lm(model_dir, text_config(model_dir), torch.device("cuda:0"), device_map=device_map)
    model.model.embed_tokens.weight.requires_grad_(True)
    model.gradient_checkpointing_enable({"use_reentrant": True})
    model.train()
    first = model.model.embed_tokens.weight.device
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=first)
    times = []
    for _ in range(steps + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten().to(logits.device), reduction="sum"
        )
        loss.backward()
        model.model.embed_tokens.weight.grad = None
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / steps


def gpu_run(args: argparse.Namespace) -> dict:
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / f"qwen2_5_vl_{args.size}"
    cfg = size_config(args.size)
    need = Dims.from_config(cfg).total_params() * 2 * 1.1 + 3 * GIB  # LM + vision tower
    if not (model_dir / "model.safetensors.index.json").exists():
        free = shutil.disk_usage(work).free
        if free < need:
            sys.exit(f"need ~{need / GIB:.0f} GiB free under {work}, have {free / GIB:.0f} GiB")
        t0 = time.perf_counter()
        demo.build_checkpoint(
            model_dir, args.size, tokenizer=args.data / "qwen2_5_vl_tokenizer", device="cuda"
        )
        print(f"built {model_dir} in {time.perf_counter() - t0:.0f} s", flush=True)
    plant_outlier(model_dir, OUTLIER_LAYER)  # sensible formats: that layer's gate/up stays BF16
    gpus = (
        list(range(torch.cuda.device_count()))
        if args.gpus == "all"
        else [int(x) for x in args.gpus.split(",")]
    )
    tag = f"-{args.tag}" if args.tag else ""
    out = work / f"out-{args.size}-{len(gpus)}gpu{tag}"
    cmd = [
        sys.executable,
        str(DRIVER),
        "--scheme-name",
        "fp8-balanced-10b",
        "--model-dir",
        str(model_dir),
        "--calib-file",
        str(args.data / "coco2017_captions" / "train_sample.txt"),
        "--output-dir",
        str(out),
        "--overwrite",
        "--gpus",
        ",".join(map(str, gpus)),
        *args.driver_args,
    ]
    sampler = Sampler(gpus)
    sampler.start()
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, cwd=work, env=env_for(work)).returncode
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    doc = json.loads((out / "manifest.json").read_text()) if rc == 0 else {}
    timings = doc.get("timings", {})
    t_score = timings.get("score")
    t_start = t_end = None
    if t_score:  # scoring is the window before solve; locate it by elapsed time
        t_start = sampler.samples[0][0] + sum(
            timings.get(k, 0.0) for k in ("startup", "validate", "data", "load", "calibrate", "search_setup")
        )
        t_end = t_start + t_score
    during = [s for t, s in sampler.samples if t_start and t_start <= t <= t_end]
    util = {str(g): round(sum(s[i][0] for s in during) / max(len(during), 1), 1) for i, g in enumerate(gpus)}
    peak_used = {str(g): round(max(s[i][1] for _, s in sampler.samples), 2) for i, g in enumerate(gpus)}
    scheme = doc.get("scheme", {})
    result = {
        "size": args.size,
        "gpus": gpus,
        "rc": rc,
        "process_wall_s": round(wall, 1),
        "timings": timings,
        "formats": doc.get("summary"),
        "memory_plan": doc.get("memory", {}).get("memory_plan"),
        "placement": doc.get("memory", {}).get("placement"),
        "measured_max_allocated_gib": doc.get("memory", {}).get("measured_peak_gib_per_gpu"),
        "planted_outlier_gate_up": next(
            (
                x["format"]
                for x in doc.get("layers", [])
                if x["name"] == f"model.layers.{OUTLIER_LAYER}.mlp.gate_proj"
            ),
            None,
        ),
        "fp8_layers": doc.get("summary", {}).get("fp8"),
        "kl_mean": (doc.get("quality") or {}).get("kl_mean"),
        "nvml_peak_used_gib": peak_used,
        "utilisation_during_scoring_pct": util,
        "score_s_per_batch": t_score / scheme["num_score_steps"] if t_score else None,
    }
    if rc == 0 and not args.skip_bf16:
        device_map = (doc.get("memory", {}).get("placement") or {}).get("device_map") or {"": gpus[0]}
        result["bf16_fwd_bwd_s_per_batch"] = bf16_step_seconds(
            model_dir, device_map, scheme.get("batch_size", 16), scheme.get("seq_len", 512)
        )
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", choices=sorted(demo.SIZES), default="7b")
    p.add_argument("--gpus", default="0", help='"0", "0,1", "all"; with --dry-run: a count')
    p.add_argument("--dry-run", action="store_true", help="print the plan from the config only")
    p.add_argument("--gpu-gib", type=float, default=H200_GIB, help="per-GPU memory (dry run)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--work", default="/tmp/bench_family", help="checkpoint and output directory")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--skip-bf16", action="store_true", help="skip the BF16 fwd+bwd timing")
    p.add_argument(
        "--tag",
        default="",
        help="suffix of the output dir and the JSON name, e.g. replicas (with -- --parallel replicas)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=ROOT / ".bench_data",
        help="folder with qwen2_5_vl_tokenizer/ and coco2017_captions/train_sample.txt",
    )
    p.add_argument("driver_args", nargs="*", help="extra driver flags after --")
    args = p.parse_args()
    args.data = args.data.resolve()
    if args.dry_run:
        print(dry_run(args.size, int(args.gpus), args.gpu_gib, args.batch_size, args.seq_len))
        return 0
    result = gpu_run(args)
    tag = f"-{args.tag}" if args.tag else ""
    path = Path(args.results) / f"family-{args.size}-{len(result['gpus'])}gpu{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0 if result["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
