"""A change to the search against a base tree, in one call: whole runs in turn, formats, roofline.

Here, before the device call (the base's source goes with the working tree):
    git archive <base commit> src configs scripts | tar -x -C .bench_data/base
On the GPU machine (after docs/PERFORMANCE.md's setup lines), one call:
    python bench/ab_search.py --base .bench_data/base/src --work /tmp/ab --out /tmp/ab/out
    tar czf $OUT/ab.tgz -C /tmp/ab/out .   # the device returns at most 8 files
On the CPU (smoke run: the tiny demo, one pair; the numbers mean nothing):
    python bench/ab_search.py --size tiny --base src --work /tmp/ab-cpu --out /tmp/ab-cpu/out \
        --pairs 1 --sizes="--num-calib-steps 1 --num-score-steps 1"

Steps (--steps, in this order; each result is written as soon as it exists, so a call cut short
keeps what ran):
  single    --pairs pairs of one-scheme runs (`bench_catalog.py --steps single`, fp8-balanced-10b),
            this tree and the base in turn, the first of each pair alternating;
  sweep     the whole catalog as one sweep, this tree then the base, the base's compared with
            this tree's layer by layer (`--compare-to`: formats and scores);
  roofline  `roofline.py` on this tree (driver, checkpointing on and off).
`summary.json` holds each run's wall seconds and phases, the medians, this tree ÷ the base, and
whether every layer's format is the same in both trees (the anchor scheme alone, and every
catalog scheme in the sweep). Each run's own log (phase and batch lines) is copied beside the
JSON as `<run>.run.txt`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from _common import sh  # noqa: E402

PHASES = ("startup", "validate", "import", "load", "calibrate", "score", "search_setup", "evaluate", "save")


def _catalog(args, steps: str, tag: str, base: bool, out: Path, *extra: str) -> dict:
    """One `bench_catalog.py` process (its own runs as fresh processes); its result JSON."""
    cmd = [sys.executable, str(ROOT / "bench" / "bench_catalog.py"), "--size", args.size]
    cmd += ["--data", str(args.data), "--work", str(args.work), "--steps", steps, f"--tag={tag}"]
    cmd += ["--out", str(out), f"--sizes={args.sizes}", "--build-device", args.build_device, *extra]
    if base:
        cmd += ["--src", str(args.base)]
    try:
        sh(cmd, log=out.with_suffix(".log"), timeout=3600)  # raises SystemExit if it fails
    finally:  # each run's own log (its phase and batch lines) beside the JSON, failed runs too
        for run_log in args.work.glob(f"*{tag}/log.txt"):
            shutil.copyfile(run_log, args.out / f"{run_log.parent.name}.run.txt")
    return json.loads(out.read_text())


def _single(result: dict) -> dict:
    run = result["single"]
    (scheme,) = run["schemes"].values()
    timings = scheme["timings"]
    return {
        "wall_s": run["wall_s"],
        "phases_s": {p: timings.get(p) for p in PHASES},
        "formats_sha256": scheme["layer_formats_sha256"],
    }


def _median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def singles(args, summary: dict) -> None:
    sides: dict[str, list[dict]] = {"tree": [], "base": []}
    for i in range(args.pairs):
        for side in ("tree", "base") if i % 2 == 0 else ("base", "tree"):
            out = args.out / f"single-{side}{i + 1}.json"
            sides[side].append(_single(_catalog(args, "single", f"-{side}{i + 1}", side == "base", out)))
            summary["single"] = _summarise(sides)
            _write(args, summary)


def _summarise(sides: dict[str, list[dict]]) -> dict:
    out: dict = dict(sides)
    tree, base = _median(sides["tree"], "wall_s"), _median(sides["base"], "wall_s")
    out["median_wall_s"] = {"tree": tree, "base": base}
    if tree and base:
        out["tree_over_base"] = tree / base
    for p in PHASES:
        t = _median([r["phases_s"] for r in sides["tree"]], p)
        b = _median([r["phases_s"] for r in sides["base"]], p)
        out.setdefault("median_phases_s", {})[p] = {"tree": t, "base": b}
    shas = {r["formats_sha256"] for runs in sides.values() for r in runs}
    out["same_formats"] = len(shas) == 1
    return out


def sweeps(args, summary: dict) -> None:
    tree_out, base_out = args.out / "sweep-tree.json", args.out / "sweep-base.json"
    tree = _catalog(args, "sweep_all", "-sweep-tree", False, tree_out)
    summary["sweep"] = {"tree_wall_s": tree["sweep_all"]["wall_s"]}
    _write(args, summary)
    base = _catalog(args, "sweep_all", "-sweep-base", True, base_out, "--compare-to", str(tree_out))
    compared = base.get("compared_to", {})
    summary["sweep"].update(
        base_wall_s=base["sweep_all"]["wall_s"],
        tree_over_base=tree["sweep_all"]["wall_s"] / base["sweep_all"]["wall_s"],
        compared=compared,
        same_formats=bool(compared) and all(c["same_formats"] for c in compared.values()),
    )
    _write(args, summary)


def roofline(args, summary: dict) -> None:
    import bench_catalog

    ckpt, captions = bench_catalog.build(args)
    out = args.out / "roofline.json"
    cmd = [sys.executable, str(ROOT / "bench" / "roofline.py"), "--size", args.size, "--ckpt", str(ckpt)]
    cmd += ["--captions", str(captions), "--work", str(args.work / "roof"), "--out", str(out)]
    cmd += ["--searches", "driver,driver-gc-off"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (args.out / "roofline.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    summary["roofline"] = {"rc": proc.returncode, "json": out.name if out.exists() else None}
    _write(args, summary)


def _write(args, summary: dict) -> None:
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", type=Path, required=True, help="the base tree's src/ (git archive, above)")
    p.add_argument("--size", choices=["3b", "tiny"], default="3b")
    p.add_argument("--data", type=Path, default=ROOT / ".bench_data")
    p.add_argument("--work", type=Path, default=Path("/tmp/ab"))
    p.add_argument("--out", type=Path, required=True, help="folder for summary.json and each step's JSON")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--steps", default="single,sweep,roofline", help="comma list of single, sweep, roofline")
    p.add_argument("--sizes", default="", help="extra size flags for every run (CPU smoke)")
    p.add_argument(
        "--build-device", default="cuda", help="where the checkpoint is built (bench_catalog.py's)"
    )
    args = p.parse_args()
    steps = args.steps.split(",")
    unknown = sorted(set(steps) - {"single", "sweep", "roofline"})
    if unknown or not (args.base / "vlm_autoquant").is_dir():
        p.error(f"unknown --steps {unknown}" if unknown else f"--base {args.base} holds no vlm_autoquant/")
    args.base, args.data, args.work = args.base.resolve(), args.data.resolve(), args.work.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"size": args.size, "base": str(args.base), "pairs": args.pairs}
    for step, fn in (("single", singles), ("sweep", sweeps), ("roofline", roofline)):
        if step in steps:
            fn(args, summary)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
