"""Assemble a servable Qwen2.5-VL checkpoint around ModelOpt's export of the quantized LM.

ModelOpt's `export_hf_checkpoint` writes the LM as a text-only Qwen2ForCausalLM (FP8 weights with
their scales, under the released `model.*` names, tied lm_head dropped). This module turns that
into the released Qwen2.5-VL layout: the base `config.json` plus ModelOpt's `quantization_config`,
`hf_quant_config.json`, ModelOpt's LM shards (moved, not rewritten), the vision tower copied
byte for byte into shards of its own (`visual.*`), one index over all of them, and the
tokenizer, processor, chat template and generation config of the base.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import modelopt.torch.export.unified_export_hf as hf
import torch
from modelopt.torch.export import export_hf_checkpoint
from modelopt.torch.export.model_config import QUANTIZATION_FP8, QUANTIZATION_FP8_PC_PT
from torch import nn

from ..model.checkpoint import INDEX_FILE, SINGLE_FILE, VISION_RE
from ..model.identity import shard_layout, weight_files
from ..search.fp8_kernel import divides, weight_codes

HF_QUANT_FILE = "hf_quant_config.json"
MODELOPT_SUBDIR = "_modelopt"
# Copied from the base when present (tokenizer, processor, chat template, generation config).
BASE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)
REQUIRED_BASE_FILES = ("preprocessor_config.json", "chat_template.json", "generation_config.json")
VISION_EXCLUDE = "visual*"  # vision linears stay BF16; engines must not look for FP8 scales there
VISION_SHARD_BYTES = 5 << 30


def vision_name(key: str) -> str:
    """Released name of a vision tensor (`model.visual.x` in some layouts -> `visual.x`)."""
    return key[len("model.") :] if key.startswith("model.visual.") else key


@contextlib.contextmanager
def _fake_quant_rounding(run_kernel: str | None) -> Iterator[None]:
    """Export exactly the FP8 codes the run evaluated.

    ModelOpt 0.47's `to_quantized_weight` packs FP8 as `weight / (amax / 448)` on the bf16
    weight, while its fake quant, which the search scored and the run evaluated, rounds
    `weight * (448 / amax)` in fp32. bf16 weights over a bf16 amax land exactly on E4M3 rounding
    ties (x * 448 / amax = 42.0, between codes 40 and 44) about 1% of the time, and the two
    forms break those ties differently (42.000002 vs 42.0), so one weight in a hundred was
    exported one code away from what was measured (the 3B export's logits drifted to KL 2e-3).
    For per-tensor and per-channel FP8 of a 2-D weight, the codes are computed here the fake
    quant's way from the module's own amax, in the arithmetic of the kernel the run used
    (`fp8_kernel.divides`); every other format, the scales, the file layout and the packing of
    everything else stay ModelOpt's.
    """
    orig_pack, orig_export = hf.to_quantized_weight, hf._export_quantized_weight
    current: dict = {}

    def export_weight(sub_module, dtype, weight_name="weight"):
        quantizer = getattr(sub_module, f"{weight_name}_quantizer", None)
        current["amax"] = getattr(quantizer, "amax", None)
        try:
            return orig_export(sub_module, dtype, weight_name)
        finally:
            current.pop("amax", None)

    def pack(weight, scale, quantization, *args, **kwargs):
        amax = current.get("amax")
        if (
            quantization in (QUANTIZATION_FP8, QUANTIZATION_FP8_PC_PT)
            and amax is not None
            and isinstance(weight, torch.Tensor)
            and weight.dim() == 2
            and weight.dtype != torch.float8_e4m3fn
        ):
            return weight_codes(weight, amax, divides(run_kernel, amax))
        return orig_pack(weight, scale, quantization, *args, **kwargs)

    hf.to_quantized_weight, hf._export_quantized_weight = pack, export_weight
    try:
        yield
    finally:
        hf.to_quantized_weight, hf._export_quantized_weight = orig_pack, orig_export


# Notices ModelOpt's export causes on every Qwen2.5-VL: it reads `config.torch_dtype`, which
# transformers 5 reports as deprecated, and it drops the tied lm_head (as it should). Logged at
# DEBUG instead of WARNING.
EXPORT_NOTICES = {
    "transformers.configuration_utils": "`torch_dtype` is deprecated",
    "modelopt.torch.export.quant_utils": "Tied weight (declared): dropping",
}


class _AtDebug(logging.Filter):
    """Re-log a record that starts with `prefix` at DEBUG (on our logger), drop the original."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(self.prefix):
            return True
        logging.getLogger(__name__).debug("%s: %s", record.name, record.getMessage())
        return False


@contextlib.contextmanager
def _known_notices_at_debug() -> Iterator[None]:
    added = [(logging.getLogger(name), _AtDebug(prefix)) for name, prefix in EXPORT_NOTICES.items()]
    for logger, f in added:
        logger.addFilter(f)
    try:
        yield
    finally:
        for logger, f in added:
            logger.removeFilter(f)


def run_modelopt_export(model: nn.Module, staging: Path, run_kernel: str | None = None) -> Path:
    """ModelOpt's own export of the quantized LM into `staging/_modelopt` (FP8 weight codes as
    the run's kernel, `run_kernel` from its manifest, rounded them)."""
    target = staging / MODELOPT_SUBDIR
    with (
        warnings.catch_warnings(),
        _fake_quant_rounding(run_kernel),
        _known_notices_at_debug(),
        contextlib.redirect_stdout(io.StringIO()),
    ):  # its progress prints
        warnings.simplefilter("ignore", UserWarning)
        export_hf_checkpoint(model, export_dir=target)
    return target


def quant_configs(mo_dir: Path, lm_only: bool) -> tuple[dict, dict]:
    """(config.json's quantization_config, hf_quant_config.json), the vision tower excluded."""
    qcfg = json.loads((mo_dir / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    hf_quant = json.loads((mo_dir / HF_QUANT_FILE).read_text(encoding="utf-8"))
    if not lm_only:
        q = hf_quant["quantization"]
        q["exclude_modules"] = sorted(set(q.get("exclude_modules") or []) | {VISION_EXCLUDE})
        qcfg["ignore"] = sorted(set(qcfg.get("ignore") or []) | {VISION_EXCLUDE})
    return qcfg, hf_quant


def _copy_range(src_fd: int, dst_fd: int, start: int, length: int, at: int) -> None:
    """Copy bytes [start, start+length) of src to offset `at` of dst (zero-copy where possible)."""
    done = 0
    while done < length:
        n = min(length - done, 64 << 20)
        try:
            n = os.copy_file_range(src_fd, dst_fd, n, start + done, at + done)
        except OSError:  # e.g. across filesystems on older kernels
            n = os.pwrite(dst_fd, os.pread(src_fd, n, start + done), at + done)
        if n <= 0:
            raise OSError(f"short copy at byte {start + done}")
        done += n


def _write_shard(target: Path, tensors: list[tuple[str, str, tuple, Path, int, int]]) -> None:
    """A safetensors file whose tensor bytes are copied verbatim from other shards."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, _, start, end in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + end - start]}
        offset += end - start
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    blob = len(blob).to_bytes(8, "little") + blob
    dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(dst, blob)
        at = len(blob)
        for _, _, _, src_path, start, end in tensors:
            src = os.open(src_path, os.O_RDONLY)
            try:
                _copy_range(src, dst, start, end - start, at)
            finally:
                os.close(src)
            at += end - start
    finally:
        os.close(dst)


def vision_tensors(base_dir: Path) -> list[tuple[str, str, tuple, Path, int, int]]:
    """(export name, dtype, shape, base shard, start, end) of every vision tensor of the base."""
    out = []
    for shard in weight_files(base_dir):
        for key, (dtype, shape, start, end) in shard_layout(shard).items():
            if VISION_RE.match(key):
                out.append((vision_name(key), dtype, shape, shard, start, end))
    return sorted(out)


def _vision_groups(tensors: list) -> list[list]:
    groups, size = [[]], 0
    for t in tensors:
        if groups[-1] and size + t[5] - t[4] > VISION_SHARD_BYTES:
            groups, size = groups + [[]], 0
        groups[-1].append(t)
        size += t[5] - t[4]
    return [g for g in groups if g]


def assemble(base_dir: Path, mo_dir: Path, out: Path, lm_only: bool) -> dict[str, str]:
    """Lay out the checkpoint in `out` (inside the staging directory); return {tensor: file}."""
    lm_files = [p for p in weight_files(mo_dir)]
    vision = [] if lm_only else _vision_groups(vision_tensors(base_dir))
    total = len(lm_files) + len(vision)
    names = (
        [SINGLE_FILE]
        if total == 1
        else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
    )
    weight_map: dict[str, str] = {}
    for src, name in zip(lm_files, names):
        os.replace(src, out / name)  # ModelOpt's shard as is: no rewrite
    for group, name in zip(vision, names[len(lm_files) :]):
        _write_shard(out / name, group)
    for name in names:
        weight_map.update(dict.fromkeys(shard_layout(out / name), name))
    size = sum(e - s for n in names for _, _, s, e in shard_layout(out / n).values())
    if total > 1:
        (out / INDEX_FILE).write_text(
            json.dumps(
                {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2
            )
            + "\n",
            encoding="utf-8",
        )
    return weight_map


def write_configs(base_dir: Path, mo_dir: Path, out: Path, lm_only: bool) -> dict:
    """config.json (base + quantization_config), hf_quant_config.json and the base's extra files."""
    qcfg, hf_quant = quant_configs(mo_dir, lm_only)
    if lm_only:  # ModelOpt's text-only Qwen2 config is the only truthful one for an LM alone
        config = json.loads((mo_dir / "config.json").read_text(encoding="utf-8"))
    else:
        config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
        config["quantization_config"] = qcfg
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / HF_QUANT_FILE).write_text(json.dumps(hf_quant, indent=2) + "\n", encoding="utf-8")
    for name in BASE_FILES:
        if (base_dir / name).is_file():
            shutil.copyfile(base_dir / name, out / name)
    return hf_quant


def file_list(out: Path) -> dict[str, int]:
    """{relative path: bytes} of every file in the checkpoint."""
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
