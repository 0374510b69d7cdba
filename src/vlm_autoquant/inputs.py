"""Validate every input of a run before any weight is loaded, and report all problems together."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import cost, deps, paths, tracking
from .artifacts import check_output_dir
from .calib_data import CaptionFile, Packed, Split, check_caption_file, load_captions
from .checkpoint import CheckpointInfo, check_lm_tensors, inspect_checkpoint
from .constants import DEFAULT_CALIB_FILE, DEFAULT_CATALOG, MANIFEST_FILE, PROJECT_ROOT
from .errors import Problems, UsageError
from .schemes import FORMAT_BITS, Scheme, load_catalog, resolve

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """Everything the CLI passes that is not a scheme field."""

    model_dir: Path
    output_dir: Path
    calib_file: Path | None = None
    catalog: Path | None = None
    overwrite: bool = False
    save_weights: bool = False
    grad_checkpointing: bool = True
    fp8_kernel: str = "auto"
    experiment: str | None = None


@dataclass
class Inputs:
    """The validated inputs of one run (or of a sweep's shared part)."""

    options: RunOptions
    schemes: list[Scheme]
    checkpoint: CheckpointInfo
    text_config: object
    numels: dict[str, int]
    caption_file: CaptionFile
    tokenizer: object = None
    captions: list[str] = field(default_factory=list)

    @property
    def calib_path(self) -> Path:
        return self.caption_file.path


def calib_path(given: Path | None) -> Path:
    return given if given is not None else PROJECT_ROOT / DEFAULT_CALIB_FILE


def check_bits(scheme: Scheme, numels: dict[str, int], problems: Problems, flag: str) -> None:
    """The target must lie in the range the scheme's formats and exclusions allow."""
    rng = cost.bits_range(numels, scheme.disabled_layers, scheme.excluded_from_cost,
                          min(FORMAT_BITS[f] for f in scheme.formats))
    if rng.counted_weights == 0:
        problems.add(f"scheme {scheme.name}", "cost_excluded_layers exclude every LM linear",
                     "exclude fewer layers so that the effective-bits budget has a denominator")
    elif not rng.contains(scheme.effective_bits):
        problems.add(flag, f"{scheme.effective_bits:g} effective bits is not achievable for "
                     f"scheme {scheme.name}: the achievable range is {rng}",
                     f"pass a value in {rng} (the low end puts every searched layer in FP8)")


def gather(options: RunOptions, scheme_names: list[str], overrides: dict,
           problems: Problems, flags: dict[str, str] | None = None,
           finished_marker: str = MANIFEST_FILE) -> Inputs | None:
    """Check dependencies, catalog, scheme(s), checkpoint, data file, output dir and tracking.

    Adds every problem found to `problems`; returns Inputs only when nothing is wrong.
    """
    deps.check(problems)
    if problems:  # without the libraries nothing below can run
        return None

    schemes: list[Scheme] = []
    try:
        catalog_ok = paths.probe(options.catalog or DEFAULT_CATALOG, "--catalog", problems, "file")
        catalog = load_catalog(options.catalog or DEFAULT_CATALOG) if catalog_ok else {}
        for name in scheme_names if catalog_ok else []:
            schemes.append(resolve(catalog, name, overrides, flags))
    except UsageError as exc:
        problems.extend(exc.problems)
    info = inspect_checkpoint(options.model_dir, problems) \
        if paths.probe(options.model_dir, "--model-dir", problems, "dir") else None
    caption_file = check_caption_file(calib_path(options.calib_file), problems) \
        if paths.probe(calib_path(options.calib_file), "--calib-file", problems, "file") else None
    check_output_dir(options.output_dir, problems, finished_marker, options.overwrite,
                     model_dir=options.model_dir)
    tracking.check_reachable(problems)
    text_cfg = numels = None
    if info is not None and info.model_type == "qwen2_5_vl" and info.tensors:
        from .lm import linear_numels, meta_model, text_config

        try:
            text_cfg = text_config(options.model_dir)
            meta = meta_model(text_cfg)
            numels = linear_numels(meta)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a bad config
            problems.add("--model-dir", f"config.json cannot be read as Qwen2.5-VL "
                         f"({type(exc).__name__}: {exc})",
                         "restore the checkpoint's original config.json")
        else:  # every LM tensor named and shaped as the config's architecture says
            if not any(p.input == "--model-dir" for p in problems.items):
                check_lm_tensors(info, {k: tuple(v.shape) for k, v in meta.state_dict().items()},
                                 bool(text_cfg.tie_word_embeddings), problems)
        for s in schemes if numels else []:
            flag = "--effective-bits" if "effective_bits" in s.overrides \
                else f"scheme {s.name}.effective_bits"
            check_bits(s, numels, problems, flag)
    if problems or info is None or caption_file is None or text_cfg is None:
        return None
    tokenizer = load_tokenizer(options.model_dir, problems)
    if tokenizer is None:
        return None
    return Inputs(options, schemes, info, text_cfg, numels, caption_file, tokenizer,
                  load_captions(caption_file.path))


def load_tokenizer(model_dir: Path, problems: Problems):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        problems.add("--model-dir", f"the tokenizer cannot be loaded ({exc})",
                     "copy tokenizer.json and tokenizer_config.json from the original checkpoint")
        return None


@dataclass
class Data:
    """One scheme's calibration and held-out batches."""

    split: Split
    calib: Packed
    eval: Packed | None
    steps: int  # batches ModelOpt will use: min(available, max(calib steps, score steps))
    seconds: float

    def used_captions(self) -> int:
        return sum(self.calib.batch_captions[: self.steps])

    def used_tokens(self) -> tuple[int, int]:
        """(real tokens, padding tokens) in the batches ModelOpt actually runs."""
        used = self.calib.batches[: self.steps]
        real = sum(int(b["real"].sum()) for b in used)
        return real, sum(b["real"].numel() for b in used) - real

    def used_padding_fraction(self) -> float:
        real, pad = self.used_tokens()
        return pad / (real + pad) if real + pad else 0.0


def build_data(tokenizer, captions: list[str], scheme: Scheme, problems: Problems) -> Data | None:
    """Split and pack the captions for `scheme` (cheap; no weights involved)."""
    from .calib_data import pack, split_captions

    t0 = time.perf_counter()
    split = split_captions(captions, scheme.num_calib_samples, scheme.num_eval_samples, scheme.seed)
    if not split.calib:
        problems.add("--calib-file", "the caption file leaves no caption for calibration",
                     "use a file with more captions")
        return None
    calib = pack(tokenizer, split.calib, scheme.seq_len, scheme.batch_size, scheme.seed)
    held = pack(tokenizer, split.eval, scheme.seq_len, scheme.batch_size, scheme.seed) \
        if split.eval else None
    needed = max(scheme.num_calib_steps, scheme.num_score_steps)
    have = len(calib.batches)
    if have < needed:
        log.warning("%d calibration captions make %d batches of %dx%d; calibration and scoring "
                    "will run %d step(s) instead of the %d asked", len(split.calib), have,
                    scheme.batch_size, scheme.seq_len, have, needed)
    elif have > needed:
        log.info("%d batches packed; the first %d are used (raise --num-calib-steps to use more)",
                 have, needed)
    return Data(split, calib, held, min(have, needed), time.perf_counter() - t0)
