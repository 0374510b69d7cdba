"""Side by side in one call: ModelOpt's hf_ptq (the peer), the driver and bare mtq.auto_quantize.

The goal on an H200: driver / hf_ptq <= 0.5 and driver / bare <= 1.15, on one checkpoint, the
same 256 captions and the same search (FP8 vs BF16 at 12 bits, lm_head off). Every side is a
whole process timed from outside; the order alternates (peer, driver, bare, driver, peer) so that
drift hits both sides. The peer is hf_ptq as published (shared/peer/README.md), exported to
.peer/examples/hf_ptq/ with its recipe at .peer/fp8_at_12bits_lmhead_off.yaml.

On a CUDA machine (checkpoint built beforehand by bench_gpu.py, or here when absent):
    python bench/bench_peer.py --ckpt /tmp/vlmbench/ckpt --data .bench_data --work /tmp/vlmpeer
On the CPU (smoke run: no peer, the demo checkpoint; the numbers mean nothing):
    python bench/bench_peer.py --size tiny --work /tmp/vlmpeer-cpu --no-importtime
Prints a table last and writes JSON (--out, default bench/results/h200-peer.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BARE, ROOT, SCRIPT, build_batches, env_for, importtime_top, sh  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))
SCHEME = "fp8-conservative-12b"  # the driver's counterpart of the peer's recipe
N_CAPTIONS = 256
TINY_ARGS = [
    "--num-calib-steps",
    "1",
    "--num-score-steps",
    "1",
    "--num-eval-samples",
    "32",
    "--seq-len",
    "128",
]  # the CPU smoke run: one small batch per phase
TARGETS = {"driver/peer": 0.5, "driver/bare": 1.15}


def checkpoint(args, cuda: bool) -> tuple[Path, list[str], float]:
    """The checkpoint dir and the caption pool its first 256 captions come from (built if absent)."""
    t = time.perf_counter()
    if args.size == "tiny":
        from vlm_autoquant.model.demo import build_demo

        ckpt, captions = build_demo(args.work / "demo")
    else:
        ckpt, captions = args.ckpt, args.data / "coco2017_captions" / "train_sample.txt"
        if not (ckpt / "config.json").exists():
            from vlm_autoquant.model.demo import build_checkpoint

            build_checkpoint(
                ckpt,
                "3b",
                "released",
                seed=0,
                device="cuda" if cuda else "cpu",
                tokenizer=args.data / "qwen2_5_vl_tokenizer",
            )
    lines = [ln.strip() for ln in captions.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return ckpt, lines[:N_CAPTIONS], time.perf_counter() - t


def prebuild_extension(work: Path) -> dict:
    """Build (or load) ModelOpt's FP8 CUDA extension once, untimed, so every side finds it cached."""
    code = (
        "from modelopt.torch.quantization.extensions import get_cuda_ext_fp8 as g; "
        "assert g(raise_if_failed=True) is not None"
    )
    try:
        return {"ok": True, "s": sh([sys.executable, "-c", code], env_for(work), work / "ext.log")}
    except SystemExit as exc:
        return {"ok": False, "error": str(exc)}


def run_peer(args, work: Path, jsonl: Path, i: int) -> dict:
    export = work / f"peer_export_{i}"
    shutil.rmtree(export, ignore_errors=True)
    env = {k: v for k, v in env_for(work).items() if k != "MLFLOW_TRACKING_URI"}  # as published:
    env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")  # no tracking, not our source tree
    cmd = [
        sys.executable,
        str(args.peer / "hf_ptq.py"),
        "--pyt_ckpt_path",
        str(args.ckpt_dir),
        "--recipe",
        str(args.recipe),
        "--dataset",
        str(jsonl),
        "--calib_size",
        str(N_CAPTIONS),
        "--calib_seq",
        "512",
        "--kv_cache_qformat",
        "none",
        "--export_path",
        str(export),
    ]
    wall = sh(cmd, env, work / f"peer_{i}.log", timeout=600, cwd=work)
    shutil.rmtree(export, ignore_errors=True)
    return {"wall_s": wall}


def run_driver(
    args, work: Path, txt: Path, name: str, python_flags: tuple[str, ...] = (), src: Path = ROOT / "src"
) -> dict:
    """The driver as a user runs it; `src`: another source tree of the package (--before-src)."""
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        *python_flags,
        str(SCRIPT),
        "--scheme-name",
        SCHEME,
        "--model-dir",
        str(args.ckpt_dir),
        "--calib-file",
        str(txt),
        "--output-dir",
        str(out),
        *args.driver_args,
    ]
    wall = sh(cmd, env_for(work, src), work / f"{name}.log", timeout=600)
    m = json.loads((out / "manifest.json").read_text())
    rec = json.loads((out / "search" / "autoquant_search.json").read_text())
    fp = rec.get("fingerprint", {})
    t = m["timings"]
    res = {
        "wall_s": wall,
        "timings": t,
        "teardown_s": wall - t.get("process", wall),
        "tokens_sha256": fp.get("data.tokens_sha256") or fp.get("data", {}).get("tokens_sha256"),
        "fp8_groups": m["summary"]["groups_fp8"],
        "groups": m["summary"]["groups"],
        "split": {
            k: m["calibration"].get(k)
            for k in ("captions_packed", "captions_used", "batches", "padding_fraction")
        }
        | {"held_out": m["calibration"].get("split", {}).get("eval")},
        "fp8_kernel": (m.get("search") or {}).get("fp8_kernel"),
    }
    print(f"[{name}] wall {wall:.1f} s; " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()), flush=True)
    return res


def run_bare(args, work: Path, i: int, cuda: bool) -> dict:
    target = work / f"bare_{i}.json"
    flags = ["--eager"] if cuda and not args.ext_ok else []
    wall = sh(
        [sys.executable, str(BARE), str(args.ckpt_dir), str(work / "batches.pt"), str(target), *flags],
        env_for(work),
        work / f"bare_{i}.log",
        timeout=600,
    )
    return json.loads(target.read_text()) | {"wall_s": wall, "tokens_sha256": args.batches_fp}


def summarize(r: dict) -> list[tuple[str, str, str]]:
    sides = {}
    for side in ("peer", "driver", "before", "bare"):
        walls = [x["wall_s"] for x in r["runs"] if x["side"] == side]
        if walls:
            sides[side] = {"walls": walls, "median": statistics.median(walls), "min": min(walls)}
    r["sides"] = sides
    rows = [
        (f"{s} wall, median / min of {len(v['walls'])} (s)", f"{v['median']:.1f} / {v['min']:.1f}", "")
        for s, v in sides.items()
    ]
    r["ratios"] = {}
    for one, other in (
        ("driver", "peer"),
        ("driver", "bare"),
        ("before", "peer"),
        ("before", "bare"),
        ("driver", "before"),
    ):
        if one in sides and other in sides:
            key = f"{one}/{other}"
            med = sides[one]["median"] / sides[other]["median"]
            best = sides[one]["min"] / sides[other]["min"]
            r["ratios"][key] = {"median": med, "min": best}
            rows.append(
                (
                    f"{key}, median (min/min)",
                    f"{med:.2f} ({best:.2f})",
                    f"<= {TARGETS[key]}" if key in TARGETS else "report",
                )
            )
    drivers = [x for x in r["runs"] if x["side"] == "driver"]
    bares = [x for x in r["runs"] if x["side"] == "bare"]
    if drivers and bares:
        rows.append(
            (
                "bare ran on the driver's exact batches",
                str(drivers[0]["tokens_sha256"] == bares[0]["tokens_sha256"]),
                "True",
            )
        )
        rows.append(
            (
                "FP8 groups: driver vs bare",
                f"{drivers[0]['fp8_groups']} vs {bares[0]['fp8_groups']}",
                "report",
            )
        )
    for side in ("driver", "before"):
        runs = [x for x in r["runs"] if x["side"] == side]
        if not runs:
            continue
        phases = [k for k in runs[0]["timings"] if k not in ("run", "process")]
        for k in phases:
            rows.append(
                (
                    f"{side} phase {k} (s, median)",
                    f"{statistics.median(d['timings'].get(k, 0.0) for d in runs):.2f}",
                    "",
                )
            )
        rows.append(
            (
                f"{side} after the manifest: log + exit (s, median)",
                f"{statistics.median(d['teardown_s'] for d in runs):.2f}",
                "",
            )
        )
    if drivers:
        sp = drivers[0]["split"]
        rows.append(
            (
                "driver captions: packed / used / held out",
                f"{sp['captions_packed']} / {sp['captions_used']} / {sp['held_out']}",
                "report",
            )
        )
        rows.append(("driver FP8 kernel", str(drivers[0]["fp8_kernel"]), "report"))
    return rows


def save(r: dict, out: Path, work: Path) -> None:
    """Write the JSON; under the device tool, copy it and every log to $OUT (brought back)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=2, default=str) + "\n")
    if os.environ.get("OUT"):  # the device tool brings back at most 8 files: logs as one archive
        import tarfile

        dest = Path(os.environ["OUT"])
        if out.resolve() != (dest / out.name).resolve():
            shutil.copy(out, dest / out.name)
        with tarfile.open(dest / "peer-logs.tgz", "w:gz") as tar:
            for f in work.glob("*.log"):
                tar.add(f, arcname=f.name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=["3b", "tiny"], default="3b")
    p.add_argument(
        "--ckpt",
        type=Path,
        default=Path("/tmp/vlmbench/ckpt"),
        help="full-size checkpoint dir (built here when it has no config.json)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=ROOT / ".bench_data",
        help="folder with qwen2_5_vl_tokenizer/ and coco2017_captions/train_sample.txt",
    )
    p.add_argument("--peer", type=Path, default=ROOT / ".peer" / "examples" / "hf_ptq")
    p.add_argument("--recipe", type=Path, default=ROOT / ".peer" / "fp8_at_12bits_lmhead_off.yaml")
    p.add_argument("--work", type=Path, default=Path("/tmp/vlmpeer"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "h200-peer.json")
    p.add_argument("--no-importtime", action="store_true", help="skip the -X importtime driver run")
    p.add_argument(
        "--before-src",
        type=Path,
        default=None,
        help="the package's src/ at an earlier commit (git archive COMMIT src | tar -x "
        "-C .before): a 'before' side, timed in the same alternation",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="also run the driver and bare once each under bench/stack_sampler.py "
        "(not timed against anything; profiles written next to --out)",
    )
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    work = args.work
    import torch

    cuda = torch.cuda.is_available()
    peer = args.size == "3b"
    if peer and not (cuda and (args.peer / "hf_ptq.py").is_file() and args.recipe.is_file()):
        raise SystemExit(f"the peer needs CUDA, {args.peer}/hf_ptq.py and {args.recipe}")
    args.ckpt_dir, captions, build_s = checkpoint(args, cuda)
    jsonl, txt = work / "captions.jsonl", work / "captions.txt"
    jsonl.write_text("".join(json.dumps({"text": c}) + "\n" for c in captions), encoding="utf-8")
    txt.write_text("\n".join(captions) + "\n", encoding="utf-8")
    args.driver_args = ["--num-calib-samples", str(N_CAPTIONS), *(TINY_ARGS if not peer else [])]
    from importlib import metadata

    r: dict = {
        "size": args.size,
        "scheme": SCHEME,
        "checkpoint": str(args.ckpt_dir),
        "checkpoint_build_s": build_s,
        "captions": len(captions),
        "captions_sha256": hashlib.sha256(txt.read_bytes()).hexdigest(),
        "driver_args": args.driver_args,
        "runs": [],
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": metadata.version("transformers"),
            "modelopt": metadata.version("nvidia-modelopt"),
            "cpus": os.cpu_count(),
        },
    }
    import mlflow  # create the tracking DB untimed: a user's DB already exists

    mlflow.MlflowClient(f"sqlite:///{work / 'mlflow.db'}").search_experiments()
    r["fp8_extension"] = prebuild_extension(work) if cuda else {"ok": False, "error": "no CUDA"}
    args.ext_ok = r["fp8_extension"]["ok"]
    if cuda and not args.ext_ok:
        args.driver_args += ["--fp8-kernel", "eager"]
    args.batches_fp = build_batches(args.ckpt_dir, txt, SCHEME, args.driver_args, work / "batches.pt")
    order = ["peer", "driver", "bare", "driver", "peer"] if peer else ["driver", "bare", "driver"]
    if args.before_src is not None:  # each driver run next to a 'before' run, alternating
        order = (
            ["peer", "driver", "before", "bare", "before", "driver", "peer"]
            if peer
            else ["driver", "before", "bare", "before", "driver"]
        )
    for i, side in enumerate(order):
        if side == "peer":
            res = run_peer(args, work, jsonl, i)
        elif side in ("driver", "before"):
            res = run_driver(
                args,
                work,
                txt,
                f"{side}_{i}",
                src=args.before_src / "src" if side == "before" else ROOT / "src",
            )
        else:
            res = run_bare(args, work, i, cuda)
        r["runs"].append({"side": side, "i": i, **res})
        print(f"[{i}] {side}: {res['wall_s']:.1f} s", flush=True)
        save(r, args.out, work)  # partial results survive a time limit
    if not args.no_importtime:
        run_driver(args, work, txt, "driver_importtime", ("-X", "importtime"))
        log = (work / "driver_importtime.log").read_text().split("--- stderr ---")[-1]
        r["driver_importtime_top15"] = importtime_top(log)
    if args.profile:  # where each side's wall time goes, thread by thread (untimed runs)
        sampler = str(Path(__file__).with_name("stack_sampler.py"))
        prof = args.out.with_name(args.out.stem + "-profile-driver.json")
        run_driver(args, work, txt, "driver_profile", (sampler, "--out", str(prof), "--"))
        prof_bare = args.out.with_name(args.out.stem + "-profile-bare.json")
        flags = ["--eager"] if cuda and not args.ext_ok else []
        sh(
            [
                sys.executable,
                sampler,
                "--out",
                str(prof_bare),
                "--",
                str(BARE),
                str(args.ckpt_dir),
                str(work / "batches.pt"),
                str(work / "bare_profile.json"),
                *flags,
            ],
            env_for(work),
            work / "bare_profile.log",
            timeout=600,
        )
        r["profiles"] = [str(prof), str(prof_bare)]
    r["machine"]["device"] = torch.cuda.get_device_name() if cuda else "cpu"
    r["table"] = rows = summarize(r)
    save(r, args.out, work)
    for x in r.get("driver_importtime_top15", []):
        print(f"importtime {x['cumulative_us'] / 1e6:7.2f} s  {x['module']}")
    width = max(len(a) for a, _, _ in rows)
    print("\n" + "-" * (width + 40))
    for a, v, target in rows:
        print(f"{a:<{width}}  {v:>22}  {target}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
