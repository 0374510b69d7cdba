"""Caption data: validate the file, split calibration/held-out, tokenize, pack into batches.

Packing: each caption becomes one segment `caption tokens + <|endoftext|>`. Segments are packed
best-fit-decreasing into rows of `seq_len` tokens and the position ids restart at 0 for every
segment. transformers turns restarting position ids into a block-diagonal causal mask, so a
caption attends only to itself, exactly as if it were alone. The loss is next-token
cross-entropy inside each caption (its last token predicts the terminator); the first token of a
caption has no context and is not a target, and the padding at the end of a row is neither
attended by captions nor a target.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from bisect import bisect_left, insort
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core import paths
from ..core.errors import Problems, RunFailed
from .schemes import Scheme

log = logging.getLogger(__name__)
IGNORE = -100
TERMINATOR = "<|endoftext|>"  # Qwen2's end-of-document token


@dataclass
class CaptionFile:
    path: Path
    sha256: str
    lines: int
    nonblank: int
    crlf: bool


MAX_CALIB_BYTES = 4 << 30  # bounds a wrong file (a FIFO or device is refused before reading)
MAX_CONTROL_FRACTION = 0.001  # control characters tolerated (other than tab, LF, CR)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
# A caption needs one visible character: not whitespace, not a BOM or zero-width mark.
_VISIBLE = re.compile(r"[^\s\x00-\x1f\x7f-\x9f\ufeff\u200b-\u200f\u2028-\u202f\u2060-\u206f]")


def _utf16_without_bom(raw: bytes) -> str | None:
    """ "UTF-16LE"/"UTF-16BE" when the bytes look like BOM-less UTF-16 text (NULs on one side)."""
    sample = raw[:65536]
    if len(sample) < 4 or sample[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return None
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    half = len(sample) // 2
    if odd > 0.3 * half and even < 0.05 * half:
        return "UTF-16LE"
    if even > 0.3 * half and odd < 0.05 * half:
        return "UTF-16BE"
    return None


def _as_text(raw: bytes, path: Path, flag: str, problems: Problems) -> str | None:
    """The file's bytes as UTF-8 text, or None with the problem (UTF-16, bad bytes, binary)."""
    utf16 = _utf16_without_bom(raw)
    if utf16:
        problems.add(
            flag,
            f"{path} looks like {utf16} text without a byte-order mark (NUL bytes "
            "between the characters of line 1)",
            f"re-encode it as UTF-8, e.g. iconv -f {utf16} -t UTF-8 {path.name} > fixed.txt",
        )
        return None
    lines = raw.split(b"\n")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        for number, line in enumerate(lines, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.add(
                    flag,
                    f"{path} line {number} is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                    f"re-encode the file as UTF-8, e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.txt",
                )
                return None
        raise
    controls = len(_CONTROL.findall(text))
    if controls > MAX_CONTROL_FRACTION * len(text):
        first = _CONTROL.search(text)
        line_no = text.count("\n", 0, first.start()) + 1
        problems.add(
            flag,
            f"{path} is not plain text: {controls} control characters (first: "
            f"U+{ord(first.group()):04X} on line {line_no}), more than "
            f"{MAX_CONTROL_FRACTION:.1%} of the file",
            "pass a text file of captions, "
            "one per line (tabs are fine; NULs and other control characters are not)",
        )
        return None
    return text


def check_caption_file(path: Path, problems: Problems, flag: str = "--calib-file") -> CaptionFile | None:
    """Read the file once: a regular UTF-8 text file with at least one visible caption, and
    hardly any control characters (a binary or UTF-16 file is refused, naming the line)."""
    if not paths.exists(path):
        problems.add(
            flag,
            f"{path} does not exist",
            "pass --calib-file with a text file of one caption per line (README: "
            "'Calibration data' shows how to make one from COCO captions_train2017.json)",
        )
        return None
    if not path.is_file():
        problems.add(flag, f"{path} is not a file", "pass a text file, one caption per line")
        return None
    try:
        raw = paths.read_regular(path, MAX_CALIB_BYTES)
    except OSError as exc:
        problems.add(flag, f"cannot read {path}: {exc}", "check the file's permissions")
        return None
    except paths.NotARegularFile as exc:
        problems.add(flag, str(exc), "pass a text file, one caption per line")
        return None
    if not raw:
        problems.add(flag, f"{path} is empty", "fill it with captions, one per line")
        return None
    text = _as_text(raw, path, flag, problems)
    if text is None:
        return None
    lines = raw.split(b"\n")
    nonblank = sum(1 for line in text.split("\n") if _VISIBLE.search(line))
    if nonblank == 0:
        problems.add(
            flag,
            f"{path} has no printable caption (only blank lines, whitespace, "
            "byte-order marks or invisible characters)",
            "fill it with captions, one per line",
        )
        return None
    return CaptionFile(
        path, hashlib.sha256(raw).hexdigest(), len(lines) - (lines[-1] == b""), nonblank, b"\r\n" in raw
    )


def load_captions(path: Path) -> list[str]:
    """Non-blank, stripped captions via the datasets `text` loader (CRLF handled there)."""
    from datasets import load_dataset  # datasets: imported on first use, off the refusal path
    from datasets.utils.logging import disable_progress_bar  # datasets: as above

    disable_progress_bar()
    try:
        ds = load_dataset("text", data_files=str(path), split="train")
    except Exception as exc:  # noqa: BLE001 - datasets wraps I/O errors in its own types
        from datasets import config  # datasets: imported on first use, off the refusal path

        raise RunFailed(
            f"the datasets text loader could not read {path} ({type(exc).__name__}: "
            f"{exc}). It caches the file as Arrow under {config.HF_DATASETS_CACHE}: "
            "if that disk is full, free space or point HF_DATASETS_CACHE elsewhere."
        ) from exc
    return [t.strip() for t in ds["text"] if t.strip()]


@dataclass
class Split:
    calib: list[str]
    eval: list[str]
    record: dict


def split_captions(captions: list[str], n_calib: int, n_eval: int, seed: int) -> Split:
    """Deduplicate, then a seeded permutation: held-out captions first, calibration next.

    When the file is short, the held-out split is capped at a fifth of the unique captions and
    calibration uses all the rest (with a warning) rather than refusing.
    """
    unique = list(dict.fromkeys(captions))
    perm = np.random.default_rng(seed).permutation(len(unique))
    take_eval = min(n_eval, len(unique) // 5) if n_eval else 0
    take_calib = min(n_calib, len(unique) - take_eval)
    if take_calib < n_calib or take_eval < n_eval:
        log.warning(
            "caption file has %d unique captions: using %d for calibration (asked %d) "
            "and %d held out (asked %d)",
            len(unique),
            take_calib,
            n_calib,
            take_eval,
            n_eval,
        )
    eval_idx, calib_idx = perm[:take_eval], perm[take_eval : take_eval + take_calib]
    record = {
        "seed": seed,
        "captions": len(captions),
        "unique": len(unique),
        "duplicates_dropped": len(captions) - len(unique),
        "calib": int(take_calib),
        "eval": int(take_eval),
        "eval_indices_sha256": hashlib.sha256(np.sort(eval_idx).tobytes()).hexdigest(),
    }
    return Split([unique[i] for i in calib_idx], [unique[i] for i in eval_idx], record)


@dataclass
class Packed:
    """Batches of packed captions, each a dict of CPU tensors."""

    batches: list[dict[str, torch.Tensor]]
    captions: int
    real_tokens: int
    pad_tokens: int
    truncated: int
    fingerprint: str = ""
    batch_captions: list[int] = field(default_factory=list)


def _best_fit_rows(lengths: list[int], cap: int) -> list[list[int]]:
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        j = bisect_left(free, (lengths[i], -1))
        if j < len(free):
            room, r = free.pop(j)
        else:
            room, r = cap, len(rows)
            rows.append([])
        rows[r].append(i)
        if room - lengths[i] > 0:
            insort(free, (room - lengths[i], r))
    return [sorted(r) for r in rows]


def pack(tokenizer, captions: list[str], seq_len: int, batch_size: int, seed: int) -> Packed:
    """Tokenize (plain text: no chat template, no special tokens) and pack into batches."""
    term = tokenizer.convert_tokens_to_ids(TERMINATOR)
    if term is None or term == tokenizer.unk_token_id:
        term = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else term
    # Bound the tokenizer's work on pathological lines before cutting to seq_len tokens.
    texts = [c[: seq_len * 64] for c in captions]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    truncated = sum(len(x) > seq_len - 1 for x in ids)
    if truncated:
        log.warning("%d caption(s) longer than seq_len=%d tokens were truncated", truncated, seq_len)
    segments = [x[: seq_len - 1] + [term] for x in ids]
    rows = _best_fit_rows([len(s) for s in segments], seq_len)
    order = np.random.default_rng(seed + 1).permutation(len(rows))
    rows = [rows[i] for i in order]
    batches, batch_captions, real = [], [], 0
    digest = hashlib.sha256()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        input_ids = torch.full((len(chunk), seq_len), pad, dtype=torch.long)
        labels = torch.full_like(input_ids, IGNORE)
        position_ids = torch.zeros_like(input_ids)
        real_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for r, members in enumerate(chunk):
            at = 0
            for i in members:
                seg = torch.tensor(segments[i])
                n = len(seg)
                input_ids[r, at : at + n] = seg
                labels[r, at + 1 : at + n] = seg[1:]
                position_ids[r, at : at + n] = torch.arange(n)
                real_mask[r, at : at + n] = True
                at += n
            position_ids[r, at:] = torch.arange(seq_len - at)  # padding: a block of its own
            real += at
        digest.update(input_ids.numpy().tobytes())
        batches.append(
            {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "real": real_mask}
        )
        batch_captions.append(sum(len(m) for m in chunk))
    total = sum(b["input_ids"].numel() for b in batches)
    return Packed(batches, len(captions), real, total - real, truncated, digest.hexdigest(), batch_captions)


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
    t0 = time.perf_counter()
    split = split_captions(captions, scheme.num_calib_samples, scheme.num_eval_samples, scheme.seed)
    if not split.calib:
        problems.add(
            "--calib-file",
            "the caption file leaves no caption for calibration",
            "use a file with more captions",
        )
        return None
    calib = pack(tokenizer, split.calib, scheme.seq_len, scheme.batch_size, scheme.seed)
    held = pack(tokenizer, split.eval, scheme.seq_len, scheme.batch_size, scheme.seed) if split.eval else None
    needed = max(scheme.num_calib_steps, scheme.num_score_steps)
    have = len(calib.batches)
    if have < needed:
        log.warning(
            "%d calibration captions make %d batches of %dx%d; calibration and scoring "
            "will run %d step(s) instead of the %d asked",
            len(split.calib),
            have,
            scheme.batch_size,
            scheme.seq_len,
            have,
            needed,
        )
    elif have > needed:
        log.info(
            "%d batches packed; the first %d are used (raise --num-calib-steps to use more)", have, needed
        )
    return Data(split, calib, held, min(have, needed), time.perf_counter() - t0)
