"""Reliability: nothing executed, nothing mixed, nothing lost.

- Search checkpoints: a forged pickle with a recomputed (unsigned) record is refused with exit 2
  and its payload never runs, even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1; a validly signed but
  non-tensor pickle is refused by the explicit weights_only=True load, without torch's hint.
- One writer per output dir: real concurrent processes race for the lock; exactly one wins and
  the loser names the winner's PID; the CLI refuses a locked dir with exit 2.
- The user's files: a foreign non-empty dir is refused; with --overwrite none of its files is
  replaced; /, home, the model dir and the project root are refused.
- Path errors (name too long, symlink loop, FIFO, device) are exit 2 with the flag and a fix.
- Stale temporary files of ours are swept (never a user's); a finished record + temporary
  checkpoint left by a kill is promoted, not refused.
- Hostile model dirs (FIFO tokenizer config, index outside the dir, wrong shapes, more layers
  than the weights hold, foreign keys) are refused before loading, naming the tensor.
- Calibration text must be text; the manifest ties the artifacts by sha256; restore checks them
  and refuses NaN amax. SIGTERM after the search: exit 130 with the finished artifacts kept.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vlm_autoquant.core import artifacts, integrity, paths
from vlm_autoquant.core.artifacts import (
    MANIFEST_FILE,
    PROJECT_ROOT,
    QUANT_STATE_FILE,
    SEARCH_CHECKPOINT,
    SEARCH_DIR,
)
from vlm_autoquant.core.errors import Interrupted, Problems, UsageError
from vlm_autoquant.model import quant_state
from vlm_autoquant.model.checkpoint import check_lm_tensors, inspect_checkpoint
from vlm_autoquant.plan.calib_data import check_caption_file
from vlm_autoquant.run import manifest
from vlm_autoquant.search import resume

from .conftest import PY, QUICK, SCRIPT, run_cli, subprocess_env
from .forked import popen_script

SCHEME = "fp8-balanced-10b"


@pytest.fixture(autouse=True)
def _hmac_key(tmp_path_factory, monkeypatch):
    """A key of this test session (never the user's ~/.cache key)."""
    monkeypatch.setenv(integrity.KEY_ENV, str(tmp_path_factory.getbasetemp() / "key" / "hmac.key"))


def cli_args(demo, out, *extra, model_dir=None, calib=None) -> list:
    return [
        "--scheme-name",
        SCHEME,
        "--model-dir",
        model_dir or demo[0],
        "--output-dir",
        out,
        "--calib-file",
        calib or demo[1],
        *QUICK,
        *extra,
    ]


def usage_error(capsys, args) -> str:
    code = run_cli(args)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}:\n{err}"
    assert "Traceback" not in err and "fix:" in err, err
    return err


class Payload:
    """Unpickling this creates a file: proof that a pickle ran code."""

    def __init__(self, flag: Path):
        self.flag = flag

    def __reduce__(self):
        return (open, (str(self.flag), "w"))


def plant_forged_checkpoint(out: Path, flag: Path, signed: bool, fingerprint=None) -> Path:
    (out / SEARCH_DIR).mkdir(parents=True)
    (out / artifacts.MARKER_FILE).write_text("{}")
    ckpt = out / SEARCH_DIR / SEARCH_CHECKPOINT
    torch.save({"candidate_stats": {}, "evil": Payload(flag)}, ckpt)
    record = {
        "record_version": 2,
        "written_by": "vlm_autoquant",
        "stage": "scored",
        "sha256": artifacts.sha256_file(ckpt),
        "fingerprint": fingerprint or {},
    }
    resume.record_path(ckpt).write_text(json.dumps(integrity.sign(record) if signed else record))
    return ckpt


# ------------------------------------------------------------------- 1. checkpoints run no code


def test_forged_checkpoint_with_recomputed_sha_is_refused_by_the_cli(
    demo, tmp_path, tracking, capsys, monkeypatch
):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    out, flag = tmp_path / "out", tmp_path / "PWNED"
    plant_forged_checkpoint(out, flag, signed=False)
    err = usage_error(capsys, cli_args(demo, out, "--overwrite", "false"))
    assert "signed" in err and "--overwrite" in err
    assert "weights_only=False" not in err
    assert not flag.exists(), "the forged pickle ran its payload"


def test_signed_but_non_tensor_pickle_never_runs_even_when_env_disables_weights_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    out, flag = tmp_path / "out", tmp_path / "PWNED"
    ckpt = plant_forged_checkpoint(out, flag, signed=True)  # as if the key had leaked
    with pytest.raises(UsageError) as exc:
        resume.load_verified(ckpt)
    text = exc.value.render()
    assert not flag.exists(), "weights_only was overridden by the environment"
    assert "without running any of its code" in text and "weights_only=False" not in text


def test_record_hmac_covers_every_field_and_key_is_private(tmp_path):
    record = integrity.sign({"sha256": "a" * 64, "fingerprint": {"x": 1}})
    assert integrity.verified(record)
    assert not integrity.verified({**record, "sha256": "b" * 64})
    assert not integrity.verified({**record, "fingerprint": {"x": 2}})
    assert not integrity.verified({k: v for k, v in record.items() if k != "hmac"})
    key = integrity.key_path()
    assert key.is_file() and (key.stat().st_mode & 0o777) == 0o600


def test_searcher_state_loads_only_with_a_signed_record(tmp_path):
    ckpt = tmp_path / "s.pth"

    class Searcher:
        config = {"checkpoint": str(ckpt)}
        default_state_dict = {"candidate_stats": {}, "best": None}

        def _get_checkpoint_path(self):
            return str(ckpt)

    resume.save_with_record(
        ckpt, {"k": 1}, "scored", lambda tmp: torch.save({"candidate_stats": {"a": 1}}, tmp)
    )
    s = Searcher()
    assert resume.load_searcher_state(s) and s.candidate_stats == {"a": 1} and s.best is None
    torch.save({"candidate_stats": {"a": 2}}, ckpt)  # replaced after the record
    with pytest.raises(UsageError, match="changed after it was verified"):
        resume.load_searcher_state(Searcher())


# ------------------------------------------------------------------ 3. one writer per output dir

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from vlm_autoquant.core import artifacts
    from vlm_autoquant.core.errors import UsageError
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    sys.stdin.readline()  # start together
    try:
        with artifacts.locked_output_dir(Path(sys.argv[1])):
            print("locked", flush=True)
            time.sleep(float(sys.argv[2]))
    except UsageError as exc:
        print("refused", exc.render().replace("\\n", " "), flush=True)
        sys.exit(2)
""")


def _holders(out: Path, n: int, hold_s: float) -> list[subprocess.Popen]:
    procs = [
        subprocess.Popen(
            [PY, "-c", HOLD, str(out), str(hold_s)],
            env=subprocess_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(n)
    ]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    return procs


def test_lock_race_between_real_processes_has_one_winner_naming_its_pid(tmp_path):
    out = tmp_path / "out"
    procs = _holders(out, 2, 3.0)
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    results = [(p.pid, p.communicate(timeout=60)[0], p.returncode) for p in procs]
    winners = [r for r in results if r[2] == 0]
    losers = [r for r in results if r[2] == 2]
    assert len(winners) == 1 and len(losers) == 1, results
    assert f"PID {winners[0][0]}" in losers[0][1], results
    with artifacts.locked_output_dir(out):  # released when the holder exits
        pass


def test_cli_refuses_a_locked_output_dir_at_once(demo, tmp_path, tracking, capsys):
    out = tmp_path / "out"
    (holder,) = _holders(out, 1, 60.0)
    try:
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().startswith("locked")
        t0 = time.perf_counter()
        err = usage_error(capsys, cli_args(demo, out))
        assert f"PID {holder.pid}" in err and "in use" in err
        assert time.perf_counter() - t0 < 120  # validation only; never waits for the holder
        assert not (out / MANIFEST_FILE).exists()
    finally:
        holder.kill()
        holder.wait()


# ------------------------------------------------------------------- 5. the user's files are safe


def _check(path: Path, overwrite=False, model_dir=None) -> str:
    problems = Problems()
    artifacts.check_output_dir(path, problems, MANIFEST_FILE, overwrite, model_dir=model_dir)
    return "\n".join(str(p) for p in problems.items)


@pytest.mark.parametrize("where", ["root", "home", "project", "model"])
def test_protected_output_dirs_are_refused(where, demo):
    path = {"root": Path("/"), "home": Path.home(), "project": PROJECT_ROOT, "model": demo[0]}[where]
    text = _check(path, overwrite=True, model_dir=demo[0])
    assert "will not write there" in text, text


def test_foreign_nonempty_dir_refused_and_never_overwritten(demo, tmp_path, tracking, capsys):
    out = tmp_path / "theirs"
    out.mkdir()
    mine = {"layers.csv": "my,own\n", "scheme.yaml": "mine: 1\n", "notes.txt": "keep\n"}
    for name, text in mine.items():
        (out / name).write_text(text)
    err = usage_error(capsys, cli_args(demo, out))
    assert "not created by this tool" in err
    err = usage_error(capsys, cli_args(demo, out, "--overwrite"))
    assert "layers.csv" in err and "never replaces" in err
    assert {n: (out / n).read_text() for n in mine} == mine
    assert not (out / artifacts.MARKER_FILE).exists()


def test_foreign_dir_with_overwrite_and_no_clash_is_allowed(tmp_path):
    (tmp_path / "notes.txt").write_text("keep\n")
    assert _check(tmp_path, overwrite=True) == ""
    assert "not created by this tool" in _check(tmp_path, overwrite=False)


# ---------------------------------------------------------- 6. every path error is exit 2 + fix


def test_path_errors_of_every_input_are_exit_2_with_a_fix(demo, tmp_path, tracking, capsys):
    long_component = tmp_path / ("x" * 300)
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    fifo = tmp_path / "captions.fifo"
    os.mkfifo(fifo)
    args = [
        "--scheme-name",
        SCHEME,
        "--model-dir",
        long_component,
        "--output-dir",
        tmp_path / ("o" * 300) / "out",
        "--calib-file",
        fifo,
        "--catalog",
        loop,
        *QUICK,
    ]
    err = usage_error(capsys, args)
    for flag in ("--model-dir", "--output-dir", "--calib-file", "--catalog"):
        assert flag in err, (flag, err)
    assert "path too long" in err and "FIFO" in err and "symbolic-link loop" in err


def test_output_dir_over_path_max(demo, tmp_path, tracking, capsys):
    deep = tmp_path.joinpath(*(["d" * 200] * 25))  # > 4096 characters
    err = usage_error(capsys, cli_args(demo, deep))
    assert "--output-dir" in err and "path too long" in err


def test_device_where_a_file_is_expected(tmp_path):
    problems = Problems()
    assert not paths.probe(Path("/dev/null"), "--calib-file", problems, "file")
    assert "character device" in str(problems.items[0])
    with pytest.raises(paths.NotARegularFile):
        paths.read_regular(Path("/dev/zero"), 1 << 20)


def test_permission_denied_is_reported(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not deny reads, EACCES cannot occur")
    f = tmp_path / "secret.txt"
    f.write_text("x\n")
    f.chmod(0)
    problems = Problems()
    assert not paths.probe(f, "--calib-file", problems, "file")
    assert "permission denied" in str(problems.items[0])


# ------------------------------------------------------------- 7. temp files and a resume window


def test_stale_temporary_files_of_ours_are_swept_but_not_the_users(tmp_path):
    out = tmp_path / "out"
    (out / SEARCH_DIR).mkdir(parents=True)
    ours = [out / ".manifest.json.k2j4h_x9.tmp", out / SEARCH_DIR / ".autoquant_search.json.a1b2.tmp"]
    theirs = [out / ".notes.txt.abc.tmp", out / "draft.tmp"]
    for p in ours + theirs:
        p.write_text("x")
    with artifacts.locked_output_dir(out):
        pass
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in theirs)


def test_kill_between_record_and_rename_resumes_from_the_finished_pair(tmp_path):
    ckpt = tmp_path / SEARCH_DIR / SEARCH_CHECKPOINT
    fp = {"model.x": 1}
    resume.save_with_record(ckpt, fp, "calibrated", lambda t: torch.save({"v": 1}, t))
    # the next save is killed after its record was renamed, before the checkpoint was
    tmp = resume.tmp_checkpoint(ckpt).with_name(f"{ckpt.name}.tmp-99999")
    torch.save({"v": 2, "candidate_stats": {"s": 1}}, tmp)
    resume.write_record(ckpt, fp, "scored", source=tmp)
    reuse = resume.check_reusable(ckpt, fp, overwrite=False)
    assert reuse.stage == "scored"
    assert resume.load_verified(ckpt)["v"] == 2
    assert not tmp.exists()


def test_sigterm_before_the_run_handlers_is_exit_130_not_a_kill():
    from vlm_autoquant.core.interrupt import terminate_as_interrupt

    with pytest.raises(Interrupted):
        with terminate_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)


# ------------------------------------------------------------------- 8. hostile model dirs


def _copy(demo, tmp_path) -> Path:
    return Path(shutil.copytree(demo[0], tmp_path / "ckpt"))


def _arch_problems(d: Path) -> str:
    from vlm_autoquant.model.lm import meta_model, text_config

    problems = Problems()
    info = inspect_checkpoint(d, problems)
    if info is not None and not problems:
        cfg = text_config(d)
        check_lm_tensors(
            info,
            {k: tuple(v.shape) for k, v in meta_model(cfg).state_dict().items()},
            bool(cfg.tie_word_embeddings),
            problems,
        )
    return "\n".join(str(p) for p in problems.items)


def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def _rewrite(shard: Path, edit) -> None:
    tensors = load_file(str(shard))
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})


def test_fifo_tokenizer_config_is_refused_without_blocking(demo, tmp_path):
    d = _copy(demo, tmp_path)
    (d / "tokenizer_config.json").unlink()
    os.mkfifo(d / "tokenizer_config.json")
    t0 = time.perf_counter()
    text = _arch_problems(d)
    assert "tokenizer_config.json" in text and "FIFO" in text
    assert time.perf_counter() - t0 < 30


def test_index_path_outside_the_model_dir_is_refused(demo, tmp_path):
    d = _copy(demo, tmp_path)
    shard = _shards(d)[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(shard, outside)
    index = {"metadata": {}, "weight_map": {k: str(outside) for k in load_file(str(shard))}}
    shard.unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    for p in _shards(d):
        p.unlink()
    text = _arch_problems(d)
    assert "outside the model dir" in text and str(outside) in text
    index["weight_map"] = {k: "../" + outside.name for k in index["weight_map"]}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "outside the model dir" in _arch_problems(d)


def _first_lm_key(tensors: dict, suffix: str) -> str:
    return next(k for k in sorted(tensors) if k.endswith(suffix) and "visual" not in k)


def test_wrong_shape_is_named_before_loading(demo, tmp_path):
    d = _copy(demo, tmp_path)
    shard = next(s for s in _shards(d) if any(k.endswith("mlp.up_proj.weight") for k in load_file(str(s))))
    names = []

    def edit(t):
        k = _first_lm_key(t, "mlp.up_proj.weight")
        names.append(k)
        t[k] = t[k][:-1].clone()

    _rewrite(shard, edit)
    text = _arch_problems(d)
    assert names[0] in text and "shape" in text


def test_config_declaring_more_layers_than_the_weights_hold(demo, tmp_path):
    d = _copy(demo, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    text_cfg = cfg.get("text_config", cfg)
    n = text_cfg["num_hidden_layers"]
    text_cfg["num_hidden_layers"] = n + 1
    if "layer_types" in text_cfg:
        text_cfg["layer_types"] = text_cfg["layer_types"] + text_cfg["layer_types"][-1:]
    (d / "config.json").write_text(json.dumps(cfg))
    text = _arch_problems(d)
    assert f"layers.{n}." in text and "absent from the weights" in text


def test_foreign_key_names_are_refused(demo, tmp_path):
    d = _copy(demo, tmp_path)

    def edit(t):
        k = _first_lm_key(t, "self_attn.o_proj.weight")
        t[k.replace("o_proj", "out_proj")] = t.pop(k)

    _rewrite(
        _shards(d)[0]
        if len(_shards(d)) == 1
        else next(s for s in _shards(d) if any(k.endswith("o_proj.weight") for k in load_file(str(s)))),
        edit,
    )
    text = _arch_problems(d)
    assert "out_proj" in text and "not part of the language model" in text
    assert "absent from the weights" in text and "o_proj.weight" in text


def test_cli_refuses_a_wrong_shape_with_exit_2(demo, tmp_path, tracking, capsys):
    d = _copy(demo, tmp_path)
    shard = next(s for s in _shards(d) if any(k.endswith("mlp.down_proj.weight") for k in load_file(str(s))))
    _rewrite(
        shard,
        lambda t: t.__setitem__(
            _first_lm_key(t, "mlp.down_proj.weight"), torch.zeros(3, 3, dtype=torch.bfloat16)
        ),
    )
    err = usage_error(capsys, cli_args(demo, tmp_path / "out", model_dir=d))
    assert "down_proj.weight has shape [3, 3]" in err


# ------------------------------------------------------------------- 9. calibration text is text


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"a cat\x00\x00\x00 on a mat\n" * 20, "control characters"),
        (b"a dog\x07\x1b[31m runs\n" * 20, "control characters"),
        ("a cat on a mat\nthe dog runs\n".encode("utf-16-le"), "UTF-16LE"),
        ("a cat on a mat\n".encode("utf-16-be"), "UTF-16BE"),
        ("\ufeff \u3000\u00a0\u200b\n\t\n".encode("utf-8"), "no printable caption"),
    ],
)
def test_text_that_is_not_text_is_refused(content, needle, tmp_path):
    f = tmp_path / "captions.txt"
    f.write_bytes(content)
    problems = Problems()
    assert check_caption_file(f, problems) is None
    text = str(problems.items[0])
    assert needle in text and str(f) in text


def test_tabs_crlf_and_a_rare_control_char_are_accepted(tmp_path):
    f = tmp_path / "captions.txt"
    f.write_bytes(b"a cat\ton a mat\r\n" * 2000 + b"one odd \x0c line\n")
    problems = Problems()
    info = check_caption_file(f, problems)
    assert info is not None and not problems and info.nonblank == 2001


def test_control_char_error_names_the_line(tmp_path):
    f = tmp_path / "captions.txt"
    f.write_bytes(b"fine caption\n" * 3 + b"bad\x00\x00\x00\x00\x00\n")
    problems = Problems()
    check_caption_file(f, problems)
    assert "line 4" in str(problems.items[0])


# ------------------------------------ 7 + 10. SIGTERM after the search; integrity of the artifacts


@pytest.fixture(scope="module")
def terminated_after_search(demo, tmp_path_factory):
    """A real run, in its own process (tests/forked.py), sent SIGTERM once the search is done
    (during evaluation/saving)."""
    root = tmp_path_factory.mktemp("sigterm_late")
    out = root / "out"
    env = subprocess_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", **{integrity.KEY_ENV: str(root / "hmac.key")}
    )
    proc = popen_script([PY, str(SCRIPT), *map(str, cli_args(demo, out))], env, root)
    lines, sent = [], False
    deadline = time.time() + 400
    for line in proc.stderr:
        lines.append(line)
        if not sent and "scores ran, formats" in line:
            proc.send_signal(signal.SIGTERM)
            sent = True
        if time.time() > deadline:
            proc.kill()
    rc = proc.wait()
    return {"rc": rc, "stderr": "".join(lines), "sent": sent, "out": out}


@pytest.mark.slow
def test_sigterm_after_the_search_exits_130_and_keeps_the_result(terminated_after_search):
    r = terminated_after_search
    assert r["sent"], r["stderr"][-3000:]
    assert r["rc"] == 130, r["stderr"][-3000:]
    assert (r["out"] / MANIFEST_FILE).is_file() and (r["out"] / QUANT_STATE_FILE).is_file()
    assert not [p for p in r["out"].rglob("*") if ".tmp" in p.name]


@pytest.mark.slow
def test_manifest_ties_the_artifacts_and_restore_checks_them(terminated_after_search, demo, tmp_path):
    out = terminated_after_search["out"]
    doc = json.loads((out / MANIFEST_FILE).read_text())
    digests = doc["artifacts_sha256"]
    for name in (QUANT_STATE_FILE, "scheme.yaml", "layers.csv"):
        assert digests[name] == artifacts.sha256_file(out / name), name
    record = manifest.read(out / MANIFEST_FILE, "--output-dir", "rerun")
    quant_state.check_against_manifest(out / QUANT_STATE_FILE, record)
    other = tmp_path / QUANT_STATE_FILE
    payload = torch.load(out / QUANT_STATE_FILE, weights_only=True)
    amax_keys = [
        (q, k)
        for q, st in payload["quantizer_state"].items()
        for k in st
        if "amax" in k and torch.is_tensor(st[k])
    ]
    assert amax_keys, "the demo run quantized nothing"
    q, k = amax_keys[0]
    payload["quantizer_state"][q][k] = torch.full_like(payload["quantizer_state"][q][k], float("nan"))
    torch.save(payload, other)
    with pytest.raises(UsageError, match="differs from the manifest"):
        quant_state.check_against_manifest(other, record)
    with pytest.raises(UsageError, match="NaN or Inf"):
        quant_state.restore(demo[0], other, torch.device("cpu"))
