"""Inspect a Qwen2.5-VL checkpoint directory without reading any weight bytes."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from safetensors import SafetensorError, safe_open

from ..core import paths
from ..core.artifacts import sha256_file
from ..core.errors import Problems

EXPECTED_MODEL_TYPE = "qwen2_5_vl"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
VISION_RE = re.compile(r"^(model\.)?visual\.")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
MAX_JSON_BYTES = 64 << 20  # config and index are KBs to a few MB; this only bounds a wrong file
DTYPE_BYTES = {
    "BF16": 2,
    "F16": 2,
    "F32": 4,
    "F64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES.get(self.dtype, 2)
        for d in self.shape:
            n *= d
        return n


@dataclass
class CheckpointInfo:
    """What the directory holds: config, tensor index, hashes. No weights are read."""

    path: Path
    config: dict
    config_sha256: str
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    weights_fingerprint: str = ""

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type"))

    def lm_keys(self) -> list[str]:
        return [k for k in self.tensors if not VISION_RE.match(k)]

    def vision_keys(self) -> list[str]:
        return [k for k in self.tensors if VISION_RE.match(k)]

    def bytes_of(self, keys: list[str]) -> int:
        return sum(self.tensors[k].nbytes for k in keys)


def _header(f) -> dict[str, tuple[str, tuple[int, ...]]]:
    """dtype and shape of every tensor of an open safe_open handle (header only, no bytes)."""
    out = {}
    for key in f.keys():
        sl = f.get_slice(key)
        out[key] = (str(sl.get_dtype()), tuple(int(d) for d in sl.get_shape()))
    return out


def _inside(name: object) -> bool:
    """An index entry must be a plain relative path inside the model dir (no /abs, no ..)."""
    if not isinstance(name, str) or not name or "\x00" in name:
        return False
    norm = os.path.normpath(name)
    return not os.path.isabs(name) and norm != ".." and not norm.startswith(".." + os.sep)


def _weight_files(path: Path, problems: Problems) -> list[str]:
    index = path / INDEX_FILE
    if index.exists():
        return _indexed_files(path, index, problems)
    if (path / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    if shards:
        problems.add(
            "--model-dir",
            f"found {len(shards)} safetensors shard(s) but no {INDEX_FILE}",
            "restore the index file that came with the checkpoint",
        )
    else:
        problems.add(
            "--model-dir",
            f"no weights in {path} (no {SINGLE_FILE} or {INDEX_FILE})",
            "point --model-dir at a downloaded Qwen2.5-VL checkpoint directory",
        )
    return []


def _indexed_files(path: Path, index: Path, problems: Problems) -> list[str]:
    """The shards the index names that exist (none if it is unreadable or points outside `path`)."""
    try:
        weight_map = json.loads(paths.read_regular(index, MAX_JSON_BYTES))["weight_map"]
        files = sorted(set(weight_map.values()))
    except OSError as exc:
        problems.add("--model-dir", *paths.describe_oserror(index, exc))
        return []
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        problems.add(
            "--model-dir",
            f"{index} is not a valid safetensors index ({exc})",
            "re-download the checkpoint's model.safetensors.index.json",
        )
        return []
    outside = [f for f in files if not _inside(f)]
    for f in outside:
        problems.add(
            "--model-dir",
            f"{INDEX_FILE} points at {f!r}, outside the model dir "
            "(an index names shards by relative path only)",
            "restore the checkpoint's original model.safetensors.index.json",
        )
    if outside:
        return []
    missing = [f for f in files if not (path / f).is_file()]
    for f in missing:
        problems.add(
            "--model-dir",
            f"{INDEX_FILE} names {f}, which is absent from {path}",
            "re-download the missing shard (huggingface-cli download ... --include "
            f"{f}) or point --model-dir at the complete checkpoint",
        )
    return [f for f in files if f not in missing]


def _read_config(path: Path, problems: Problems) -> dict | None:
    """config.json as a dict, after refusing special files (a FIFO would block its reader)."""
    special = paths.special_files(path)
    for name, kind in special:  # e.g. a FIFO tokenizer_config.json would block its reader
        problems.add(
            "--model-dir",
            f"{path / name} is {kind}, not a regular file",
            "replace it with the checkpoint's original file",
        )
    if special:
        return None
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        problems.add(
            "--model-dir",
            f"no config.json in {path}",
            "point --model-dir at the checkpoint root (the folder with config.json)",
        )
        return None
    try:
        config = json.loads(paths.read_regular(cfg_path, MAX_JSON_BYTES))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except OSError as exc:
        problems.add("--model-dir", *paths.describe_oserror(cfg_path, exc))
        return None
    except (ValueError, UnicodeDecodeError) as exc:
        problems.add(
            "--model-dir", f"{cfg_path} is not valid JSON ({exc})", "restore the checkpoint's config.json"
        )
        return None
    return config


def _read_shards(info: CheckpointInfo, problems: Problems) -> None:
    """Every shard's header (names, dtypes, shapes; no tensor bytes) and the layout fingerprint."""
    path = info.path
    fingerprint = hashlib.sha256(info.config_sha256.encode())
    for name in _weight_files(path, problems):
        shard = path / name
        try:
            # numpy: the header alone, without importing torch; validates the header vs file size
            with safe_open(str(shard), framework="numpy") as f:
                for key, (dtype, shape) in _header(f).items():
                    if key in info.tensors:  # which copy a loader takes is up to the loader
                        problems.add(
                            "--model-dir",
                            f"tensor {key} is stored twice, in {info.tensors[key].file} and in {name}",
                            "re-download the checkpoint (each tensor belongs to exactly one shard)",
                        )
                    info.tensors[key] = TensorInfo(name, dtype, shape)
        except (SafetensorError, OSError, ValueError) as exc:
            problems.add(
                "--model-dir",
                f"shard {name} cannot be read: {exc}",
                "the file is truncated or corrupt; re-download it",
            )
            continue
        fingerprint.update(f"{name}:{shard.stat().st_size}".encode())
    if info.tensors and not info.lm_keys():
        problems.add(
            "--model-dir",
            "the checkpoint holds no language-model tensors",
            "point --model-dir at a full Qwen2.5-VL checkpoint",
        )
    for key in sorted(info.tensors):
        t = info.tensors[key]
        fingerprint.update(f"{key}:{t.dtype}:{t.shape}".encode())
    info.weights_fingerprint = fingerprint.hexdigest()


def inspect_checkpoint(path: Path, problems: Problems) -> CheckpointInfo | None:
    """Check the directory's config, shards and tokenizer; add every problem found."""
    if not path.exists():
        problems.add(
            "--model-dir",
            f"{path} does not exist",
            "pass the directory of a Qwen2.5-VL checkpoint (e.g. a snapshot of "
            "Qwen/Qwen2.5-VL-3B-Instruct), or run the demo to build a tiny one",
        )
        return None
    if not path.is_dir():
        problems.add("--model-dir", f"{path} is not a directory", "pass the checkpoint directory")
        return None
    config = _read_config(path, problems)
    if config is None:
        return None
    cfg_path = path / "config.json"
    info = CheckpointInfo(path=path, config=config, config_sha256=sha256_file(cfg_path))
    if info.model_type != EXPECTED_MODEL_TYPE:
        arch = config.get("architectures")
        arch = arch[0] if isinstance(arch, list) and arch and isinstance(arch[0], str) else None
        found = f"model_type {info.model_type!r}" if config.get("model_type") else "no model_type"
        found += f" ({arch})" if arch else ""
        problems.add(
            "--model-dir",
            f"config.json has {found}; this tool needs {EXPECTED_MODEL_TYPE!r}",
            "this tool quantizes the language model of Qwen2.5-VL checkpoints only; "
            "use a Qwen2.5-VL-*-Instruct directory",
        )
    if not any(all((path / f).is_file() for f in group) for group in TOKENIZER_FILES):
        problems.add(
            "--model-dir",
            f"no tokenizer files in {path}",
            "copy tokenizer.json and tokenizer_config.json from the original checkpoint",
        )
    _read_shards(info, problems)
    return info


def _lm_name(key: str) -> str | None:
    """The LM module key a checkpoint key loads into (lm.KEY_MAPPING), or None for vision."""
    if VISION_RE.match(key):
        return None
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    return key


def linear_numels_from_headers(info: CheckpointInfo) -> dict[str, int]:
    """Weight elements of each LM linear, by module name, read from the headers alone (no
    transformers import): the 2-D `*_proj` weights and lm_head (the embeddings when tied)."""
    out: dict[str, int] = {}
    for key, t in info.tensors.items():
        name = _lm_name(key)
        if name and name.endswith("_proj.weight") and len(t.shape) == 2:
            out[name.removesuffix(".weight")] = t.shape[0] * t.shape[1]
    head = next(
        (
            info.tensors[k]
            for k in (
                "lm_head.weight",
                "model.embed_tokens.weight",
                "model.language_model.embed_tokens.weight",
            )
            if k in info.tensors
        ),
        None,
    )
    if out and head is not None and len(head.shape) == 2:
        out["lm_head"] = head.shape[0] * head.shape[1]
    return out


_LAYER_RE = re.compile(r"^model\.(?:language_model\.)?layers\.(\d+)\.")
_EMBED_KEYS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight")


def check_config_sizes(info: CheckpointInfo, sizes: dict[str, object], problems: Problems) -> bool:
    """config.json's LM sizes against the weights' headers, before any module is built.

    `sizes` holds num_hidden_layers, hidden_size, vocab_size and intermediate_size as the text
    config reads them. A size must be a positive integer and agree with the tensors present
    (the decoder layer indices, the embedding's shape, the first MLP's shape): a config that
    declares 200000 layers is refused here, not after building 200000 layers. True when all agree.
    """
    before = len(problems.items)
    fix = "restore the checkpoint's original config.json (its sizes must describe the weights beside it)"
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            problems.add(
                "--model-dir", f"config.json: {key} must be a positive integer, got {str(value)[:40]!r}", fix
            )
    if len(problems.items) > before:
        return False
    layers = sorted({int(m.group(1)) for k in info.tensors if (m := _LAYER_RE.match(k))})
    declared = sizes["num_hidden_layers"]
    if layers and layers != list(range(declared)):
        held = f"{layers[0]}..{layers[-1]} ({len(layers)} layers)"
        problems.add(
            "--model-dir",
            f"config.json: num_hidden_layers is {declared}, but the weights hold decoder layers {held}",
            fix,
        )
    embed = next((info.tensors[k].shape for k in _EMBED_KEYS if k in info.tensors), None)
    if embed is not None and len(embed) == 2:
        for key, held in (("vocab_size", embed[0]), ("hidden_size", embed[1])):
            if sizes[key] != held:
                problems.add(
                    "--model-dir",
                    f"config.json: {key} is {sizes[key]}, but the embedding is {list(embed)}",
                    fix,
                )
    gate = next(
        (t.shape for k, t in info.tensors.items() if _lm_name(k) == "model.layers.0.mlp.gate_proj.weight"),
        None,
    )
    if gate is not None and len(gate) == 2 and sizes["intermediate_size"] != gate[0]:
        problems.add(
            "--model-dir",
            f"config.json: intermediate_size is "
            f"{sizes['intermediate_size']}, but layer 0's gate_proj is {list(gate)}",
            fix,
        )
    return len(problems.items) == before


def check_lm_tensors(
    info: CheckpointInfo, expected: dict[str, tuple[int, ...]], tied: bool, problems: Problems, limit: int = 8
) -> None:
    """Match the LM tensors in the headers with the architecture the config declares.

    `expected` maps the LM's state-dict keys to shapes (from the meta model of the text config).
    Missing tensors (a config declaring more layers than the weights hold), foreign keys and
    wrong shapes are reported by name, before any weight is read.
    """
    found: dict[str, tuple[str, TensorInfo]] = {}
    for key, t in info.tensors.items():
        name = _lm_name(key)
        if name is not None:
            found[name] = (key, t)
    optional = {"lm_head.weight"} if tied else set()
    missing = sorted(set(expected) - set(found) - optional)
    foreign = sorted(set(found) - set(expected))
    wrong = sorted(n for n in set(found) & set(expected) if found[n][1].shape != expected[n])
    fix = (
        "point --model-dir at an unmodified Qwen2.5-VL checkpoint whose config.json belongs "
        "to its weights (re-download what was changed)"
    )

    def names(keys: list[str], show) -> str:
        more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(show(k) for k in keys[:limit]) + more

    if missing:
        problems.add(
            "--model-dir",
            f"{len(missing)} tensor(s) required by config.json are absent "
            f"from the weights: {names(missing, str)}",
            fix,
        )
    if foreign:
        problems.add(
            "--model-dir",
            f"{len(foreign)} tensor(s) are not part of the language "
            f"model config.json describes: {names(foreign, lambda n: found[n][0])}",
            fix,
        )
    for n in wrong[:limit]:
        problems.add(
            "--model-dir",
            f"tensor {found[n][0]} has shape {list(found[n][1].shape)}, "
            f"but config.json implies {list(expected[n])}",
            fix,
        )
    if len(wrong) > limit:
        problems.add("--model-dir", f"... and {len(wrong) - limit} more tensors of the wrong shape", fix)
