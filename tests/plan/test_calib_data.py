"""Caption data: file checks, split, packing (isolation, labels, padding), determinism."""

from __future__ import annotations

import pytest
import torch

from vlm_autoquant.core.errors import Problems
from vlm_autoquant.plan.calib_data import IGNORE, check_caption_file, load_captions, pack, split_captions

from ..conftest import COCO, QWEN_TOKENIZER


@pytest.fixture(scope="module")
def tokenizer(demo):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo[0])


def check(path):
    problems = Problems()
    return check_caption_file(path, problems), "\n".join(map(str, problems.items))


def test_file_problems(tmp_path):
    assert "does not exist" in check(tmp_path / "nope.txt")[1]
    (tmp_path / "empty.txt").write_bytes(b"")
    assert "is empty" in check(tmp_path / "empty.txt")[1]
    (tmp_path / "blank.txt").write_bytes(b"\n  \n\t\n")
    assert "only blank lines" in check(tmp_path / "blank.txt")[1]
    (tmp_path / "bad.txt").write_bytes(b"a cat\na dog\ncaf\xe9 latin1\nok\n")
    info, text = check(tmp_path / "bad.txt")
    assert info is None and "line 3 is not valid UTF-8" in text and "iconv" in text


def test_crlf_and_blank_lines(tmp_path):
    p = tmp_path / "crlf.txt"
    p.write_bytes(b"A cat on a mat.\r\n\r\nA dog in the park.\r\n   \r\n")
    info, text = check(p)
    assert info.crlf and info.nonblank == 2 and not text
    assert load_captions(p) == ["A cat on a mat.", "A dog in the park."]


def test_split_is_seeded_disjoint_and_deduplicated():
    caps = [f"caption {i}" for i in range(100)] + ["caption 3", "caption 4"]
    a = split_captions(caps, 50, 10, seed=7)
    b = split_captions(caps, 50, 10, seed=7)
    c = split_captions(caps, 50, 10, seed=8)
    assert a.calib == b.calib and a.eval == b.eval and a.calib != c.calib
    assert not set(a.calib) & set(a.eval)
    assert a.record["duplicates_dropped"] == 2 and a.record["eval"] == 10


def test_short_file_warns_and_uses_what_exists(caplog):
    s = split_captions([f"c{i}" for i in range(20)], 100, 10, seed=0)
    assert len(s.eval) == 4 and len(s.calib) == 16  # eval capped at a fifth
    assert "using 16 for calibration (asked 100)" in caplog.text


def test_packing_labels_positions_and_padding(tokenizer):
    caps = ["A red bus parked near the station.", "A dog.", "Two cats sleep on a warm bench."]
    packed = pack(tokenizer, caps, seq_len=64, batch_size=4, seed=0)
    b = packed.batches[0]
    ids, pos, labels, real = b["input_ids"][0], b["position_ids"][0], b["labels"][0], b["real"][0]
    starts = (pos == 0).nonzero().flatten().tolist()
    assert len(starts) == 4  # three captions and the padding block
    term = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for s in starts[:3]:
        assert labels[s] == IGNORE  # a caption's first token is never a target
    assert (ids[real] == term).sum() == 3  # each caption ends with the terminator
    assert (labels[~real] == IGNORE).all()
    assert packed.real_tokens == int(real.sum())


def test_a_packed_caption_sees_only_itself(demo, tokenizer):
    """Block-diagonal attention: logits inside a packed row equal the caption run alone."""
    from vlm_autoquant.model.lm import load_lm, text_config

    model = load_lm(demo[0], text_config(demo[0]), torch.device("cpu"))
    caps = ["A large giraffe stands near the fence.", "A man rides a wave on a surfboard."]
    b = pack(tokenizer, caps, seq_len=48, batch_size=1, seed=0).batches[0]
    with torch.no_grad():
        packed = model(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits[0]
        starts = (b["position_ids"][0] == 0).nonzero().flatten().tolist()
        second = slice(starts[1], starts[2])
        alone = model(input_ids=b["input_ids"][:, second]).logits[0]
    assert torch.allclose(packed[second].float(), alone.float(), atol=1e-2, rtol=0)


def test_long_caption_truncated_with_warning(tokenizer, caplog):
    packed = pack(tokenizer, ["word " * 500, "A cat."], seq_len=32, batch_size=2, seed=0)
    assert packed.truncated == 1 and "truncated" in caplog.text
    assert all(b["input_ids"].shape[1] == 32 for b in packed.batches)


def test_packing_is_deterministic(tokenizer):
    caps = [f"A photo of {i} red buses." for i in range(200)]
    a = pack(tokenizer, caps, 64, 4, seed=3)
    b = pack(tokenizer, caps, 64, 4, seed=3)
    assert a.fingerprint == b.fingerprint


@pytest.fixture(scope="module")
def qwen_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
    assert len(tok) == 151665 and tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    return tok


@pytest.mark.parametrize("seq_len,batch", [(512, 8), (256, 16), (128, 8)])
def test_real_coco_padding_at_most_ten_percent(qwen_tokenizer, seq_len, batch):
    caps = split_captions(load_captions(COCO), 10240, 512, seed=1234).calib
    packed = pack(qwen_tokenizer, caps, seq_len, batch, seed=1234)
    assert packed.pad_tokens / (packed.real_tokens + packed.pad_tokens) <= 0.10
    assert packed.captions == 10240 and packed.truncated == 0
