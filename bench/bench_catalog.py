"""The whole catalog at full size: every scheme alone, the catalog sweep, the gradient-family sweep.

On one H200 (docs/PERFORMANCE.md has the exact command and the results):
    python bench/bench_catalog.py --size 3b --data .bench_data --work /tmp/vlmcat
On the CPU, on the tiny model (keeps the script from rotting; the numbers mean nothing):
    python bench/bench_catalog.py --size tiny --work /tmp/vlmcat-cpu

Timed side by side, one after the other on an otherwise idle GPU, each a fresh process with its
own output dir and MLflow store: (1) one scheme (fp8-balanced-10b), (2) the whole catalog as one
sweep, (3) the five non-kl_div schemes as one sweep. Then every other catalog scheme runs alone
(untimed for the ratios, `--parallel` at a time) to show each one completes.

A planted outlier (one RMSNorm channel x1e6, the matching gate/up weight columns /1e6: the same
BF16 function) gives the scores something real to find: every scheme above the minimum must keep
that layer's gate/up group in BF16.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from _common import env_for, sh  # noqa: E402

SINGLE = ROOT / "scripts" / "qwen" / "qwen2_5_vl_3b_autoquant_fp8_schemes.py"
SWEEP = ROOT / "scripts" / "qwen" / "qwen2_5_vl_3b_autoquant_fp8_sweep.py"
ANCHOR = "fp8-balanced-10b"
OUTLIER_LAYER, OUTLIER_CHANNEL, OUTLIER_SCALE = 5, 7, 1e6


def build(args) -> tuple[Path, Path]:
    """The checkpoint (random, released layout, planted outlier) and the caption file."""
    from vlm_autoquant.model.demo import build_checkpoint, build_demo

    ckpt = args.work / "ckpt"
    if args.size == "tiny":
        ckpt, captions = build_demo(args.work / "demo")
    else:
        captions = args.data / "coco2017_captions" / "train_sample.txt"
        if not (ckpt / "config.json").exists():
            build_checkpoint(
                ckpt,
                args.size,
                "released",
                seed=0,
                tokenizer=args.data / "qwen2_5_vl_tokenizer",
                device=args.build_device,
            )
    plant_outlier(ckpt, OUTLIER_LAYER if args.size != "tiny" else 1)
    return ckpt, captions


def plant_outlier(ckpt: Path, layer: int) -> None:
    """Scale one post-attention RMSNorm channel up and gate/up's matching column down."""
    import torch
    from safetensors.torch import load_file, save_file

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    pre = f"model.layers.{layer}."
    keys = {
        "norm": pre + "post_attention_layernorm.weight",
        "gate": pre + "mlp.gate_proj.weight",
        "up": pre + "mlp.up_proj.weight",
    }
    marker = ckpt / "planted_outlier.json"
    if marker.exists():
        return
    for shard in sorted({index[k] for k in keys.values()}):
        tensors = load_file(ckpt / shard)
        with torch.no_grad():
            for role, key in keys.items():
                if key in tensors:
                    t = tensors[key].float()
                    if role == "norm":
                        t[OUTLIER_CHANNEL] *= OUTLIER_SCALE
                    else:
                        t[:, OUTLIER_CHANNEL] /= OUTLIER_SCALE
                    tensors[key] = t.to(torch.bfloat16)
        save_file(tensors, str(ckpt / shard), metadata={"format": "pt"})
    marker.write_text(json.dumps({"layer": layer, "channel": OUTLIER_CHANNEL, "scale": OUTLIER_SCALE}))


SRC_TREE = [ROOT / "src"]  # the driver's source tree (--src: another checkout's, for before/after)


def run(cmd: list[str], work: Path, name: str) -> dict:
    out = work / name
    wall = sh(
        [sys.executable, *map(str, cmd), "--output-dir", str(out / "out")],
        env_for(out, SRC_TREE[0]),
        out / "log.txt",
        cwd=out,
    )
    manifests = {p.parent.name: json.loads(p.read_text()) for p in (out / "out").rglob("manifest.json")}
    peak = max((m["memory"]["peak_gpu_gib"] for m in manifests.values()), default=0.0)
    print(f"[{name}] {wall:.1f} s, peak GPU {peak:.1f} GiB, {len(manifests)} scheme(s)", flush=True)
    return {"wall_s": wall, "peak_gpu_gib": peak, "schemes": summarise(manifests)}


def summarise(manifests: dict[str, dict]) -> dict:
    out = {}
    for name, m in manifests.items():
        layer = OUTLIER_LAYER if m["summary"]["layers"] > 100 else 1
        planted = next(
            (x["format"] for x in m["layers"] if x["name"] == f"model.layers.{layer}.mlp.gate_proj"), None
        )
        out[m["scheme"]["name"]] = {
            "target_bits": m["effective_bits"]["target"],
            "achieved_bits": m["effective_bits"]["achieved"],
            "fp8": m["summary"]["fp8"],
            "bf16": m["summary"]["bf16"],
            "kl_mean": (m["quality"] or {}).get("kl_mean"),
            "predicted_loss": m["search"].get("predicted_loss"),
            "scores": m["search"]["scores"],
            "planted_outlier_gate_up": planted,
            "layer_scores": {x["name"]: x["scores"] for x in m["layers"]},
            "layer_formats_sha256": hashlib.sha256(
                json.dumps([(x["name"], x["format"], x.get("quant_config")) for x in m["layers"]]).encode()
            ).hexdigest(),
            "timings": m["timings"],
            "peak_gpu_gib": m["memory"]["peak_gpu_gib"],
            "placement_mode": ((m["memory"].get("placement") or {}).get("mode")),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["3b", "tiny"], default="3b")
    p.add_argument("--data", type=Path, default=ROOT / ".bench_data")
    p.add_argument("--work", type=Path, default=Path("/tmp/vlmcat"))
    p.add_argument("--parallel", type=int, default=3, help="schemes run alone at a time")
    p.add_argument("--build-device", default="cuda")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "h200-catalog.json")
    p.add_argument("--sizes", default="", help="extra size flags for every run (CPU smoke)")
    p.add_argument(
        "--tag",
        default="",
        help="suffix of the run folders (a second pass over the same --work, e.g. with other --sizes)",
    )
    p.add_argument("--steps", default="single,sweep_all,sweep_gradient,alone", help="which runs (comma list)")
    p.add_argument(
        "--alone", default="", help="schemes to run alone (comma list; default: all but the anchor)"
    )
    p.add_argument(
        "--src", type=Path, default=SRC_TREE[0], help="the driver's source tree (default: this one)"
    )
    p.add_argument(
        "--compare-to",
        type=Path,
        default=None,
        help="an earlier result JSON: print, per scheme, whether every layer's format is the same "
        "and the largest relative score difference (speed work must change neither)",
    )
    args = p.parse_args()
    SRC_TREE[0] = args.src.resolve()
    args.data, args.work = args.data.resolve(), args.work.resolve()
    from vlm_autoquant.plan.schemes import default_catalog, load_catalog

    t0 = time.perf_counter()
    ckpt, captions = build(args)
    build_s = time.perf_counter() - t0
    common = ["--model-dir", ckpt, "--calib-file", captions, *args.sizes.split()]
    catalog = list(load_catalog(default_catalog()))
    gradient = [n for n, s in load_catalog(default_catalog()).items() if s.method == "gradient"]
    r = {"size": args.size, "build_s": build_s, "catalog": catalog}
    steps = args.steps.split(",")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def partial() -> None:  # what ran survives a time limit
        args.out.write_text(json.dumps(r, indent=2) + "\n")

    if "single" in steps:
        r["single"] = run([SINGLE, "--scheme-name", ANCHOR, *common], args.work, "single" + args.tag)
        partial()
    if "sweep_all" in steps:
        r["sweep_all"] = run([SWEEP, *common], args.work, "sweep_all" + args.tag)
        partial()
    if "sweep_gradient" in steps:
        r["sweep_gradient"] = run(
            [SWEEP, "--schemes", ",".join(gradient), *common], args.work, "sweep_gradient" + args.tag
        )
        partial()
    rest = (
        [n for n in args.alone.split(",") if n in catalog]
        if args.alone
        else [n for n in catalog if n != ANCHOR]
    )
    if "alone" in steps:
        with ThreadPoolExecutor(args.parallel) as pool:
            alone = list(
                pool.map(
                    lambda n: (
                        n,
                        run([SINGLE, "--scheme-name", n, *common], args.work, f"alone-{n}{args.tag}"),
                    ),
                    rest,
                )
            )
        r["alone"] = dict(alone)
    r["ratios"] = {}
    for k in (k for k in ("sweep_all", "sweep_gradient") if k in r and "single" in r):
        r["ratios"][f"{k}_over_single"] = r[k]["wall_s"] / r["single"]["wall_s"]
        r["ratios"][f"{k}_peak_over_single"] = r[k]["peak_gpu_gib"] / max(r["single"]["peak_gpu_gib"], 1e-9)
    swept = r.get("sweep_all") or r.get("sweep_gradient") or {"schemes": {}}
    key = "layer_formats_sha256"  # every layer's format, not just the count
    same = {
        n: r["alone"][n]["schemes"][n][key] == swept["schemes"][n][key]
        for n in rest
        if n in r.get("alone", {}) and n in swept["schemes"]
    }
    if ANCHOR in swept["schemes"] and "single" in r:
        same[ANCHOR] = r["single"]["schemes"][ANCHOR][key] == swept["schemes"][ANCHOR][key]
    r["alone_equals_sweep_layer_formats"] = same
    partial()
    print(f"\n{'run':28}{'wall s':>9}{'peak GiB':>10}")
    for key in (k for k in ("single", "sweep_all", "sweep_gradient") if k in r):
        print(f"{key:28}{r[key]['wall_s']:>9.1f}{r[key]['peak_gpu_gib']:>10.1f}")
    for n, v in r.get("alone", {}).items():
        print(f"{'alone ' + n:28}{v['wall_s']:>9.1f}{v['peak_gpu_gib']:>10.1f}  (parallel)")
    for k, v in r["ratios"].items():
        print(f"{k:40}{v:>7.2f}")
    print(
        "per scheme (sweep): "
        + "; ".join(
            f"{n}: {s['achieved_bits']:.3f} bits, {s['fp8']} FP8, KL {s['kl_mean']:.3g}, "
            f"outlier {s['planted_outlier_gate_up']}"
            for n, s in swept["schemes"].items()
        )
    )
    print(f"alone == sweep (every layer's format): {same}")
    if args.compare_to:
        r["compared_to"] = compare(json.loads(args.compare_to.read_text()), r)
        partial()
    print(f"wrote {args.out}")


def _schemes(result: dict) -> dict:
    """Every scheme's summary in a result: the sweeps' first, then the single and alone runs."""
    out: dict = {}
    for key in ("sweep_all", "sweep_gradient", "single"):
        out.update({n: s for n, s in (result.get(key) or {}).get("schemes", {}).items() if n not in out})
    for v in (result.get("alone") or {}).values():
        out.update({n: s for n, s in v["schemes"].items() if n not in out})
    return out


def compare(before: dict, after: dict) -> dict:
    """Per scheme in both: same formats (hash of every layer's format) and the largest relative
    difference of any layer's score for any candidate."""
    a, b = _schemes(before), _schemes(after)
    out = {}
    for name in sorted(a.keys() & b.keys()):
        worst = 0.0
        for layer, scores in a[name].get("layer_scores", {}).items():
            for cand, x in scores.items():
                y = b[name].get("layer_scores", {}).get(layer, {}).get(cand)
                if y is None:
                    worst = float("inf")
                elif x != y:
                    worst = max(worst, abs(x - y) / max(abs(x), abs(y)))
        same = a[name]["layer_formats_sha256"] == b[name]["layer_formats_sha256"]
        out[name] = {"same_formats": same, "max_rel_score_diff": worst}
        print(f"compare {name:28} formats {'same' if same else 'DIFFER'}, max rel score diff {worst:.2e}")
    return out


if __name__ == "__main__":
    main()
