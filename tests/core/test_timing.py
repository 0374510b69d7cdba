"""Phase lines: one per phase that finished, none for one that failed; sizes in readable units."""

from __future__ import annotations

import logging

import pytest

from vlm_autoquant.core.timing import Phases, human_bytes


@pytest.mark.parametrize(
    "n,text",
    [
        (0, "0 B"),
        (812, "812 B"),
        (525_722, "513.4 KiB"),
        (3 * 2**20 + 2**19, "3.5 MiB"),
        (7.51 * 2**30, "7.51 GiB"),
    ],
)
def test_sizes_read_in_the_largest_unit_that_keeps_them_at_one_or_more(n, text):
    assert human_bytes(n) == text


def test_a_phase_logs_its_line_when_it_ends_and_none_when_it_fails(caplog):
    caplog.set_level(logging.INFO, logger="vlm_autoquant")
    phases = Phases()
    with phases("load", "LM only"):
        pass
    with pytest.raises(ValueError), phases("validate", "inputs"):
        raise ValueError("bad input")
    phases.record("score", 2.5)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and lines[0].startswith("load ") and "(LM only)" in lines[0]
    assert lines[1].startswith("score ") and "2.50 s" in lines[1]
    assert set(phases.seconds) == {"load", "validate", "score"}  # the failed one still counted
