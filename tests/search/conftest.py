"""Fixtures shared by the search stage's tests."""

from __future__ import annotations

import pytest

from vlm_autoquant.plan.calib_data import pack, split_captions


@pytest.fixture(scope="module")
def batches(demo):
    """Two packed 4x64 calibration batches of the demo's captions."""
    from transformers import AutoTokenizer  # a heavy import, made only by the tests that use it

    tok = AutoTokenizer.from_pretrained(demo[0])
    caps = demo[1].read_text().splitlines()
    return pack(tok, split_captions(caps, 256, 0, 0).calib, 64, 4, 0).batches[:2]
