"""Load only the language model of a Qwen2.5-VL checkpoint, as a Qwen2ForCausalLM.

With text-only input Qwen2.5-VL's mrope gives every token the same position in its three
sections, which is exactly 1-D RoPE; so the LM is a plain Qwen2 decoder. Loading it with
`Qwen2ForCausalLM.from_pretrained` and a `Qwen2Config` built from the VL `text_config` reads the
LM tensors only: transformers opens the vision tensors lazily and never materialises them.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import logging as hf_logging

from ..core.errors import RunFailed
from .checkpoint import VISION_RE

log = logging.getLogger(__name__)

# Older transformers' save_pretrained wrote the LM under model.language_model.*
KEY_MAPPING = {r"^model\.language_model\.": "model."}


def text_config(model_dir: Path) -> Qwen2Config:
    """The LM's config: the VL checkpoint's text_config as a Qwen2Config (1-D RoPE)."""
    vl = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    fields = vl.text_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "dtype", "torch_dtype"):
        fields.pop(key, None)
    # The VL config's top-level flag decides whether lm_head is tied to the embeddings.
    fields["tie_word_embeddings"] = bool(
        getattr(vl, "tie_word_embeddings", fields.get("tie_word_embeddings", False))
    )
    fields["use_cache"] = False
    for key in ("rope_parameters", "rope_scaling"):  # text-only mrope is plain 1-D RoPE
        rope = fields.get(key)
        if isinstance(rope, dict):
            rope = {k: v for k, v in rope.items() if k not in ("mrope_section", "mrope_interleaved")}
            if rope.get("type") == "mrope":
                rope.pop("type")
            if rope.get("rope_type") in (None, "mrope"):
                rope["rope_type"] = "default"
            fields[key] = rope
    cfg = Qwen2Config(**fields)
    cfg.architectures = ["Qwen2ForCausalLM"]  # HF export needs it
    return cfg


def meta_model(cfg: Qwen2Config) -> Qwen2ForCausalLM:
    """The LM's module structure on the meta device: shapes only, no memory, no weights."""
    with torch.device("meta"):
        return Qwen2ForCausalLM(cfg)


def linear_numels(model: nn.Module) -> dict[str, int]:
    """Weight element count of every nn.Linear of the LM, keyed by module name."""
    return {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a table of every unexpected (vision) key; we report one line."""
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_lm(
    model_dir: Path,
    cfg: Qwen2Config,
    device: torch.device,
    device_map: dict | None = None,
    max_memory: dict | None = None,
) -> Qwen2ForCausalLM:
    """Load the LM in bf16 on `device`, frozen and in eval mode; vision tensors stay unread.

    `device_map`/`max_memory` (from `placement.place`) split it across GPUs instead; the inputs
    then go to the embeddings' device and transformers' hooks move activations between GPUs.
    """
    extra = {"max_memory": max_memory} if max_memory else {}
    with _quiet_transformers():
        model, info = Qwen2ForCausalLM.from_pretrained(
            model_dir,
            config=cfg,
            dtype=torch.bfloat16,
            device_map=device_map or {"": device},
            **extra,
            key_mapping=KEY_MAPPING,
            output_loading_info=True,
            trust_remote_code=False,
        )
    missing = [k for k in info["missing_keys"] if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    unexpected = [k for k in info["unexpected_keys"] if not VISION_RE.match(k)]
    mismatched = list(info.get("mismatched_keys", []))
    if missing or unexpected or mismatched:
        raise RunFailed(
            f"{model_dir} does not match its own config: missing LM tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}, shape mismatches {mismatched[:5]}. "
            "Re-download the checkpoint; it is incomplete or from another model."
        )
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.requires_grad_(False)  # ModelOpt enables what scoring needs
    model.eval()
    return model
