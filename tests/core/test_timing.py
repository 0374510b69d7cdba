"""Phase lines: one per phase that finished, none for one that failed; sizes in readable units."""

from __future__ import annotations

import logging

import pytest

from vlm_autoquant.core.timing import BatchClock, Phases, batch_note, human_bytes


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


def test_a_batch_lasts_from_its_first_step_to_the_next_batchs_and_the_last_ends_with_its_phase(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("vlm_autoquant.core.timing.time.perf_counter", lambda: now[0])
    clock = BatchClock()
    seen = []

    def step(model, batch):
        seen.append(batch["i"])
        now[0] += 1.0  # each forward step takes 1 s

    timed = clock.wrap(step)
    a, b, c = {"i": 0}, {"i": 1}, {"i": 2}
    timed(None, a)  # outside a phase: not counted
    clock.begin("calibrate")
    timed(None, a)
    timed(None, b)
    clock.end()
    clock.begin("score")
    for batch in (a, a, a, b, c):  # kl_div: several forwards on one batch are one batch
        timed(None, batch)
    now[0] += 0.5  # the backward after the last forward, inside the phase
    clock.end()
    assert seen == [0, 0, 1, 0, 0, 0, 1, 2]  # the steps themselves ran unchanged
    assert clock.seconds == {"calibrate": [1.0, 1.0], "score": [3.0, 1.0, 1.5]}


def test_the_batch_note_names_the_first_batch_the_median_of_the_rest_and_the_time_outside():
    assert batch_note([]) == ""
    assert batch_note([0.4]) == "1 batch: 0.40 s"
    note = batch_note([1.21, 0.2, 0.1, 0.15], phase_s=2.06)
    assert note == "4 batches: the first 1.21 s, the rest 0.15 s each (median); 0.40 s outside them"
