"""Phase lines: one per phase that finished, none for one that failed; sizes in readable units;
the parts of a phase and the batches of one."""

from __future__ import annotations

import logging
import re
import types

import pytest

import vlm_autoquant
from vlm_autoquant.core import timing
from vlm_autoquant.core.timing import BatchClock, Parts, Phases, batch_note, human_bytes, part


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


def _clock(monkeypatch, *readings: float) -> None:
    """timing's clock reads `readings`, one per call, in order."""
    it = iter(readings)
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: next(it)))


def test_parts_sum_by_name_in_the_order_first_seen_and_leave_the_rest_as_other(monkeypatch):
    # init, collecting; torch 2.0-2.5; tokenizer 3.0-3.25; torch again 4.0-5.0; the note at 6.0
    _clock(monkeypatch, 0.0, 1.0, 2.0, 2.5, 3.0, 3.25, 4.0, 5.0, 6.0)
    parts = Parts()
    with parts.collecting():
        with part("torch"):
            pass
        with part("tokenizer"):
            pass
        with part("torch"):  # a second block of the same part adds to it
            pass
    assert parts.seconds == {"torch": 1.5, "tokenizer": 0.25}
    assert parts.note() == "torch 1.50, tokenizer 0.25, other 3.25 s"


def test_a_part_outside_a_collecting_phase_is_not_timed_and_a_tiny_one_is_not_listed(monkeypatch):
    parts = Parts()
    with part("torch"):  # nothing collects: no error, nothing recorded
        pass
    assert parts.seconds == {} and parts.note() == ""
    _clock(monkeypatch, 0.0, 1.0, 1.001, 2.0)  # collecting at 0; a 1 ms part at 1; the note at 2
    with parts.collecting():
        with part("already imported"):
            pass
    assert parts.seconds == {"already imported": pytest.approx(0.001)}
    assert parts.note() == "other 2.00 s"


def test_a_failing_part_still_counts_and_the_phase_line_takes_the_note_at_its_end(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="vlm_autoquant")
    # Parts(), Phases(), collecting, the phase starts, the part 2.0-2.5, the phase ends, the note
    _clock(monkeypatch, 0.0, 0.0, 1.0, 1.0, 2.0, 2.5, 4.0, 4.0)
    parts, phases = Parts(), Phases()
    with parts.collecting(), phases("validate", parts.note):
        with pytest.raises(ValueError), part("tokenizer"):
            raise ValueError("bad tokenizer")
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validate")]
    assert line.startswith("validate      3.00 s") and line.endswith("(tokenizer 0.50, other 2.50 s)")


def test_a_runs_validate_line_names_its_parts_and_they_fit_in_it(demo, tracking, tmp_path, caplog):
    from ..test_api import QUICK

    caplog.set_level(logging.INFO, logger="vlm_autoquant")
    out = tmp_path / "q"
    vlm_autoquant.quantize(demo[0], "fp8-balanced-10b", output_dir=out, calib_file=demo[1], **QUICK)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("validate")]
    total = float(line.split()[1])
    parts = dict(re.findall(r"([a-z][a-z ]*?) (\d+\.\d\d)", line.split("(", 1)[1]))
    assert {"transformers and config", "batches", "other"} <= set(parts), line
    assert sum(map(float, parts.values())) <= total + 0.01 * len(parts)
