"""Build randomly initialised Qwen2.5-VL checkpoints with the real architecture, offline.

`tiny` is the embedded demo (and the test fixture); `3b`, `7b`, `32b` and `72b` have the released
Qwen2.5-VL-*-Instruct dimensions (for benchmarks on a GPU machine). All carry a vision tower in
the file, mrope and GQA; tiny and 3B tie lm_head to the embeddings, 7B and up do not. The large
sizes are written shard by shard from a meta-device model (host memory ~one 4 GB shard). Layouts:
- "released": the published layout: flat config.json, keys model.* and visual.*, no lm_head
  key when tied, sharded with model.safetensors.index.json;
- "save_pretrained": whatever the installed transformers' save_pretrained writes;
- "legacy": the layout some transformers 4.x releases wrote (model.language_model.*,
  model.visual.*, an lm_head.weight key).
The tokenizer is a byte-level BPE trained here on the generated captions (or a given one copied).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

# Dimensions of Qwen/Qwen2.5-VL-3B-Instruct's config.json.
QWEN25_VL_3B = {
    "text": dict(
        hidden_size=2048,
        intermediate_size=11008,
        num_hidden_layers=36,
        num_attention_heads=16,
        num_key_value_heads=2,
        vocab_size=151936,
        max_position_embeddings=128000,
        rope_theta=1000000.0,
        mrope_section=[16, 24, 24],
    ),
    "vision": dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=2048,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
    ),
}


def _family(hidden: int, inter: int, layers: int, heads: int, kv: int, vis_inter: int) -> dict:
    """Released Qwen2.5-VL 7B/32B/72B dimensions (vocab 152064, untied lm_head)."""
    return {
        "text": dict(
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            vocab_size=152064,
            max_position_embeddings=128000,
            rope_theta=1000000.0,
            mrope_section=[16, 24, 24],
            tie_word_embeddings=False,
        ),
        "vision": dict(
            depth=32,
            hidden_size=1280,
            intermediate_size=vis_inter,
            num_heads=16,
            out_hidden_size=hidden,
            window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31],
        ),
    }


# Dimensions of Qwen/Qwen2.5-VL-{7B,32B,72B}-Instruct's config.json.
QWEN25_VL_7B = _family(3584, 18944, 28, 28, 4, 3420)
QWEN25_VL_32B = _family(5120, 27648, 64, 40, 8, 3456)
QWEN25_VL_72B = _family(8192, 29568, 80, 64, 8, 3456)
TINY = {
    "text": dict(
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=None,
        max_position_embeddings=2048,
        rope_theta=1000000.0,
        mrope_section=[2, 3, 3],
    ),
    "vision": dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        window_size=112,
        fullatt_block_indexes=[1],
    ),
}
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

_ADJ = "red blue small large old young wooden white black green shiny busy quiet empty".split()
_NOUN = (
    "dog cat man woman child bus train bicycle horse bird boat pizza clock kite table "
    "giraffe elephant surfer skier laptop"
).split()
_VERB = "sits stands runs waits rests walks plays lies parked perched".split()
_PREP = "on near beside under behind in front of across along".split()
_PLACE = (
    "street beach field kitchen park table road river snow grass window track station counter bench"
).split()


# The embedded demo runs on a 2-core CPU in well under a minute: shorter rows and few captions.
# 512 captions pack into ~6 batches of 8x128 tokens; scoring uses what exists (with a warning).
DEMO_OVERRIDES = {
    "num_calib_samples": 512,
    "num_calib_steps": 4,
    "num_score_steps": 2,
    "num_eval_samples": 128,
    "seq_len": 128,
}


def make_captions(n: int, seed: int = 0) -> list[str]:
    """Synthetic COCO-like captions (written here, not copied from COCO)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(_ADJ), rng.choice(_ADJ)
        text = (
            f"A {a} {rng.choice(_NOUN)} {rng.choice(_VERB)} {rng.choice(_PREP)} the {b} {rng.choice(_PLACE)}"
        )
        if rng.random() < 0.4:
            text += f" with a {rng.choice(_ADJ)} {rng.choice(_NOUN)}"
        out.append(text + ".")
    return out


def train_tokenizer(captions: list[str], target: Path, vocab_size: int = 512) -> int:
    """A byte-level BPE tokenizer in the Qwen2 style; returns its length."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # with transformers, below
    from transformers import PreTrainedTokenizerFast  # transformers: only to build a checkpoint

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(captions, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=32768
    )
    fast.save_pretrained(str(target))
    return len(fast)


def released_config(size: dict, vocab_size: int, token_ids: dict[str, int]) -> dict:
    """config.json in the flat layout of the published Qwen2.5-VL checkpoints."""
    t, v = size["text"], size["vision"]
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": token_ids["<|endoftext|>"],
        "eos_token_id": token_ids["<|im_end|>"],
        "hidden_act": "silu",
        "hidden_size": t["hidden_size"],
        "initializer_range": 0.02,
        "intermediate_size": t["intermediate_size"],
        "max_position_embeddings": t["max_position_embeddings"],
        "max_window_layers": 70,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": t["num_attention_heads"],
        "num_hidden_layers": t["num_hidden_layers"],
        "num_key_value_heads": t["num_key_value_heads"],
        "rms_norm_eps": 1e-06,
        "rope_theta": t["rope_theta"],
        "sliding_window": 32768,
        "tie_word_embeddings": t.get("tie_word_embeddings", True),
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_start_token_id": token_ids["<|vision_start|>"],
        "vision_end_token_id": token_ids["<|vision_end|>"],
        "vision_token_id": token_ids["<|vision_pad|>"],
        "image_token_id": token_ids["<|image_pad|>"],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_config": {
            "depth": v["depth"],
            "hidden_act": "silu",
            "hidden_size": v["hidden_size"],
            "intermediate_size": v["intermediate_size"],
            "num_heads": v["num_heads"],
            "in_chans": 3,
            "out_hidden_size": v["out_hidden_size"],
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": v["window_size"],
            "fullatt_block_indexes": v["fullatt_block_indexes"],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": t["mrope_section"]},
        "vocab_size": vocab_size,
    }


def _released_keys(state: dict[str, torch.Tensor], tied: bool, legacy: bool, meta: bool = False) -> dict:
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight" and tied and not legacy:
            continue  # the published checkpoints store the tied head once, as the embeddings
        if not legacy:
            key = key.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        if meta:
            out[key] = value
            continue
        out[key] = value.detach().clone() if key == "lm_head.weight" else value.detach().contiguous()
    return out


def write_shards(tensors: dict[str, torch.Tensor], target: Path, num_shards: int) -> None:
    """Safetensors shards plus model.safetensors.index.json, split by bytes in key order."""
    keys = sorted(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    per, shards, current, size = total / num_shards, [], [], 0
    for k in keys:
        current.append(k)
        size += tensors[k].numel() * tensors[k].element_size()
        if size >= per * (len(shards) + 1) and len(shards) < num_shards - 1:
            shards.append(current)
            current = []
    shards.append(current)
    weight_map = {}
    for i, group in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k].cpu() for k in group}, str(target / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )


SIZES = {"tiny": TINY, "3b": QWEN25_VL_3B, "7b": QWEN25_VL_7B, "32b": QWEN25_VL_32B, "72b": QWEN25_VL_72B}
STREAMED = ("7b", "32b", "72b")
SHARD_BYTES = 4 * 1024**3  # like the released checkpoints' ~4 GB shards
NUM_SHARDS = 2  # a small checkpoint still has an index and several shards, as released


def _random_like(key: str, meta: torch.Tensor, gen: torch.Generator, device: str) -> torch.Tensor:
    """HF-style init for one tensor: norms 1, biases 0, everything else N(0, 0.02)."""
    if key.endswith(".bias"):
        return torch.zeros(meta.shape, dtype=torch.bfloat16, device=device)
    if meta.dim() == 1:  # RMSNorm / LayerNorm weights
        return torch.ones(meta.shape, dtype=torch.bfloat16, device=device)
    out = torch.empty(meta.shape, dtype=torch.bfloat16, device=device)
    return out.normal_(0.0, 0.02, generator=gen)


def write_streamed(config, target: Path, seed: int, device: str = "cpu") -> None:
    """Random weights in the released layout, written shard by shard (~4 GB each).

    The module tree is built on the meta device (no memory); tensors of one shard are created,
    saved and freed before the next, so host memory stays at about one shard.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration  # transformers: only to build a checkpoint

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    metas = _released_keys(model.state_dict(), bool(config.tie_word_embeddings), legacy=False, meta=True)
    groups, current, size = [], [], 0
    for key in sorted(metas):
        nbytes = metas[key].numel() * 2
        if current and size + nbytes > SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    groups.append(current)
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for i, group in enumerate(groups, start=1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {k: _random_like(k, metas[k], gen, device).cpu() for k in group}
        total += sum(t.numel() * 2 for t in tensors.values())
        save_file(tensors, str(target / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, name))
        del tensors
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )


# The released checkpoint's image processor settings (Qwen2.5-VL-*-Instruct).
PREPROCESSOR = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "rescale_factor": 0.00392156862745098,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
}
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}"
    "{{ m['content'] }}{% else %}{% for c in m['content'] %}{% if c['type'] == 'image'"
    " %}<|vision_start|><|image_pad|><|vision_end|>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_processor_files(target: Path, token_ids: dict[str, int]) -> None:
    """preprocessor_config.json, chat_template.json, generation_config.json as released."""
    files = {
        "preprocessor_config.json": PREPROCESSOR,
        "chat_template.json": {"chat_template": CHAT_TEMPLATE},
        "generation_config.json": {
            "bos_token_id": token_ids["<|endoftext|>"],
            "pad_token_id": token_ids["<|endoftext|>"],
            "eos_token_id": [token_ids["<|im_end|>"], token_ids["<|endoftext|>"]],
            "do_sample": True,
            "temperature": 1e-6,
            "repetition_penalty": 1.05,
        },
    }
    for name, obj in files.items():
        (target / name).write_text(json.dumps(obj, indent=2) + "\n")


def build_checkpoint(
    target: Path,
    size: str = "tiny",
    layout: str = "released",
    seed: int = 0,
    tokenizer: Path | list[str] | None = None,
    device: str = "cpu",
) -> Path:
    """Write a randomly initialised Qwen2.5-VL checkpoint (weights, config, tokenizer).

    Args:
        layout: one of the module docstring's layouts.
        tokenizer: a directory of tokenizer files to copy (the released tokenizer), or captions
            to train a small BPE tokenizer on (default: 2000 generated captions).
    """
    from transformers import (  # transformers: only to build a checkpoint
        AutoConfig,
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
    )

    dims = SIZES[size]
    target.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(target, tokenizer, seed)
    tok = AutoTokenizer.from_pretrained(target)
    token_ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    vocab = dims["text"]["vocab_size"] or -(-len(tok) // 64) * 64  # padded like Qwen's 151936
    cfg_dict = released_config(dims, vocab, token_ids)
    (target / "config.json").write_text(json.dumps(cfg_dict, indent=2) + "\n")
    write_processor_files(target, token_ids)
    config = AutoConfig.from_pretrained(target)
    if size in STREAMED:  # too large to hold twice in host memory: one shard at a time
        write_streamed(config, target, seed, device)
        return target
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16: half the memory and time
    try:
        with torch.device(device):
            model = Qwen2_5_VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    if layout == "save_pretrained":
        (target / "config.json").unlink()
        model.save_pretrained(target, max_shard_size="200KB" if size == "tiny" else "4GB")
        return target
    tensors = _released_keys(model.state_dict(), bool(config.tie_word_embeddings), legacy=layout == "legacy")
    write_shards(tensors, target, NUM_SHARDS)
    return target


def _write_tokenizer(target: Path, tokenizer: Path | list[str] | None, seed: int) -> None:
    """Copy a tokenizer directory's files into `target`, or train one there on captions."""
    if isinstance(tokenizer, (str, Path)):
        for f in Path(tokenizer).iterdir():
            if f.is_file() and f.suffix in (".json", ".txt"):
                shutil.copy(f, target / f.name)
    else:
        train_tokenizer(tokenizer or make_captions(2000, seed), target)


def build_demo(root: Path, n_captions: int = 3000, seed: int = 0) -> tuple[Path, Path]:
    """The embedded demo: a tiny checkpoint and its own caption file under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    captions = make_captions(n_captions, seed)
    calib = root / "captions.txt"
    calib.write_text("\n".join(captions) + "\n", encoding="utf-8")
    model_dir = root / "qwen2_5_vl_tiny"
    if not (model_dir / "config.json").exists():
        build_checkpoint(model_dir, "tiny", "released", seed, tokenizer=captions)
    return model_dir, calib
