"""Full-size performance benchmark: the driver against bare ModelOpt and the BF16 floor.

On one H200 (see docs/PERFORMANCE.md for the exact command):
    python bench/bench_gpu.py --size 3b --data .bench_data --work /tmp/vlmbench
On the CPU, on the tiny model (keeps this script from rotting; numbers mean nothing):
    python bench/bench_gpu.py --size tiny --work /tmp/vlmbench-cpu --steps driver,read,bare,loadonly

Steps (comma list, default all): checkpoint (always), driver (cold then warm process of the
driver end to end), read (plain read of the LM bytes: the I/O floor), bare (bare
mtq.auto_quantize on the driver's batches + BF16 floors), peer (the driver on the 256 captions of
the hf_ptq comparison), ext (driver with the FP8 CUDA extension: cold build, then warm), gcoff
(driver with gradient checkpointing off), loadonly (a cold LM load alone: bench/load_only.py),
repeat (two more warm driver/bare pairs), roofline (bench/roofline.py on the same checkpoint:
calibration and scoring per batch against the BF16 floor, with a profile); batch16 and peer2 run
only when named.
Prints a table last and writes JSON (--out, default bench/results/<size>-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import _common  # noqa: E402
import pagecache  # noqa: E402
from _common import env_for, sh  # noqa: E402

SCRIPT = _common.SCRIPT
SCHEME = "fp8-conservative-12b"  # FP8 vs BF16 at 12 bits, lm_head off: the anchor and the peer
PEER_S = (58.7, 67.9)  # hf_ptq whole process, same captions and scheme (an H200 measurement)
ANCHOR_BARE_S = (23.8, 27.4)


def shard_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def split_ranges(ckpt: Path) -> dict[Path, dict[str, list]]:
    from vlm_autoquant.model.checkpoint import VISION_RE

    out = {}
    for f in shard_files(ckpt):
        r = pagecache.tensor_ranges(f)
        out[f] = {
            "lm": [v for k, v in r.items() if not VISION_RE.match(k)],
            "vision": [v for k, v in r.items() if VISION_RE.match(k)],
        }
    return out


def vision_residency(ckpt: Path) -> list[dict]:
    """Resident vision bytes per shard, with how far they lie past the end of the nearest LM span
    before them (read-ahead spill shows as bytes right after an LM span)."""
    out = []
    for f, parts in split_ranges(ckpt).items():
        pages = pagecache.resident_pages(f)
        lm_ends = sorted(e for _, e in parts["lm"])
        for start, end in sorted(parts["vision"]):
            got = pagecache.resident_bytes(f, [(start, end)])
            if got:
                prev = max((e for e in lm_ends if e <= start), default=None)
                last = (
                    max(
                        p
                        for p in range(start // pagecache.PAGE, (end - 1) // pagecache.PAGE + 1)
                        if pages[p] & 1
                    )
                    * pagecache.PAGE
                    + pagecache.PAGE
                )
                out.append(
                    {
                        "shard": f.name,
                        "bytes": got,
                        "tensor_offset": start,
                        "after_lm_end": None if prev is None else start - prev,
                        "resident_until": min(last, end) - (prev if prev is not None else start),
                    }
                )
    return out


def resident(ckpt: Path) -> dict:
    got = {"lm": 0, "vision": 0}
    for f, parts in split_ranges(ckpt).items():
        for part, ranges in parts.items():
            got[part] += pagecache.resident_bytes(f, ranges)
    return got


def r_lm_bytes(work: Path) -> float:
    """LM bytes of the checkpoint (the load phase's tokens/s column is bytes/s instead)."""
    from vlm_autoquant.core.errors import Problems
    from vlm_autoquant.model.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(work / "ckpt", Problems())
    return float(info.bytes_of(info.lm_keys()))


def driver(args, work: Path, name: str, extra: list[str], evict: bool = False) -> dict:
    out_dir = work / "runs" / name
    shutil.rmtree(out_dir, ignore_errors=True)
    ckpt = work / "ckpt"
    if evict:
        pagecache.evict(shard_files(ckpt))
    before = resident(ckpt)
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--scheme-name",
        SCHEME,
        "--model-dir",
        str(ckpt),
        "--calib-file",
        str(args.captions),
        "--output-dir",
        str(out_dir),
        *args.driver_args,
        *extra,
    ]
    wall = sh(cmd, env_for(work), work / f"{name}.log")
    after = resident(ckpt)
    m = json.loads((out_dir / "manifest.json").read_text())
    rec = json.loads((out_dir / "search" / "autoquant_search.json").read_text())
    steps = m["calibration"]["batches"]
    sc = m["scheme"]
    tokens_per_batch = sc["seq_len"] * sc["batch_size"]
    t = m["timings"]
    res = {
        "wall_s": wall,
        "timings": t,
        "memory": m["memory"],
        "padding_fraction": m["calibration"]["padding_fraction"],
        "calib_tokens": m["calibration"]["tokens"],
        "captions_used": m["calibration"]["captions_used"],
        "steps": steps,
        "calib_steps": min(sc["num_calib_steps"], steps),
        "score_steps": min(sc["num_score_steps"], steps),
        "fp8_groups": m["summary"]["groups_fp8"],
        "groups": m["summary"]["groups"],
        "tokens_sha256": rec["fingerprint"]["data.tokens_sha256"],
        "resident_before": before,
        "resident_after": after,
        "search": {k: m["search"].get(k) for k in ("fp8_kernel", "calibration", "scores")},
        "formats": {x["group"]: x["format"] for x in m["layers"]},
    }
    res["calibrate_per_batch_s"] = t.get("calibrate", 0) / max(res["calib_steps"], 1)
    res["score_per_batch_s"] = t.get("score", 0) / max(res["score_steps"], 1)
    res["tokens_per_s"] = {
        "calibrate": res["calib_steps"] * tokens_per_batch / t["calibrate"] if t.get("calibrate") else None,
        "score": res["score_steps"] * tokens_per_batch / t["score"] if t.get("score") else None,
        "load": r_lm_bytes(work) / t["load"] if t.get("load") else None,
    }
    res["data_captions_per_s"] = m["calibration"]["captions_packed"] / t["data"] if t.get("data") else None
    res["teardown_s"] = wall - t.get("process", wall)
    print(
        f"[{name}] wall {wall:.1f} s; phases " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()), flush=True
    )
    return res


def build_batches(args, work: Path, target: Path) -> str:
    return _common.build_batches(work / "ckpt", args.captions, SCHEME, args.driver_args, target)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["3b", "tiny"], default="3b")
    p.add_argument(
        "--data",
        type=Path,
        default=ROOT / ".bench_data",
        help="folder with qwen2_5_vl_tokenizer/ and coco2017_captions/train_sample.txt",
    )
    p.add_argument("--work", type=Path, default=Path("/tmp/vlmbench"))
    p.add_argument("--steps", default="driver,read,bare,peer,ext,gcoff,loadonly,repeat,roofline")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    steps = set(args.steps.split(","))
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = torch.cuda.is_available()
    result: dict = {
        "size": args.size,
        "scheme": SCHEME,
        "steps": sorted(steps),
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "cpus": os.cpu_count(),
        },
    }
    try:
        from importlib import metadata

        import transformers

        result["machine"].update(
            transformers=transformers.__version__, modelopt=metadata.version("nvidia-modelopt")
        )
    except Exception:  # noqa: BLE001
        pass
    ckpt = work / "ckpt"
    t = time.perf_counter()
    if not (ckpt / "config.json").exists():
        from vlm_autoquant.model.demo import build_checkpoint, make_captions

        if args.size == "3b":
            build_checkpoint(
                ckpt,
                "3b",
                "released",
                seed=0,
                tokenizer=args.data / "qwen2_5_vl_tokenizer",
                device="cuda" if cuda else "cpu",
            )
        else:
            build_checkpoint(ckpt, "tiny", "released", seed=0, tokenizer=make_captions(3000, 0))
    result["checkpoint_build_s"] = time.perf_counter() - t
    if args.size == "3b":
        args.captions = args.data / "coco2017_captions" / "train_sample.txt"
        args.driver_args = []
    else:
        args.captions = work / "captions.txt"
        from vlm_autoquant.model.demo import make_captions

        args.captions.write_text("\n".join(make_captions(3000, 0)) + "\n")
        # One 8x128 batch each for calibration and scoring: the CPU path is a smoke run.
        args.driver_args = [
            "--num-calib-samples",
            "256",
            "--num-calib-steps",
            "1",
            "--num-score-steps",
            "1",
            "--num-eval-samples",
            "32",
            "--seq-len",
            "128",
        ]
    # Bare ModelOpt keeps each projection's own scales: the driver is compared in that arithmetic
    # (sharing the fused groups' largest scale costs one pass over the groups per format).
    args.driver_args = [*args.driver_args, "--fused-scales", "per-module"]
    from vlm_autoquant.core.errors import Problems
    from vlm_autoquant.model.checkpoint import inspect_checkpoint

    info = inspect_checkpoint(ckpt, Problems())
    lm_bytes, vision_bytes = info.bytes_of(info.lm_keys()), info.bytes_of(info.vision_keys())
    result["checkpoint"] = {"lm_bytes": lm_bytes, "vision_bytes": vision_bytes}
    print(
        f"checkpoint: LM {lm_bytes / 1e9:.3f} GB, vision {vision_bytes / 1e9:.3f} GB, "
        f"built in {result['checkpoint_build_s']:.1f} s",
        flush=True,
    )

    def partial() -> None:
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "partial.json").write_text(json.dumps(result, indent=2, default=str))

    partial()
    if "driver" in steps:
        result["driver_cold"] = driver(args, work, "driver_cold", ["--fp8-kernel", "eager"], evict=True)
        result["driver_warm"] = driver(args, work, "driver_warm", ["--fp8-kernel", "eager"])
        partial()
    if "read" in steps:
        pagecache.evict(shard_files(ckpt))
        t = time.perf_counter()
        n = sum(pagecache.read_ranges(f, parts["lm"]) for f, parts in split_ranges(ckpt).items())
        dt = time.perf_counter() - t
        result["read_lm_bytes"] = {"bytes": n, "s": dt, "gb_per_s": n / dt / 1e9}
        print(f"[read] {n / 1e9:.2f} GB of LM tensors in {dt:.2f} s", flush=True)
        partial()
    if "bare" in steps:
        fp = build_batches(args, work, work / "batches.pt")
        bare = work / "bare.json"
        flags = ["--floors", "--eager"] if cuda else ["--floors"]
        wall = sh(
            [
                sys.executable,
                str(ROOT / "bench" / "bare_autoquant.py"),
                str(ckpt),
                str(work / "batches.pt"),
                str(bare),
                *flags,
            ],
            env_for(work),
            work / "bare.log",
        )
        result["bare"] = json.loads(bare.read_text()) | {"wall_s": wall, "tokens_sha256": fp}
        print(
            f"[bare] wall {wall:.1f} s: "
            + ", ".join(f"{k} {v:.3f}" for k, v in result["bare"].items() if isinstance(v, float)),
            flush=True,
        )
        partial()
    if "batch16" in steps:  # the same tokens in half as many batches of twice the rows
        result["driver_b16"] = driver(
            args,
            work,
            "driver_b16",
            [
                "--fp8-kernel",
                "eager",
                "--batch-size",
                "16",
                "--num-calib-steps",
                "16",
                "--num-score-steps",
                "8",
            ],
        )
        partial()
        result["driver_b8"] = driver(args, work, "driver_b8", ["--fp8-kernel", "eager"])
        partial()
    if "loadonly" in steps and "read" not in steps:  # the plain-read floor for the ratio
        pagecache.evict(shard_files(ckpt))
        t = time.perf_counter()
        n = sum(pagecache.read_ranges(f, parts["lm"]) for f, parts in split_ranges(ckpt).items())
        result["read_lm_bytes"] = {"bytes": n, "s": time.perf_counter() - t}
    if "loadonly" in steps:
        for label, extra in (("cold", []),):
            pagecache.evict(shard_files(ckpt))
            target = work / f"load_{label}.json"
            wall = sh(
                [sys.executable, str(ROOT / "bench" / "load_only.py"), str(ckpt), str(target), *extra],
                env_for(work),
                work / f"load_{label}.log",
            )
            res = json.loads(target.read_text()) | {
                "wall_s": wall,
                "resident": resident(ckpt),
                "vision_map": vision_residency(ckpt),
            }
            result[f"load_only_{label}"] = res
            print(f"[load_only {label}] load {res['load_s']:.2f} s, resident {res['resident']}", flush=True)
        partial()
    if "repeat" in steps:
        fp = build_batches(args, work, work / "batches.pt")
        for i in range(2):
            result[f"driver_warm_{i + 2}"] = driver(
                args, work, f"driver_warm_{i + 2}", ["--fp8-kernel", "eager"]
            )
            bare = work / f"bare_{i + 2}.json"
            wall = sh(
                [
                    sys.executable,
                    str(ROOT / "bench" / "bare_autoquant.py"),
                    str(ckpt),
                    str(work / "batches.pt"),
                    str(bare),
                    "--eager",
                ],
                env_for(work),
                work / f"bare_{i + 2}.log",
            )
            result[f"bare_{i + 2}"] = json.loads(bare.read_text()) | {"wall_s": wall, "tokens_sha256": fp}
            print(f"[bare_{i + 2}] wall {wall:.1f} s", flush=True)
            partial()
    for step, key in (("peer", "driver_peer_captions"), ("peer2", "driver_peer_captions_2")):
        if step in steps:  # peer2: the same run again, later in the command
            result[key] = driver(
                args,
                work,
                key.replace("_captions", ""),
                ["--num-calib-samples", "256", "--fp8-kernel", "eager"],
            )
            partial()
    if "ext" in steps and cuda:
        ext_dir = Path.home() / ".cache" / "torch_extensions"
        result["ext_cache_existed"] = ext_dir.exists() and any(ext_dir.rglob("*fp8*"))
        result["driver_ext_cold"] = driver(args, work, "driver_ext_cold", ["--fp8-kernel", "cuda-ext"])
        result["driver_ext_warm"] = driver(args, work, "driver_ext_warm", ["--fp8-kernel", "cuda-ext"])
        partial()
    if "gcoff" in steps:
        result["driver_gc_off"] = driver(
            args, work, "driver_gc_off", ["--grad-checkpointing", "off", "--fp8-kernel", "eager"]
        )
        partial()
    if "roofline" in steps:  # calibration and scoring per batch against the BF16 floor
        roof = work / "roofline.json"
        sh(
            [
                sys.executable,
                str(ROOT / "bench" / "roofline.py"),
                "--ckpt",
                str(ckpt),
                "--captions",
                str(args.captions),
                "--scheme",
                SCHEME,
                f"--sizes={' '.join(args.driver_args)}",
                "--work",
                str(work / "roofline"),
                "--out",
                str(roof),
                "--profile",
            ],
            env_for(work),
            work / "roofline.log",
            timeout=1200,
        )
        result["roofline"] = json.loads(roof.read_text())
        print((work / "roofline.log").read_text().split("--- stderr ---")[0], flush=True)

    summarize(result)
    out = args.out or ROOT / "bench" / "results" / f"{args.size}-{'h200' if cuda else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], out.name).write_text(out.read_text())
    print(f"wrote {out}")


def summarize(r: dict) -> None:
    """Ratios against the targets, then a table (printed last)."""
    rows: list[tuple[str, str, str]] = []
    d, dw = r.get("driver_cold"), r.get("driver_warm")
    b = r.get("bare")
    drivers = [r[k]["wall_s"] for k in ("driver_warm", "driver_warm_2", "driver_warm_3") if k in r]
    bares = [r[k]["wall_s"] - r[k].get("floors_s", 0.0) for k in ("bare", "bare_2", "bare_3") if k in r]
    if drivers and bares:
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        r["ratio_driver_over_bare_median"] = med(drivers) / med(bares)
        r["driver_warm_walls"], r["bare_walls"] = drivers, bares
        rows.append(
            (
                f"median driver / median bare ({len(drivers)} vs {len(bares)} runs)",
                f"{r['ratio_driver_over_bare_median']:.2f}",
                "<= 1.3",
            )
        )
    if dw and b:
        bare_total = b["wall_s"] - b.get("floors_s", 0.0)
        r["ratio_driver_over_bare"] = dw["wall_s"] / bare_total
        rows.append(
            ("driver / (bare auto_quantize + load), warm", f"{r['ratio_driver_over_bare']:.2f}", "<= 1.3")
        )
        same = dw["tokens_sha256"] == b["tokens_sha256"]
        rows.append(("bare ran on the driver's exact batches", str(same), "True"))
        agree = dw["fp8_groups"] == b["fp8_groups"]
        rows.append(
            (
                "same FP8 group count as bare",
                f"{dw['fp8_groups']} vs {b['fp8_groups']}",
                "equal" if agree else "differs",
            )
        )
    if "driver_peer_captions" in r:
        w = r["driver_peer_captions"]["wall_s"]
        r["ratio_driver_over_peer"] = w / PEER_S[0]
        rows.append(
            ("driver (256 captions) / peer hf_ptq 58.7 s", f"{r['ratio_driver_over_peer']:.2f}", "<= 0.5")
        )
    if d:
        rows.append(("padding fraction", f"{d['padding_fraction']:.4f}", "<= 0.10"))
        vis = d["resident_after"]["vision"] - d["resident_before"]["vision"]
        lm = d["resident_after"]["lm"] - d["resident_before"]["lm"]
        r["bytes_read"] = {"lm": lm, "vision": vis, "lm_total": r["checkpoint"]["lm_bytes"]}
        rows.append(("vision bytes read by the cold load", f"{vis}", "0 (page granularity)"))
        rows.append(("LM bytes read / LM bytes", f"{lm / r['checkpoint']['lm_bytes']:.3f}", "~1"))
    for label in ("cold", "prefetch", "no_prefetch"):  # prefetch*: an earlier, reverted variant
        lo = r.get(f"load_only_{label}")
        if lo and "read_lm_bytes" in r:
            rows.append(
                (
                    f"cold load ({label}) / plain read of LM bytes",
                    f"{lo['load_s'] / r['read_lm_bytes']['s']:.2f}",
                    "<= 1.2",
                )
            )
            rows.append(
                (
                    f"vision bytes resident after cold load ({label})",
                    f"{lo['resident']['vision']}",
                    "0 + read-ahead",
                )
            )
    if d:
        if "read_lm_bytes" in r:
            ratio = d["timings"]["load"] / r["read_lm_bytes"]["s"]
            r["ratio_load_over_read"] = ratio
            rows.append(("cold LM load / plain read of LM bytes", f"{ratio:.2f}", "<= 1.2"))
        if dw:
            rows.append(("driver cold / warm wall (s)", f"{d['wall_s']:.1f} / {dw['wall_s']:.1f}", ""))
        rows.append(
            (
                "peak GPU memory (GiB), 80 GB card headroom",
                f"{d['memory']['peak_gpu_gib']:.1f}, {80e9 / 2**30 - d['memory']['peak_gpu_gib']:.1f}",
                "report",
            )
        )
        rows.append(("peak host RSS (GiB)", f"{d['memory']['peak_rss_gib']:.1f}", "report"))
    if b and "bf16_fwd_bwd_s" in b and dw:
        rows.append(
            (
                "scoring per batch / BF16 fwd+bwd",
                f"{dw['score_per_batch_s'] / b['bf16_fwd_bwd_s']:.2f}",
                "was 5.7-5.9",
            )
        )
        rows.append(
            (
                "calibration per batch / BF16 fwd",
                f"{dw['calibrate_per_batch_s'] / b['bf16_forward_s']:.2f}",
                "was ~4",
            )
        )
    for key in ("driver_peer_captions_2",):
        if key in r:
            rows.append(
                (
                    "driver (256 captions) / peer 58.7 s, repeat",
                    f"{r[key]['wall_s'] / PEER_S[0]:.2f}",
                    "<= 0.5",
                )
            )
    for key in ("driver_b16", "driver_b8", "driver_ext_cold", "driver_ext_warm", "driver_gc_off"):
        if key in r:
            x = r[key]
            rows.append(
                (
                    f"{key}: wall / calib per batch / score per batch",
                    f"{x['wall_s']:.1f} / {x['calibrate_per_batch_s']:.3f} / {x['score_per_batch_s']:.3f}",
                    "",
                )
            )
    for kind, ratio in (r.get("roofline") or {}).get("ratios", {}).items():
        rows.append(
            (
                f"roofline {kind}: calibration / BF16 forward, per batch",
                f"{ratio['calibrate_over_bf16_forward']:.2f}",
                "<= 1.5",
            )
        )
        rows.append(
            (
                f"roofline {kind}: scoring / BF16 fwd+bwd, per batch",
                f"{ratio['score_over_bf16_fwd_bwd']:.2f}",
                "<= 1.3",
            )
        )
    r["table"] = rows
    width = max(len(a) for a, _, _ in rows) if rows else 10
    print("\n" + "-" * (width + 40))
    for a, v, target in rows:
        print(f"{a:<{width}}  {v:>22}  {target}")


if __name__ == "__main__":
    main()
