"""prefetch.py: the LM's weights asked of the kernel before the load, window by window."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from vlm_autoquant.core.errors import Problems
from vlm_autoquant.model import prefetch


def _spans(shard: Path) -> dict[str, tuple[int, int]]:
    """{tensor: (start, end)} in the file, read from the safetensors header (its format: an
    8-byte little-endian header length, the JSON header, then the data)."""
    with shard.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {
        k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    }


def _shards(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def test_the_ranges_hold_every_lm_byte_and_no_vision_byte(demo):
    ranges = prefetch.lm_ranges(demo[0])
    spans = {(shard, k): s for shard in _shards(demo[0]) for k, s in _spans(shard).items()}
    vision = {key: s for key, s in spans.items() if key[1].startswith("visual.")}
    lm = {key: s for key, s in spans.items() if not key[1].startswith("visual.")}
    assert vision and lm  # the demo ships its vision tower in the file
    covered = sum(end - start for _, start, end in ranges)
    assert covered == sum(end - start for start, end in lm.values())
    for (shard, _), (start, end) in lm.items():  # each LM tensor inside one range
        assert any(p == shard and a <= start and end <= b for p, a, b in ranges)
    for (shard, _), (start, end) in vision.items():  # no vision byte inside any
        assert not any(p == shard and start < b and a < end for p, a, b in ranges)
    assert len(ranges) < len(lm)  # adjacent tensors merged into one request


def test_a_budget_keeps_the_first_bytes_in_order():
    a, b = Path("a"), Path("b")
    ranges = [(a, 0, 100), (a, 200, 300), (b, 10, 60)]
    assert prefetch.within(ranges, 10**6) == ranges
    assert prefetch.within(ranges, 150) == [(a, 0, 100), (a, 200, 250)]
    assert prefetch.within(ranges, 0) == []


def test_start_asks_for_each_range_window_by_window_in_a_thread(demo, monkeypatch):
    asked: list[tuple[str, int, int, int]] = []
    real_open = os.open

    def advise(fd, offset, length, advice):
        asked.append((os.readlink(f"/proc/self/fd/{fd}"), offset, length, advice))

    monkeypatch.setattr(os, "posix_fadvise", advise)
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(prefetch, "window", lambda path: 4096)
    thread = prefetch.start(demo[0], budget=10**12)
    assert thread is not None and thread.daemon
    thread.join(timeout=60)
    assert {a[3] for a in asked} == {os.POSIX_FADV_WILLNEED}
    assert all(length <= 4096 for _, _, length, _ in asked)
    for path, start, end in prefetch.lm_ranges(demo[0]):  # each range asked for whole, in order
        mine = [(o, n) for p, o, n, _ in asked if p == str(Path(path).resolve()) and start <= o < end]
        assert mine[0][0] == start and sum(n for _, n in mine) == end - start
        assert all(o1 + n1 == o2 for (o1, n1), (o2, _) in zip(mine, mine[1:]))


def test_nothing_is_asked_for_without_a_readable_checkpoint_or_budget(demo, tmp_path):
    assert prefetch.start(tmp_path / "no-such-checkpoint") is None
    broken = tmp_path / "broken"
    shutil.copytree(demo[0], broken)
    for content in (b"\xff" * 16, b"\x00" * 3):  # a header longer than the file; a cut file
        for shard in _shards(broken):
            shard.write_bytes(content)
        assert prefetch.start(broken) is None
    assert prefetch.start(demo[0], budget=0) is None


def _resident(path: Path) -> int:
    out = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[0])


def test_the_lm_bytes_are_in_the_page_cache_once_asked_for(demo, tmp_path):
    """The real kernel: each shard evicted, then prefetched; its LM bytes come back."""
    if shutil.which("fincore") is None:
        pytest.skip("util-linux's fincore is not installed: the page cache cannot be inspected")
    model_dir = tmp_path / "ckpt"
    shutil.copytree(demo[0], model_dir)
    shards = _shards(model_dir)
    for shard in shards:
        fd = os.open(shard, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if any(_resident(s) for s in shards):
        pytest.skip(f"{tmp_path}'s filesystem keeps the files cached (tmpfs?): nothing to prefetch")
    wanted = {s: 0 for s in shards}
    for path, start, end in prefetch.lm_ranges(model_dir):
        wanted[Path(path)] += end - start
    prefetch.start(model_dir).join(timeout=60)
    deadline = time.monotonic() + 30  # the kernel reads after the calls return
    while any(_resident(s) < n for s, n in wanted.items()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(_resident(s) >= n for s, n in wanted.items()), {
        s.name: (_resident(s), n) for s, n in wanted.items()
    }


def test_a_run_prefetches_once_its_inputs_are_valid_and_a_refused_one_does_not(demo, tmp_path, monkeypatch):
    from vlm_autoquant.plan.inputs import RunOptions
    from vlm_autoquant.plan.validate import gather

    started: list[Path] = []
    monkeypatch.setattr(prefetch, "start", lambda model_dir, budget=None: started.append(Path(model_dir)))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "manifest.json").write_text("{}")  # a finished run's output: refused without --overwrite
    problems = Problems()
    refused = RunOptions(model_dir=demo[0], output_dir=taken, calib_file=demo[1])
    assert gather(refused, ["fp8-balanced-10b"], {}, problems) is None and problems
    assert started == []
    problems = Problems()
    ok = RunOptions(model_dir=demo[0], output_dir=tmp_path / "out", calib_file=demo[1])
    assert gather(ok, ["fp8-balanced-10b"], {}, problems) is not None, problems.items
    assert started == [demo[0]]


def test_an_export_prefetches_its_base_once_the_runs_manifest_is_read(
    demo, script_run, tmp_path, monkeypatch
):
    """--model-dir when given, else the manifest's checkpoint; before ModelOpt is imported to
    read the quantized state (the weights digest and the restore read them after)."""
    from vlm_autoquant.exporter import inputs as export_inputs

    started: list[Path] = []
    monkeypatch.setattr(prefetch, "start", lambda model_dir, budget=None: started.append(Path(model_dir)))
    other = tmp_path / "elsewhere"
    for model_dir in (other, None):
        assert (
            export_inputs.read_artifacts(script_run[0], "--artifacts-dir", Problems(), model_dir) is not None
        )
    manifest = json.loads((script_run[0] / "manifest.json").read_text())
    assert started == [other, Path(manifest["model"]["directory"])]
    assert started[1].resolve() == Path(demo[0]).resolve()
    problems = Problems()  # a folder without a run's manifest: nothing to prefetch
    assert export_inputs.read_artifacts(tmp_path, "--artifacts-dir", problems) is None and problems
    assert len(started) == 2
