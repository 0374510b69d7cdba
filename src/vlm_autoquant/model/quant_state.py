"""Save and restore the quantized LM: ModelOpt's state plus the quantizer amax values.

The artifact holds no model weights (about 6 GB of unchanged BF16 for the 3B): a fresh process
restores the exact quantized LM from the original checkpoint plus this file.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
from pathlib import Path
from typing import Protocol

import modelopt.torch.opt as mto
import torch
from modelopt.torch.quantization.utils import get_quantizer_state_dict, set_quantizer_state_dict
from safetensors.torch import save_file
from torch import nn

from ..core import artifacts, integrity, paths
from ..core.errors import Problem, UsageError
from . import identity
from .lm import load_lm, pick_device, text_config

log = logging.getLogger(__name__)

STATE_FORMAT = "vlm_autoquant.quantized_state/1"


def save(model: nn.Module, target: Path, extra: dict | None = None) -> None:
    """Write {format, modelopt_state, quantizer_state, extra} atomically."""
    quantizer_state = {
        k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in get_quantizer_state_dict(model).items()
    }
    payload = {
        "format": STATE_FORMAT,
        "modelopt_state": mto.modelopt_state(model),
        "quantizer_state": quantizer_state,
        "extra": extra or {},
    }
    artifacts.write_with(target, lambda f: torch.save(payload, f))


def save_weights(model: nn.Module, target: Path) -> None:
    """Optional copy of the LM's BF16 weights (tied lm_head stored once)."""
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "_quantizer" not in k
    }
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    with artifacts.atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


class RunRecord(Protocol):
    """What the state checks read of a run's manifest (run.manifest.Manifest is one)."""

    def sha256_of(self, artifact: str) -> str | None: ...

    def fp8_layers(self) -> dict[str, str | None]: ...


def _recorded_sha256(state_file: Path, manifest: RunRecord) -> str:
    recorded = manifest.sha256_of(state_file.name)
    if not isinstance(recorded, str):
        raise UsageError(
            Problem(
                str(state_file),
                f"the manifest records no sha256 for {state_file.name}",
                "pass the manifest.json written by the "
                "same run (made by a version that records artifact digests)",
            )
        )
    return recorded


def read_state(state_file: Path, manifest: RunRecord | None = None, where: str | None = None) -> dict:
    """The payload of `state_file`, read once: with `manifest`, the bytes loaded are the bytes
    whose sha256 was checked against the manifest's record (nothing is re-read after the check).
    """
    state_file, where = Path(state_file), where or str(state_file)
    try:
        data = paths.read_regular(state_file, integrity.MAX_PICKLE_BYTES)
    except (OSError, paths.NotARegularFile) as exc:
        msg = paths.describe_oserror(state_file, exc)[0] if isinstance(exc, OSError) else str(exc)
        raise UsageError(Problem(where, msg, "pass the quantized_state.pt a run wrote")) from None
    if manifest is not None:
        recorded = _recorded_sha256(state_file, manifest)
        actual = hashlib.sha256(data).hexdigest()
        if actual != recorded:
            raise UsageError(
                Problem(
                    where,
                    f"{state_file} does not match the run's record: "
                    f"sha256 {actual[:12]}... differs from the manifest's "
                    f"{recorded[:12]}...: not the state this run wrote",
                    "use the quantized_state.pt from the same output dir as the "
                    "manifest (or download the run's artifacts again), or "
                    "rerun the quantization",
                )
            )
    payload = integrity.load_bytes(data, state_file, where)
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise UsageError(
            Problem(
                where,
                f"{state_file} is not a {STATE_FORMAT} file",
                "pass the quantized_state.pt written by this tool",
            )
        )
    return payload


def check_against_manifest(state_file: Path, manifest: RunRecord) -> None:
    """Refuse `state_file` unless its sha256 is the one the run's manifest recorded."""
    read_state(state_file, manifest)


def _amax_of(state: dict, key: str) -> torch.Tensor | None:
    entry = state.get(key)
    amax = entry.get("_amax") if isinstance(entry, dict) else None
    return amax if torch.is_tensor(amax) else None


def state_problems(payload: dict, where: str, manifest: RunRecord | None = None) -> list[Problem]:
    """What makes a quantized state unusable: amax values that are NaN, Inf, zero or negative
    (a scale, amax / 448, must be a positive number), and, with the run's manifest, an FP8
    layer without its weight amax (or its input amax, for a static per-tensor layer)."""
    state = payload.get("quantizer_state")
    state = state if isinstance(state, dict) else {}
    fix = "rerun the quantization (check the calibration data and the checkpoint's weights for NaN/Inf)"
    out = []
    bad = integrity.nonfinite_amax(state)
    if bad:
        out.append(
            Problem(
                where,
                f"{len(bad)} quantizer amax value(s) are NaN or Inf (first: "
                f"{bad[0]}); restoring them gives non-finite logits",
                fix,
            )
        )
    nonpositive = sorted(
        k
        for k in state
        if (a := _amax_of(state, k)) is not None and a.is_floating_point() and bool((a <= 0).any())
    )
    if nonpositive:
        out.append(
            Problem(
                where,
                f"{len(nonpositive)} quantizer(s) hold a zero or negative amax "
                f"(first: {nonpositive[0]}); a scale must be positive",
                fix,
            )
        )
    for name, config in (manifest.fp8_layers() if manifest is not None else {}).items():
        needed = ["weight"] + (["input"] if config == "FP8_DEFAULT_CFG" else [])
        absent = [w for w in needed if _amax_of(state, f"{name}.{w}_quantizer") is None]
        if absent:
            out.append(
                Problem(
                    where,
                    f"FP8 layer {name} (manifest) has no {' or '.join(absent)} quantizer amax in the state",
                    fix,
                )
            )
    return out


def apply(model: nn.Module, state_file: Path | dict, manifest: RunRecord | None = None) -> nn.Module:
    """Restore the saved quantizers onto an unquantized LM loaded from the original checkpoint.

    `state_file` is a path, or a payload `read_state` returned. With the run's `manifest`, the
    file must carry the sha256 the manifest recorded, and every FP8 layer the manifest names must
    have its quantizer state. Non-finite, zero or negative amax values are refused.
    """
    where = "quantized state" if isinstance(state_file, dict) else str(state_file)
    payload = state_file if isinstance(state_file, dict) else read_state(state_file, manifest)
    problems = state_problems(payload, where, manifest)
    if problems:
        raise UsageError(problems)
    with contextlib.redirect_stdout(io.StringIO()):  # ModelOpt prints "Inserted N quantizers"
        model = mto.restore_from_modelopt_state(model, payload["modelopt_state"])
    bad_shapes = amax_shape_problems(model, payload["quantizer_state"])
    if bad_shapes:
        raise UsageError(
            [
                Problem(
                    str(state_file),
                    text,
                    "use the quantized_state.pt the run "
                    "wrote (its manifest's sha256 names it), or rerun the "
                    "quantization",
                )
                for text in bad_shapes
            ]
        )
    set_quantizer_state_dict(model, payload["quantizer_state"])
    model.eval()
    return model


def amax_shape_problems(model: nn.Module, quantizer_state: dict, limit: int = 8) -> list[str]:
    """Each amax whose shape its linear cannot take: a scalar, or (a weight quantizer's) one
    value per output channel. Named by its key in the file, before ModelOpt loads any."""
    out = []
    for key, state in quantizer_state.items():
        amax = state.get("_amax") if isinstance(state, dict) else None
        parent, _, kind = key.rpartition(".")
        if not torch.is_tensor(amax) or not parent:
            continue
        try:
            linear = model.get_submodule(parent)
        except AttributeError:
            out.append(f"quantizer_state[{key!r}] belongs to no module of this LM")
            continue
        channels = getattr(linear, "out_features", None)
        allowed = {1} | ({channels} if kind == "weight_quantizer" and channels else set())
        if amax.numel() not in allowed:
            takes = "a scalar" + (
                f" or {channels} values (one per output channel)" if len(allowed) > 1 else ""
            )
            out.append(
                f"quantizer_state[{key!r}]._amax has shape {list(amax.shape)}; "
                f"{parent}'s {kind} takes {takes}"
            )
    return out[:limit]


def recorded_identity(state_file: Path | dict) -> str | None:
    """The base weights' identity the run recorded in the state (None for older states)."""
    payload = (
        state_file
        if isinstance(state_file, dict)
        else integrity.load_weights_only(Path(state_file), where=str(state_file))
    )
    return (payload.get("extra") or {}).get("weights_sha256")


def check_identity(model_dir: Path, recorded: str | None, allow_other_weights: bool) -> str:
    """Refuse (UsageError, exit 2) a model_dir whose LM weights differ from the recorded ones."""
    actual = identity.result(model_dir)
    if recorded is None:
        log.warning(
            "the quantized state records no weights_sha256 (an older run): the base weights cannot be checked"
        )
    elif actual != recorded:
        if not allow_other_weights:
            raise UsageError(identity.mismatch(model_dir, recorded, actual))
        log.warning("--allow-other-weights: %s is not the checkpoint the run quantized", model_dir)
    return actual


def restore(
    model_dir: Path,
    state_file: Path,
    device: torch.device | None = None,
    allow_other_weights: bool = False,
    manifest: RunRecord | None = None,
) -> nn.Module:
    """Load the LM of `model_dir` and apply the quantized state: same logits as the run's model.

    Raises UsageError when `model_dir`'s LM weights are not the ones the run quantized, unless
    `allow_other_weights`; with `manifest`, also when the state file is not the one it records.
    The state file is read once: what was checked is what is applied.
    """
    payload = read_state(Path(state_file), manifest)
    problems = state_problems(payload, str(state_file), manifest)
    if problems:
        raise UsageError(problems)
    identity.start(Path(model_dir))  # hashed while the LM loads
    model = load_lm(Path(model_dir), text_config(Path(model_dir)), device or pick_device())
    check_identity(Path(model_dir), recorded_identity(payload), allow_other_weights)
    return apply(model, payload, manifest)
