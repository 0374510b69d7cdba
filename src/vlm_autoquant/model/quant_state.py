"""Save and restore the quantized LM: ModelOpt's state plus the quantizer amax values.

The artifact holds no model weights (about 6 GB of unchanged BF16 for the 3B): a fresh process
restores the exact quantized LM from the original checkpoint plus this file.
"""

from __future__ import annotations

import contextlib
import io
import logging
from pathlib import Path

import modelopt.torch.opt as mto
import torch
from modelopt.torch.quantization.utils import get_quantizer_state_dict, set_quantizer_state_dict
from safetensors.torch import save_file
from torch import nn

from ..core import artifacts, integrity
from ..core.errors import Problem, UsageError
from . import identity
from .lm import load_lm, pick_device, text_config

log = logging.getLogger(__name__)

STATE_FORMAT = "vlm_autoquant.quantized_state/1"


def save(model: nn.Module, target: Path, extra: dict | None = None) -> None:
    """Write {format, modelopt_state, quantizer_state, extra} atomically."""
    quantizer_state = {k: v.detach().cpu() if torch.is_tensor(v) else v
                       for k, v in get_quantizer_state_dict(model).items()}
    payload = {"format": STATE_FORMAT, "modelopt_state": mto.modelopt_state(model),
               "quantizer_state": quantizer_state, "extra": extra or {}}
    artifacts.write_with(target, lambda f: torch.save(payload, f))


def save_weights(model: nn.Module, target: Path) -> None:
    """Optional copy of the LM's BF16 weights (tied lm_head stored once)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
               if "_quantizer" not in k}
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)
    with artifacts.atomic_path(target) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def _manifest_dict(manifest: Path | dict | None) -> dict | None:
    if manifest is None or isinstance(manifest, dict):
        return manifest
    import json

    return json.loads(Path(manifest).read_text(encoding="utf-8"))


def check_against_manifest(state_file: Path, manifest: Path | dict) -> None:
    """Refuse `state_file` unless its sha256 is the one the run's manifest recorded."""
    doc = _manifest_dict(manifest)
    recorded = (doc.get("artifacts_sha256") or {}).get(state_file.name) if doc else None
    if recorded is None:
        raise UsageError(Problem(str(state_file), "the manifest records no sha256 for "
                                 f"{state_file.name}", "pass the manifest.json written by the "
                                 "same run (made by a version that records artifact digests)"))
    actual = artifacts.sha256_file(state_file)
    if actual != recorded:
        raise UsageError(Problem(str(state_file), f"sha256 {actual[:12]}... differs from the "
                                 f"manifest's {recorded[:12]}...: not the state this run wrote",
                                 "use the quantized_state.pt from the same output dir as the "
                                 "manifest, or rerun the quantization"))


def apply(model: nn.Module, state_file: Path, manifest: Path | dict | None = None) -> nn.Module:
    """Restore the saved quantizers onto an unquantized LM loaded from the original checkpoint.

    With `manifest` (its path or its dict), the file must carry the sha256 the manifest recorded.
    Non-finite amax values are refused (they would turn every logit into NaN).
    """
    state_file = Path(state_file)
    if manifest is not None:
        check_against_manifest(state_file, manifest)
    payload = integrity.load_weights_only(state_file, where=str(state_file))
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise UsageError(Problem(str(state_file), f"not a {STATE_FORMAT} file",
                                 "pass the quantized_state.pt written by this tool"))
    bad = integrity.nonfinite_amax(payload.get("quantizer_state"))
    if bad:
        raise UsageError(Problem(str(state_file), f"{len(bad)} quantizer amax value(s) are NaN or "
                                 f"Inf (first: {bad[0]}); restoring them gives non-finite logits",
                                 "rerun the quantization (check the calibration data and the "
                                 "checkpoint's weights for NaN/Inf)"))
    with contextlib.redirect_stdout(io.StringIO()):  # ModelOpt prints "Inserted N quantizers"
        model = mto.restore_from_modelopt_state(model, payload["modelopt_state"])
    bad_shapes = amax_shape_problems(model, payload["quantizer_state"])
    if bad_shapes:
        raise UsageError([Problem(str(state_file), text, "use the quantized_state.pt the run "
                                  "wrote (its manifest's sha256 names it), or rerun the "
                                  "quantization") for text in bad_shapes])
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
            takes = "a scalar" + (f" or {channels} values (one per output channel)"
                                  if len(allowed) > 1 else "")
            out.append(f"quantizer_state[{key!r}]._amax has shape {list(amax.shape)}; "
                       f"{parent}'s {kind} takes {takes}")
    return out[:limit]


def recorded_identity(state_file: Path) -> str | None:
    """The base weights' identity the run recorded in the state (None for older states)."""
    payload = integrity.load_weights_only(Path(state_file), where=str(state_file))
    return (payload.get("extra") or {}).get("weights_sha256")


def check_identity(model_dir: Path, recorded: str | None, allow_other_weights: bool) -> str:
    """Refuse (UsageError, exit 2) a model_dir whose LM weights differ from the recorded ones."""
    actual = identity.result(model_dir)
    if recorded is None:
        log.warning("the quantized state records no weights_sha256 (an older run): the base "
                    "weights cannot be checked")
    elif actual != recorded:
        if not allow_other_weights:
            raise UsageError(identity.mismatch(model_dir, recorded, actual))
        log.warning("--allow-other-weights: %s is not the checkpoint the run quantized", model_dir)
    return actual


def restore(model_dir: Path, state_file: Path, device: torch.device | None = None,
            allow_other_weights: bool = False, manifest: Path | dict | None = None) -> nn.Module:
    """Load the LM of `model_dir` and apply the quantized state: same logits as the run's model.

    Raises UsageError when `model_dir`'s LM weights are not the ones the run quantized, unless
    `allow_other_weights`; with `manifest`, also when the state file is not the one it records.
    """
    if manifest is not None:
        check_against_manifest(Path(state_file), manifest)
    identity.start(Path(model_dir))  # hashed while the LM loads
    model = load_lm(Path(model_dir), text_config(Path(model_dir)), device or pick_device())
    check_identity(Path(model_dir), recorded_identity(Path(state_file)), allow_other_weights)
    return apply(model, Path(state_file), manifest)
