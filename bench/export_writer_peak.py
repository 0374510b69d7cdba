"""Host memory of an export writer: its peak above the quantized model it exports.

    python bench/export_writer_peak.py --size 3b --work /tmp/xpeak --out peak.json [--shard-gib 1]
    python bench/export_writer_peak.py --size 3b --work /tmp/xpeak --out peak.json --writer modelopt
    python bench/export_writer_peak.py --size tiny --work /tmp/xpeak-cpu --out peak.json   # smoke run

In one process, on the CPU: build a random checkpoint of `--size` (released layout, kept in
--work for the next run), load its LM, quantize it with ModelOpt's FP8_DEFAULT_CFG (one short
calibration forward), keep every fourth linear in BF16, then run one writer into a new folder:
`ct` (the default) is `exporter.ct.write_checkpoint` (compress, write the LM's shards, copy the
vision tensors); `modelopt` is ModelOpt's `export_hf_checkpoint` of the LM. The kernel's peak
resident set (VmHWM) is reset just before the writer starts (`/proc/self/clear_refs`), so the
JSON's `writer_extra_gib` is the writer's own peak above the memory the loaded model already
holds. `--shard-gib` sets the ct writer's shard size, so a model smaller than one real 5 GiB
shard still shows how the peak scales with it. The model stays on the CPU, where the BF16
tensors a writer saves are the model's own; exporting from a GPU, it copies those to the host
too, so there its peak is higher than here.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GIB = 1 << 30


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/self/status has no {field}: this benchmark needs Linux")


def quantized_lm(ckpt: Path):
    """The checkpoint's LM, fake-quantized with FP8_DEFAULT_CFG, and its manifest rows."""
    import modelopt.torch.quantization as mtq
    import torch

    from vlm_autoquant.model.lm import load_lm, text_config
    from vlm_autoquant.run.manifest import LayerRecord

    model = load_lm(ckpt, text_config(ckpt), torch.device("cpu"))
    ids = torch.arange(32).reshape(1, 32) % model.config.vocab_size
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, lambda m: m(input_ids=ids))
    rows = []
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for i, (name, module) in enumerate(linears):
        fp8 = i % 4 != 3
        if not fp8:
            module.weight_quantizer.disable()
            module.input_quantizer.disable()
        rows.append(
            LayerRecord(
                name=name,
                group=name,
                format="FP8" if fp8 else "BF16",
                quant_config="FP8_DEFAULT_CFG" if fp8 else None,
                num_weights=module.weight.numel(),
                scores={},
                costs={},
                cost_counted=True,
                disabled=False,
            )
        )
    return model, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="3b", help="a model size of vlm_autoquant.model.demo.SIZES")
    p.add_argument("--work", type=Path, required=True, help="checkpoint (kept) and export folder")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    p.add_argument(
        "--shard-gib", type=float, default=None, help="the ct writer's shard size (default: its own)"
    )
    p.add_argument(
        "--writer",
        choices=["ct", "modelopt"],
        default="ct",
        help="ct: the compressed-tensors writer; modelopt: ModelOpt's export_hf_checkpoint (its own shards)",
    )
    args = p.parse_args()
    from vlm_autoquant.exporter import assemble, ct
    from vlm_autoquant.model import demo

    ckpt = args.work / f"ckpt-{args.size}"
    if not (ckpt / "config.json").is_file():
        demo.build_checkpoint(ckpt, size=args.size)
    model, rows = quantized_lm(ckpt)
    if args.shard_gib is not None:
        ct.SHARD_BYTES = int(args.shard_gib * GIB)
    out = args.work / "export"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    lm_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here on
    before = _status_kib("VmRSS")
    t = time.perf_counter()
    if args.writer == "ct":
        ct.write_checkpoint(model, rows, ckpt, out, lm_only=False)
    else:
        out = assemble.run_modelopt_export(model, out)
    seconds = time.perf_counter() - t
    peak = _status_kib("VmHWM")
    shards = sorted(out.glob("*.safetensors"))
    r = {
        "size": args.size,
        "writer": args.writer,
        "shard_bytes": ct.SHARD_BYTES,
        "lm_in_memory_gib": lm_bytes / GIB,
        "exported_gib": sum(s.stat().st_size for s in shards) / GIB,
        "shards": len(shards),
        "rss_before_writer_gib": before * 1024 / GIB,
        "writer_extra_gib": (peak - before) * 1024 / GIB,
        "writer_s": seconds,
        "fp8_layers": sum(r.format == "FP8" for r in rows),
        "bf16_layers": sum(r.format == "BF16" for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(r, indent=2) + "\n")
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
