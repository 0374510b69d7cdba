"""The export and --log-only held to the quantize path's standard: protected output dirs, the
lock, symlinks, staging leftovers, MLflow runs never left RUNNING, files read once as checked,
scales that must be plausible, and checks that can fail."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from vlm_autoquant.core import artifacts
from vlm_autoquant.core.artifacts import (
    LOCK_FILE,
    MANIFEST_FILE,
    MARKER_FILE,
    QUANT_STATE_FILE,
)
from vlm_autoquant.core.errors import Problems
from vlm_autoquant.exporter import staging

from ..conftest import QUICK, run_cli
from .test_export import _assert_usage, copy_demo, export, source, store  # noqa: F401


@pytest.fixture
def src_run(store):  # noqa: F811 - test_export's source run: (run_id, artifacts dir, uri)
    return store


def _problems(path: Path, overwrite: bool = True, model_dir=None, artifacts_dir=None) -> str:
    problems = Problems()
    artifacts.check_replaced_dir(
        path, problems, overwrite, artifacts.EXPORT_REPORT_FILE, model_dir, artifacts_dir
    )
    return "\n".join(str(p) for p in problems.items)


# ---------------------------------------------------------------- 1. one output-dir policy


@pytest.mark.parametrize("where", ["cwd", "home", "model", "model_parent", "artifacts", "link_to_model"])
def test_protected_dirs_are_refused_with_overwrite(where, tmp_path, monkeypatch):
    model, art = tmp_path / "models" / "qwen", tmp_path / "outputs" / "run"
    model.mkdir(parents=True)
    art.mkdir(parents=True)
    (tmp_path / "link").symlink_to(model)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(art.parent)
    path = {
        "cwd": Path("."),
        "home": home,
        "model": model,
        "model_parent": model.parent,
        "artifacts": art,
        "link_to_model": tmp_path / "link",
    }[where]
    text = _problems(path, model_dir=model, artifacts_dir=art)
    assert "will not write there" in text and "with or without --overwrite" in text, text


def test_quantize_refuses_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    problems = Problems()
    artifacts.check_output_dir(Path("."), problems, MANIFEST_FILE, True)
    assert "the current directory" in str(problems.items[0])


def test_overwrite_replaces_only_our_finished_export(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep")
    assert "never replaced" in _problems(theirs)
    run = tmp_path / "run"  # ours, but a quantization run's results: never replaced either
    run.mkdir()
    (run / MARKER_FILE).write_text("{}")
    (run / MANIFEST_FILE).write_text("{}")
    assert "another kind of result" in _problems(run)
    done = tmp_path / "done"
    done.mkdir()
    (done / MARKER_FILE).write_text("{}")
    (done / artifacts.EXPORT_REPORT_FILE).write_text("{}")
    assert "--overwrite" in _problems(done, overwrite=False)
    assert _problems(done) == ""
    left = tmp_path / "left"  # what a killed export leaves: our bookkeeping only
    left.mkdir()
    (left / MARKER_FILE).write_text("{}")
    (left / LOCK_FILE).write_text("")
    assert _problems(left, overwrite=False) == ""


def test_export_cli_never_replaces_model_dir_or_home(src_run, demo, tmp_path, capsys, monkeypatch):
    model = copy_demo(demo[0], tmp_path / "m")
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("secret")
    monkeypatch.setenv("HOME", str(home))
    before = sorted(p.name for p in model.iterdir())
    for out in (model, home):
        code, err = export(
            ["--run-id", src_run[0], "--model-dir", model, "--output-dir", out, "--overwrite", "--no-mlflow"],
            capsys,
        )
        _assert_usage(code, err, "--output-dir")
        assert "will not write there" in err
    assert sorted(p.name for p in model.iterdir()) == before
    assert (home / ".ssh" / "id_rsa").read_text() == "secret"


def test_second_export_into_a_locked_dir_is_refused(src_run, demo, tmp_path, capsys):
    out = tmp_path / "o"
    with artifacts.locked_output_dir(out):  # a first export holds it
        code, err = export(
            ["--run-id", src_run[0], "--model-dir", demo[0], "--output-dir", out, "--no-mlflow"], capsys
        )
    _assert_usage(code, err, "--output-dir")
    assert "in use by another run" in err and f"PID {os.getpid()}" in err
    assert not (out / "config.json").exists()


# ------------------------------------------------------------------- staging dirs and links


def test_stale_staging_dirs_are_swept_live_and_foreign_ones_kept(tmp_path):
    def plant(name: str, marker: bool) -> Path:
        p = tmp_path / name
        p.mkdir()
        (p / LOCK_FILE).write_text("")
        (p / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 1024)
        if marker:
            (p / staging.STAGING_MARKER).write_text("{}")
        return p

    stale, foreign = plant(".o.partial-dead", True), plant(".o.partial-mine", False)
    live = plant(".p.partial-live", True)
    fd = os.open(live / LOCK_FILE, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a build still running
    try:
        assert staging.sweep_stale(tmp_path) == [stale]
    finally:
        os.close(fd)
    assert not stale.exists() and foreign.exists() and live.exists()
    with staging.staging_dir(tmp_path / "q") as built:  # a new build sweeps its parent
        assert (built / staging.STAGING_MARKER).is_file()
        assert not live.exists() and foreign.exists()  # its builder has gone now
        assert staging.sweep_stale(tmp_path) == [] and built.exists()  # ours: locked
    assert not built.exists()


def test_symlinked_export_dir_is_written_through_and_stale_staging_swept(src_run, demo, tmp_path, capsys):
    real = tmp_path / "disk" / "ckpt"
    real.mkdir(parents=True)
    link = tmp_path / "ckpt"
    link.symlink_to(real)
    stale = tmp_path / "disk" / ".ckpt.partial-killed"  # a SIGKILLed export's leftover
    stale.mkdir()
    (stale / staging.STAGING_MARKER).write_text("{}")
    (stale / LOCK_FILE).write_text("")
    for extra in ([], ["--overwrite"]):
        code, err = export(
            ["--run-id", src_run[0], "--model-dir", demo[0], "--output-dir", link, "--no-mlflow", *extra],
            capsys,
        )
        assert code == 0, err
        assert link.is_symlink() and os.path.realpath(link) == str(real)
        assert (real / "config.json").is_file() and (real / MARKER_FILE).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "disk"]  # no .old link
    assert sorted(p.name for p in (tmp_path / "disk").iterdir()) == ["ckpt"]
    report = json.loads((real / artifacts.EXPORT_REPORT_FILE).read_text())
    assert not set(report["files"]) & set(staging.BOOKKEEPING)


# ------------------------------------------------------------- 6. no MLflow run left RUNNING


def test_next_export_closes_the_run_a_killed_export_left_running(src_run, demo, tmp_path, capsys):
    import mlflow

    from vlm_autoquant import tracking as tracking_mod

    client = mlflow.MlflowClient()
    exp = client.search_experiments()[0].experiment_id
    stale = client.create_run(exp).info.run_id  # RUNNING, as a SIGKILLed export leaves it
    out = tmp_path / "o"
    out.mkdir()
    for name, text in ((MARKER_FILE, "{}"), (LOCK_FILE, "")):
        (out / name).write_text(text)
    tracking_mod.remember(out, stale)  # the record a killed export leaves in its output dir
    code, err = export(["--run-id", src_run[0], "--model-dir", demo[0], "--output-dir", out], capsys)
    assert code == 0, err
    assert client.get_run(stale).info.status == "KILLED"
    report = json.loads((out / artifacts.EXPORT_REPORT_FILE).read_text())
    assert tracking_mod.recorded_run(out)[0] == report["mlflow"]["run_id"]
    assert client.get_run(report["mlflow"]["run_id"]).info.status == "FINISHED"


def test_failed_quantize_keeps_the_record_of_a_run_it_could_not_end(demo, tmp_path, tracking, capsys):
    """A full disk stops the run at its first write and the store (on the same disk) cannot end
    the run: the output dir keeps .mlflow_run_id, so the next run into it closes the run."""
    import mlflow

    from vlm_autoquant import tracking as tracking_mod
    from vlm_autoquant.core.errors import RunFailed
    from vlm_autoquant.run import pipeline

    def full(*_a, **_k):
        raise RunFailed("no space left to write the search checkpoint (No space left on device)")

    def store_full(self, *_a, **_k):
        self.wait()  # as Tracker.end does: the run exists, then writing to the store fails
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "o"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "search_family", full)
        mp.setattr(tracking_mod.Tracker, "end", store_full)
        code = run_cli(
            [
                "--scheme-name",
                "fp8-balanced-10b",
                "--model-dir",
                demo[0],
                "--calib-file",
                demo[1],
                "--output-dir",
                out,
                *QUICK,
            ]
        )
    assert code == 1, capsys.readouterr().err[-2000:]
    run_id = tracking_mod.recorded_run(out)[0]
    client = mlflow.MlflowClient()
    assert client.get_run(run_id).info.status == "RUNNING"
    tracking_mod.close_stale(out).join()  # what the next run into `out` does first
    assert client.get_run(run_id).info.status == "KILLED"


# ------------------------------------------------- 2/3. what is read is what was checked


def _artifacts_copy(src_run, tmp_path: Path) -> Path:
    art = tmp_path / "art"
    shutil.copytree(src_run[1], art)
    return art


def _rewrite_state(art: Path, change) -> None:
    """Change the quantized state and record its new sha256 in the manifest (a consistent
    forgery: only checks of the values themselves can catch it)."""
    payload = torch.load(art / QUANT_STATE_FILE, weights_only=True)
    change(payload["quantizer_state"])
    torch.save(payload, art / QUANT_STATE_FILE)
    doc = json.loads((art / MANIFEST_FILE).read_text())
    doc["artifacts_sha256"][QUANT_STATE_FILE] = artifacts.sha256_file(art / QUANT_STATE_FILE)
    (art / MANIFEST_FILE).write_text(json.dumps(doc))


def test_state_swapped_after_validation_is_not_what_is_exported(src_run, demo, tmp_path, capsys, monkeypatch):
    from vlm_autoquant.exporter import inputs as export_inputs

    art = _artifacts_copy(src_run, tmp_path)
    layer = fp8_layer(art)
    original = torch.load(art / QUANT_STATE_FILE, weights_only=True)["quantizer_state"]
    real_gather = export_inputs.gather

    def gather_then_swap(*args):
        inputs = real_gather(*args)  # checked; now another process replaces the file
        payload = torch.load(art / QUANT_STATE_FILE, weights_only=True)
        for entry in payload["quantizer_state"].values():
            if "_amax" in entry:
                entry["_amax"] = entry["_amax"] * 1.5
        torch.save(payload, art / QUANT_STATE_FILE)
        return inputs

    monkeypatch.setattr(export_inputs, "gather", gather_then_swap)
    out = tmp_path / "o"
    code, err = export(
        [
            "--artifacts-dir",
            art,
            "--model-dir",
            demo[0],
            "--output-dir",
            out,
            "--no-mlflow",
            "--format",
            "modelopt",
        ],
        capsys,
    )  # fp32 scales
    assert code == 0, err
    from safetensors import safe_open

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(out / index[f"{layer}.weight_scale"]), "pt") as f:
        scale = f.get_tensor(f"{layer}.weight_scale").float()
    want = original[f"{layer}.weight_quantizer"]["_amax"].float() / 448
    assert torch.allclose(scale.reshape(want.shape), want, rtol=1e-6), (scale, want)


def fp8_layer(art: Path) -> str:
    """A static per-tensor FP8 layer of the run (from its manifest)."""
    doc = json.loads((art / MANIFEST_FILE).read_text())
    return next(
        r["name"] for r in doc["layers"] if r["format"] == "FP8" and r["quant_config"] == "FP8_DEFAULT_CFG"
    )


@pytest.mark.parametrize(
    "tamper,exit_code,needle",
    [
        ("zero", 2, "zero or negative amax"),
        ("negative", 2, "zero or negative amax"),
        ("huge", 1, "x max|weight|"),
        ("missing", 2, "(manifest) has no weight quantizer amax"),
    ],
)
def test_impossible_scales_fail_the_export(tamper, exit_code, needle, src_run, demo, tmp_path, capsys):
    layer = fp8_layer(src_run[1])

    def change(state: dict) -> None:
        key = f"{layer}.weight_quantizer"
        amax = state[key]["_amax"]
        if tamper == "missing":
            del state[key]["_amax"]
        else:
            state[key]["_amax"] = {"zero": amax * 0, "negative": -amax, "huge": torch.full_like(amax, 1e30)}[
                tamper
            ]

    art = _artifacts_copy(src_run, tmp_path)
    _rewrite_state(art, change)
    out = tmp_path / "o"
    code, err = export(
        ["--artifacts-dir", art, "--model-dir", demo[0], "--output-dir", out, "--no-mlflow"], capsys
    )
    assert code == exit_code, err
    assert needle in err and layer in err and "Traceback" not in err, err
    assert not out.exists()


# ----------------------------------------------------------- checks that must be able to fail


def test_vision_bytes_check_fails_on_one_changed_byte(src_run, demo, tmp_path, capsys, monkeypatch):
    from vlm_autoquant.exporter import pipeline as export_pipeline
    from vlm_autoquant.model.identity import shard_layout, weight_files

    real_assemble = export_pipeline.export.assemble
    flipped = []

    def assemble_then_flip(base_dir, mo_dir, out, lm_only):
        weight_map = real_assemble(base_dir, mo_dir, out, lm_only)
        for shard in weight_files(out):
            vision = sorted((k, v) for k, v in shard_layout(shard).items() if k.startswith("visual."))
            if vision:
                key, (_, _, start, _) = vision[-1]
                with open(shard, "r+b") as f:
                    f.seek(start)
                    b = f.read(1)
                    f.seek(start)
                    f.write(bytes([b[0] ^ 1]))
                flipped.append(key)
                break
        return weight_map

    monkeypatch.setattr(export_pipeline.export, "assemble", assemble_then_flip)
    code, err = export(
        ["--run-id", src_run[0], "--model-dir", demo[0], "--output-dir", tmp_path / "o", "--no-mlflow"],
        capsys,
    )
    assert flipped and code == 1, err
    assert '"vision"' in err and flipped[0] in err, err
    assert not (tmp_path / "o").exists()


class _Fixed(torch.nn.Module):
    """A 'model' whose next-token logits are the same row at every position."""

    def __init__(self, row: list[float]):
        super().__init__()
        self.row = torch.tensor(row)

    def forward(self, input_ids, **_kw):
        class Out:
            logits = self.row.expand(*input_ids.shape, len(self.row))

        return Out()


def _kl_two_way(d: float) -> float:
    """KL(p || q) for p = (1/2, 1/2) and q = softmax(d, 0), by hand."""
    q1 = 1 / (1 + math.exp(-d))
    return 0.5 * math.log(0.5 / q1) + 0.5 * math.log(0.5 / (1 - q1))


@pytest.mark.parametrize("kl,passes", [(5e-5, True), (2e-4, False), (1e-3, False)])
def test_numerics_limit_applied_is_1e_4(kl, passes):
    from vlm_autoquant.exporter import verify as export_verify

    lo, hi = 0.0, 1.0  # find d with the wanted KL (monotone in d > 0)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _kl_two_way(mid) < kl else (lo, mid)
    batch = {
        "input_ids": torch.zeros(1, 4, dtype=torch.long),
        "position_ids": torch.arange(4)[None],
        "real": torch.ones(1, 4, dtype=torch.bool),
    }
    got = export_verify.compare_logits(_Fixed([0.0, 0.0]), _Fixed([lo, 0.0]), [batch], torch.device("cpu"))
    assert got["kl_mean"] == pytest.approx(kl, rel=1e-3)
    assert got["passed"] is passes


def test_a_tensor_stored_in_two_shards_is_refused(demo, tmp_path):
    from safetensors.torch import load_file, save_file

    from vlm_autoquant.model.checkpoint import inspect_checkpoint

    model = copy_demo(demo[0], tmp_path / "m")
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(set(index.values()))
    assert len(shards) > 1
    key = next(k for k, v in index.items() if v == shards[0])
    extra = load_file(str(model / shards[0]))[key]
    second = load_file(str(model / shards[1]))
    save_file({**second, key: extra.clone()}, str(model / shards[1]), metadata={"format": "pt"})
    problems = Problems()
    inspect_checkpoint(model, problems)
    text = "\n".join(map(str, problems.items))
    assert f"tensor {key} is stored twice" in text and shards[1] in text, text


def test_file_too_large_is_a_full_disk_and_a_signal_says_nothing_was_written(
    src_run, demo, tmp_path, capsys, monkeypatch
):
    from vlm_autoquant.exporter import pipeline as export_pipeline

    def too_large(*_args):  # as safetensors' Rust writer reports EFBIG: no errno attribute
        raise RuntimeError("Error while serializing: IoError(File too large (os error 27))")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export_pipeline.export, "_write_shard", too_large)
        code, err = export(
            ["--run-id", src_run[0], "--model-dir", demo[0], "--output-dir", tmp_path / "o", "--no-mlflow"],
            capsys,
        )
    _assert_usage(code, err, "--output-dir", tmp_path / "o")
    assert "disk filled up" in err

    def interrupted(_staging):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_pipeline, "_before_publish", interrupted)
    code, err = export(
        ["--run-id", src_run[0], "--model-dir", demo[0], "--output-dir", tmp_path / "o", "--no-mlflow"],
        capsys,
    )
    assert code == 130 and "calibration" not in err and "Nothing was written" in err, err
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


# ------------------------------------------------------------------------ --log-only


def _log_only(out: Path, capsys) -> tuple[int, str]:
    code = run_cli(["--log-only", "--output-dir", out])
    return code, capsys.readouterr().err


def _runs(uri: str) -> list:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize("name", ["/etc/hostname", "../secret.txt", "link.txt"])
def test_log_only_refuses_artifact_paths_outside_the_output_dir(name, script_run, tmp_path, tracking, capsys):
    out = tmp_path / "run"
    shutil.copytree(script_run[0], out)
    (tmp_path / "secret.txt").write_text("not yours")
    (out / "link.txt").symlink_to(tmp_path / "secret.txt")
    doc = json.loads((out / MANIFEST_FILE).read_text())
    doc["artifacts"]["extra"] = name
    (out / MANIFEST_FILE).write_text(json.dumps(doc))
    code, err = _log_only(out, capsys)
    assert code == 2 and "not a relative path inside" in err and name in err, err
    assert _runs(tracking) == []


def test_log_only_refuses_a_changed_state_and_logs_the_checked_bytes(script_run, tmp_path, tracking, capsys):
    import mlflow

    out = tmp_path / "run"
    shutil.copytree(script_run[0], out)
    good = (out / QUANT_STATE_FILE).read_bytes()
    (out / QUANT_STATE_FILE).write_bytes(good + b"\0")
    code, err = _log_only(out, capsys)
    assert code == 2 and QUANT_STATE_FILE in err and "sha256" in err, err
    assert _runs(tracking) == []
    (out / QUANT_STATE_FILE).write_bytes(good)
    code, err = _log_only(out, capsys)
    assert code == 0, err
    (run,) = _runs(tracking)
    assert run.info.status == "FINISHED"
    got = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path=QUANT_STATE_FILE, dst_path=str(tmp_path / "dl")
    )
    assert Path(got).read_bytes() == good


def test_weight_amax_must_be_within_a_binade_of_the_weights_own_max():
    from vlm_autoquant.exporter.verify import _weight_amax_errors

    w = torch.tensor([[0.5, -2.0], [1.0, 0.25], [0.0, 0.0]], dtype=torch.bfloat16)
    per_channel = torch.tensor([[2.0], [1.0], [0.5]])  # max|w| per row; a zero row codes 0
    #                                                     under any positive amax
    assert _weight_amax_errors("l", per_channel, w) == []
    assert _weight_amax_errors("l", torch.tensor(2.0), w) == []
    assert _weight_amax_errors("l", torch.tensor(3.9), w) == []  # within 2x
    for bad in ([[2.0], [2.5], [1.0]], [[2.0], [0.4], [1.0]]):  # one channel beyond 2x
        (err,) = _weight_amax_errors("l", torch.tensor(bad), w)
        assert "x max|weight|" in err
    for bad in (0.0, -2.0, float("inf"), float("nan")):
        (err,) = _weight_amax_errors("l", torch.tensor(bad), w)
        assert "not a finite positive number" in err


def test_a_fused_groups_shared_weight_amax_is_plausible_for_each_member():
    """shared-max gives q/k/v one weight amax, the group's max|w|: plausible for a member whose
    own max|w| is 4x smaller; the same amax on a layer outside any fused group is not."""
    from types import SimpleNamespace

    from torch import nn

    from vlm_autoquant.exporter.verify import implausible_scales

    attn = nn.Module()
    for leaf, top in (("q_proj", 4.0), ("k_proj", 1.0), ("v_proj", 2.0)):
        lin = nn.Linear(2, 2, bias=False)
        lin.weight.data = torch.tensor([[top, 0.5], [-0.25, 0.1]])
        lin.weight_quantizer = SimpleNamespace(is_enabled=True, amax=torch.tensor(4.0))
        setattr(attn, leaf, lin)
    model = nn.Module()
    model.self_attn = attn
    assert implausible_scales(model) == []
    model.o_proj = nn.Linear(2, 2, bias=False)
    model.o_proj.weight.data = torch.tensor([[1.0, 0.5], [-0.25, 0.1]])
    model.o_proj.weight_quantizer = SimpleNamespace(is_enabled=True, amax=torch.tensor(4.0))
    (err,) = implausible_scales(model)
    assert err.startswith("o_proj: weight amax is 4 x max|weight|")
    attn.k_proj.weight_quantizer.amax = torch.tensor(9.0)  # beyond 2x of the group's max too
    assert sorted(e.split(":")[0] for e in implausible_scales(model)) == ["o_proj", "self_attn.k_proj"]


def test_a_signal_during_the_export_stops_it_at_the_next_phase(script_run, tmp_path, monkeypatch):
    """SIGINT/SIGTERM set the stop flag; the export raises Interrupted at the next phase
    boundary (not after writing and verifying the whole checkpoint), and leaves nothing."""
    from vlm_autoquant.core.errors import Interrupted
    from vlm_autoquant.core.interrupt import StopFlag
    from vlm_autoquant.exporter import ct, pipeline
    from vlm_autoquant.exporter.inputs import ExportOptions

    flag, real_restore = StopFlag(), pipeline._restore

    def restore_then_signal(*args, **kwargs):
        model = real_restore(*args, **kwargs)
        flag.set("SIGTERM")  # what stop_on_signals' handler does
        return model

    def no_write(*args, **kwargs):
        raise AssertionError("the checkpoint was written after the signal")

    monkeypatch.setattr(pipeline, "_restore", restore_then_signal)
    monkeypatch.setattr(ct, "write_checkpoint", no_write)
    target = tmp_path / "ckpt"
    with pytest.raises(Interrupted, match="SIGTERM"):
        pipeline.export_run(ExportOptions(output_dir=target, artifacts_dir=script_run[0]), stop=flag)
    left = sorted(p.name for p in target.iterdir()) if target.exists() else []
    assert set(left) <= set(staging.BOOKKEEPING), left  # no checkpoint file (the CLI removes the rest)
