"""Spike: does ModelOpt's AutoQuantize already do data parallelism under torch.distributed?

    python bench/dp_spike.py [--world 2] [--out bench/results/dp-spike-cpu.json]

Issue #11 measured that, for a model that fits on one GPU, one replica per GPU each scoring part
of the batches would beat splitting the layers (32B on two H200s: 68.9 s proxy vs 95.5 s). This
checks, on the CPU with the gloo backend and the demo checkpoint, what ModelOpt provides: every
QuantModule carries `parallel_state` whose data-parallel group defaults to the whole
torch.distributed world, max calibration syncs the input amax across it, and `get_score` sums
the importance across it. Each rank runs `autoquant.search` (the driver's own search, patches
included) on batches[rank::world]; the result is compared with one process on all batches:
every quantizer's amax (bit for bit), every candidate's raw score (to float summation order)
and the formats chosen. No product code uses this yet; it is the groundwork for the replicas.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _search(model_dir: Path, captions: Path, rank: int, world: int, work: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    from vlm_autoquant.search import autoquant
    from vlm_autoquant.plan.calib_data import load_captions, pack, split_captions
    from vlm_autoquant.plan.families import SearchSpec
    from vlm_autoquant.model.lm import load_lm, text_config

    torch.manual_seed(0)
    steps = 4
    split = split_captions(load_captions(captions), 512, 0, 1234)
    packed = pack(AutoTokenizer.from_pretrained(model_dir), split.calib, 128, 4, 1234)
    batches = packed.batches[:steps][rank::world]
    spec = SearchSpec(formats=("FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG"),
                      method="gradient", num_calib_steps=len(batches),
                      num_score_steps=len(batches), disabled_layers=("*lm_head*",),
                      excluded_from_cost=())
    model = load_lm(model_dir, text_config(model_dir), torch.device("cpu"))
    # Under torch.distributed ModelOpt names its search checkpoint per rank; the driver's atomic
    # rename expects the single-process name (the product's replicas will have to handle that).
    autoquant._atomic_checkpoint_save = lambda searcher, final, save, on_checkpoint: save()
    found = autoquant.search(model, spec, batches, work / f"ckpt-{world}-{rank}.pth",
                             lambda *a: "", None, True)
    result = autoquant.solve(model, found, list(spec.formats), 10.0)
    from modelopt.torch.quantization.nn import TensorQuantizer

    amax = {n: m.amax.flatten().tolist() for n, m in model.named_modules()  # as solved
            if isinstance(m, TensorQuantizer) and m.is_enabled and m.amax is not None}
    formats = {g.name: g.chosen for g in result.groups}
    return {"amax": amax, "raw_scores": {k: v["raw_scores"] for k, v in found.stats.items()},
            "formats": formats}


def _rank_main(rank: int, world: int, port: int, model_dir: str, captions: str, work: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        out = _search(Path(model_dir), Path(captions), rank, world, Path(work))
    finally:
        dist.destroy_process_group()
    Path(work, f"rank{rank}.json").write_text(json.dumps(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "dp-spike-cpu.json")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import socket

    import torch.multiprocessing as mp

    from vlm_autoquant.model.demo import build_demo

    work = Path(tempfile.mkdtemp(prefix="dp-spike-"))
    model_dir, captions = build_demo(work / "demo")
    single = _search(model_dir, captions, 0, 1, work)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank_main, args=(a.world, port, str(model_dir), str(captions), str(work)),
                       nprocs=a.world, start_method="spawn")
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in range(a.world)]
    amax_equal = all(r["amax"] == single["amax"] for r in ranks)
    worst = 0.0
    for name, scores in single["raw_scores"].items():
        for r in ranks:
            for x, y in zip(scores, r["raw_scores"][name]):
                worst = max(worst, abs(x - y) / max(abs(x), 1e-30))
    verdict = {"world": a.world, "amax_equal_to_single_process": amax_equal,
               "ranks_agree_on_scores": all(r["raw_scores"] == ranks[0]["raw_scores"] for r in ranks),
               "max_rel_score_diff_vs_single": worst,
               "formats_equal_to_single_process": all(r["formats"] == single["formats"] for r in ranks),
               "calibrated_quantizers_compared": len(single["amax"]), "scored_groups": len(single["raw_scores"])}
    print(json.dumps(verdict, indent=1))
    a.out.write_text(json.dumps(verdict, indent=1) + "\n")
    return 0 if amax_equal and verdict["formats_equal_to_single_process"] else 1


if __name__ == "__main__":
    sys.exit(main())
