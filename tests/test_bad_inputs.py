"""Bad input at the CLI: exit code 2, a message naming the input and its fix, nothing written.

Every usage error is checked through `vlm_autoquant.cli.main` in-process (conftest.run_cli):
- the exit code is 2;
- stderr names the input (the flag, the catalog file, MLFLOW_TRACKING_URI or the dependency)
  and holds a `fix:` line, and no traceback;
- --output-dir was not created (or, when it existed, is byte-for-byte what it was);
- no MLflow run was made (the temporary SQLite store of the `tracking` fixture stays absent).
The accepted-but-odd calibration files run for real with the QUICK settings.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest

from vlm_autoquant.core.artifacts import MANIFEST_FILE
from vlm_autoquant.plan import validate as deps
from vlm_autoquant.plan.schemes import default_catalog

from .conftest import QUICK, SMALL_DEFAULTS, run_cli

SCHEME = "fp8-balanced-10b"
SHARD1 = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"
INDEX = "model.safetensors.index.json"


# ----------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (relative path -> bytes); {} when `root` does not exist."""
    if root.is_file():
        return {"": root.read_bytes()}
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def base_args(demo, out: Path, *extra, model_dir=None, calib=None, scheme=SCHEME) -> list:
    args = [
        "--scheme-name",
        scheme,
        "--model-dir",
        model_dir if model_dir is not None else demo[0],
        "--output-dir",
        out,
        "--calib-file",
        calib if calib is not None else demo[1],
    ]
    return args + list(extra)


def expect_usage_error(
    capsys, args: list, *names: str, out: Path, tracking_uri: str | None = None, problems: int | None = None
) -> str:
    """Run the CLI, assert a clean exit-2 usage error that mentions every one of `names`."""
    before = snapshot(out)
    existed = out.exists()
    code = run_cli(args)
    err = capsys.readouterr().err
    assert code == 2, f"exit {code}, stderr:\n{err}"
    assert "Traceback" not in err, err
    assert "error:" in err and re.search(r"^\s*fix: \S", err, re.M), err
    assert "--debug" not in err, f"a usage error must not send the user to --debug:\n{err}"
    for name in names:
        assert name in err, f"{name!r} not in:\n{err}"
    if problems is not None:
        head = "1 problem" if problems == 1 else f"{problems} problems"
        assert f"{head} with the input" in err, err
    if existed:
        assert snapshot(out) == before, "a usage error changed --output-dir"
    else:
        assert not out.exists(), f"a usage error left {out} behind: {list(out.rglob('*'))}"
    if tracking_uri is not None and tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///") :])
        assert not db.exists(), "a usage error reached MLflow"
    return err


def copy_ckpt(demo, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo[0], tmp_path / "ckpt"))


def write_catalog(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "catalog.yaml"
    p.write_text(text, encoding="utf-8")
    return p


# A small valid catalog; the tests below break it in one place each.
CATALOG = (
    "schema_version: 1\n"
    + SMALL_DEFAULTS
    + """\
schemes:
  mine-10b:
    description: a scheme
    effective_bits: 10.0
"""
)


@pytest.fixture
def out(tmp_path) -> Path:
    return tmp_path / "out"


# ----------------------------------------------------------------------------- --model-dir


def _missing(d: Path) -> Path:
    return d.parent / "does-not-exist"


def _file(d: Path) -> Path:
    f = d.parent / "a-file"
    f.write_text("not a checkpoint")
    return f


def _no_config(d: Path) -> Path:
    (d / "config.json").unlink()
    return d


def _model_type(model_type: str, arch: str):
    def edit(d: Path) -> Path:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(model_type=model_type, architectures=[arch])
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    return edit


def _config_not_json(d: Path) -> Path:
    (d / "config.json").write_text('{"model_type": "qwen2_5_vl",')
    return d


def _config_field_type(d: Path) -> Path:
    """A config.json that is JSON and says qwen2_5_vl, with a text field of the wrong type."""
    cfg = json.loads((d / "config.json").read_text())
    cfg["hidden_size"] = "64"
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _config_set(**fields):
    """config.json with top-level fields changed (the released flat layout)."""

    def edit(d: Path) -> Path:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(fields)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    return edit


def _shard_missing(d: Path) -> Path:
    (d / SHARD2).unlink()
    return d


def _truncate(keep):
    def edit(d: Path) -> Path:
        shard = d / SHARD1
        data = shard.read_bytes()
        shard.write_bytes(data[: keep(len(data))])
        return d

    return edit


def _index_names_absent(d: Path) -> Path:
    index = json.loads((d / INDEX).read_text())
    key = sorted(index["weight_map"])[0]
    index["weight_map"][key] = "model-00003-of-00003.safetensors"
    (d / INDEX).write_text(json.dumps(index))
    return d


def _no_index(d: Path) -> Path:
    (d / INDEX).unlink()
    return d


def _no_tokenizer(d: Path) -> Path:
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        (d / name).unlink(missing_ok=True)
    return d


MODEL_DIR_CASES = {
    "missing": (_missing, ["does not exist"]),
    "not-a-directory": (_file, ["is not a directory"]),
    "no-config": (_no_config, ["no config.json"]),
    "config-not-json": (_config_not_json, ["config.json is not valid JSON"]),
    "config-wrong-field-type": (_config_field_type, ["config.json", "hidden_size"]),
    "qwen2-text-model": (_model_type("qwen2", "Qwen2ForCausalLM"), ["'qwen2'", "qwen2_5_vl"]),
    "llava": (_model_type("llava", "LlavaForConditionalGeneration"), ["'llava'", "qwen2_5_vl"]),
    "llama-architectures-empty": (
        _config_set(model_type="llama", architectures=[]),
        ["'llama'", "qwen2_5_vl"],
    ),
    "llama-architectures-null": (
        _config_set(model_type="llama", architectures=None),
        ["'llama'", "qwen2_5_vl"],
    ),
    # the demo has 4 decoder layers: 200000 declared ones are refused before any is built
    "layers-200000": (
        _config_set(num_hidden_layers=200000),
        ["num_hidden_layers is 200000", "decoder layers 0..3 (4 layers)"],
    ),
    "layers-fewer": (
        _config_set(num_hidden_layers=1),
        ["num_hidden_layers is 1", "decoder layers 0..3 (4 layers)"],
    ),
    "vocab-size-wrong": (_config_set(vocab_size=10**9), ["vocab_size is 1000000000", "embedding"]),
    "layers-negative": (_config_set(num_hidden_layers=-3), ["num_hidden_layers", "(-3)"]),
    "shard-missing": (_shard_missing, [SHARD2, "re-download"]),
    "shard-truncated-tail": (_truncate(lambda n: n - 1000), [SHARD1, "cannot be read"]),
    "shard-truncated-header": (_truncate(lambda n: 100), [SHARD1, "cannot be read"]),
    "shard-empty": (_truncate(lambda n: 0), [SHARD1, "cannot be read"]),
    "index-names-absent-file": (_index_names_absent, ["model-00003-of-00003.safetensors", "absent"]),
    "shards-without-index": (_no_index, [INDEX]),
    "no-tokenizer": (_no_tokenizer, ["no tokenizer files"]),
}


@pytest.mark.parametrize("case", list(MODEL_DIR_CASES))
def test_bad_model_dir(case, demo, tmp_path, out, tracking, capsys, monkeypatch):
    from vlm_autoquant.model import lm

    built = []
    real_meta_model = lm.meta_model
    monkeypatch.setattr(lm, "meta_model", lambda cfg: built.append(cfg) or real_meta_model(cfg))
    edit, needles = MODEL_DIR_CASES[case]
    model_dir = edit(copy_ckpt(demo, tmp_path))
    expect_usage_error(
        capsys,
        base_args(demo, out, *QUICK, model_dir=model_dir),
        "--model-dir",
        *needles,
        out=out,
        tracking_uri=tracking,
        problems=1,
    )
    if case.startswith(("layers-", "vocab-")):
        assert not built, "a module was built from sizes the weights do not have"


# ----------------------------------------------------------------------------- --scheme-name


def test_unknown_scheme_lists_the_known_ones(demo, out, tracking, capsys):
    err = expect_usage_error(
        capsys,
        base_args(demo, out, scheme="fp8-nope-3b"),
        "--scheme-name",
        "'fp8-nope-3b'",
        out=out,
        tracking_uri=tracking,
        problems=1,
    )
    for known in ("fp8-all-8b", "fp8-balanced-10b", "fp8-conservative-12b", "fp8-kl-10b"):
        assert known in err
    # Without --output-dir the default outputs/<scheme> (under the cwd) is not created either.
    default_out = Path("outputs") / "fp8-nope-3b"
    expect_usage_error(
        capsys,
        ["--scheme-name", "fp8-nope-3b", "--model-dir", demo[0], "--calib-file", demo[1]],
        "--scheme-name",
        out=default_out,
        tracking_uri=tracking,
        problems=1,
    )
    assert not Path("outputs").exists()


# ----------------------------------------------------------------------------- --catalog


def _dup_scheme(text: str) -> str:
    return text + "  mine-10b:\n    description: again\n    effective_bits: 12.0\n"


CATALOG_CASES = {
    # (edit of CATALOG, strings the message must hold)
    # line numbers: seq_len is on line 9 of CATALOG, effective_bits on line 16
    "malformed-mapping": (
        lambda t: t.replace("seq_len: 128", "seq_len: 128: 256"),
        ["malformed YAML", "line 9:"],
    ),
    "malformed-unclosed": (
        lambda t: t.replace("seq_len: 128", "seq_len: [128"),
        ["malformed YAML", re.compile(r"line (9|10):")],
    ),
    "malformed-indent": (
        lambda t: t.replace("    effective_bits: 10.0", "   effective_bits: 10.0"),
        ["malformed YAML", "line 16:"],
    ),
    "malformed-tab": (lambda t: t.replace("  seq_len: 128", "\tseq_len: 128"), ["malformed YAML", "line 9:"]),
    "empty": (lambda t: "", ["non-empty 'schemes'"]),
    "scheme-not-a-mapping": (lambda t: t + "  other-9b: 9\n", ["schemes.other-9b", "must be a mapping"]),
    "unknown-key": (
        lambda t: t + "    num_calib_stepz: 4\n",
        ["schemes.mine-10b.num_calib_stepz", "unknown key", "num_calib_steps"],
    ),
    "unknown-top-level-key": (lambda t: "extra: 1\n" + t, ["extra", "unknown top-level key"]),
    "wrong-type-str": (
        lambda t: t.replace("num_calib_steps: 2", "num_calib_steps: two"),
        ["num_calib_steps", "'two'"],
    ),
    "wrong-type-list": (lambda t: t.replace("seed: 1234", "seed: [1234]"), ["seed"]),
    "wrong-type-bits": (
        lambda t: t.replace("effective_bits: 10.0", "effective_bits: ten"),
        ["effective_bits", "'ten'"],
    ),
    "unknown-format": (
        lambda t: t.replace("[FP8_DEFAULT_CFG]", "[FP8_BLOCKWISE_CFG]"),
        ["unknown ModelOpt format 'FP8_BLOCKWISE_CFG'", "FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG"],
    ),
    "duplicate-scheme-name": (_dup_scheme, ["duplicate key 'mine-10b'", "line 17:", "first on line 14"]),
    # under 1 KB; expanded, 9**9 strings: refused before one value is built
    "alias-bomb": (lambda t: t + ALIAS_BOMB, ["alias bomb", "100000 values"]),
    "alias-cycle": (lambda t: t + "  loop-9b: &loop {description: [*loop]}\n", ["alias bomb"]),
}
ALIAS_BOMB = "bomb:\n  a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"  {b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi")
)


@pytest.mark.parametrize("case", list(CATALOG_CASES))
def test_bad_catalog(case, demo, tmp_path, out, tracking, capsys):
    edit, needles = CATALOG_CASES[case]
    catalog = write_catalog(tmp_path, edit(CATALOG))
    plain = [n for n in needles if isinstance(n, str)]
    err = expect_usage_error(
        capsys,
        base_args(demo, out, "--catalog", catalog, scheme="mine-10b"),
        str(catalog),
        *plain,
        out=out,
        tracking_uri=tracking,
    )
    for pattern in (n for n in needles if not isinstance(n, str)):
        assert pattern.search(err), f"{pattern.pattern!r} not in:\n{err}"
    assert "lol" not in err, "an expanded value was echoed"


def test_valid_small_catalog_is_accepted_by_validation(demo, tmp_path, out, tracking, capsys):
    """Control for test_bad_catalog: the unbroken catalog gets past validation (to the
    output-dir check, which refuses a file)."""
    catalog = write_catalog(tmp_path, CATALOG)
    out.write_text("x")
    err = expect_usage_error(
        capsys,
        base_args(demo, out, "--catalog", catalog, scheme="mine-10b"),
        "--output-dir",
        out=out,
        tracking_uri=tracking,
        problems=1,
    )
    assert str(catalog) not in err


def test_catalog_line_numbers_match_the_text():
    """Guards the hard-coded line numbers of CATALOG_CASES."""
    lines = CATALOG.splitlines()
    assert lines[8] == "  seq_len: 128" and lines[15] == "    effective_bits: 10.0"
    dup = _dup_scheme(CATALOG).splitlines()
    assert [i for i, line in enumerate(dup, start=1) if line == "  mine-10b:"] == [14, 17]


def test_bad_catalog_with_list_schemes(tmp_path, capsys):
    catalog = write_catalog(tmp_path, CATALOG.replace("seq_len: 128", "seq_len: 128: 256"))
    code = run_cli(["--list-schemes", "--catalog", catalog])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert str(catalog) in captured.err and "line 9" in captured.err and "fix:" in captured.err
    assert "Traceback" not in captured.err and "mine-10b" not in captured.out


def test_missing_catalog_file(demo, tmp_path, out, tracking, capsys):
    catalog = tmp_path / "nope.yaml"
    expect_usage_error(
        capsys,
        base_args(demo, out, "--catalog", catalog),
        str(catalog),
        "not found",
        "--catalog",
        out=out,
        tracking_uri=tracking,
        problems=1,
    )


# ----------------------------------------------------------------------------- --effective-bits


@pytest.mark.parametrize(
    "value,needles",
    [
        ("nan", ["finite"]),
        ("-1", ["greater than 0"]),
        ("0", ["greater than 0"]),
        ("16.5", ["less than or equal to 16"]),
        ("17", ["less than or equal to 16"]),
        ("inf", ["finite"]),
        ("7.5", ["not achievable", "[8, 16]"]),
    ],
)
def test_bad_effective_bits(value, needles, demo, out, tracking, capsys):
    expect_usage_error(
        capsys,
        base_args(demo, out, *QUICK, "--effective-bits", value),
        "--effective-bits",
        *needles,
        out=out,
        tracking_uri=tracking,
        problems=1,
    )


def test_bits_below_minimum_when_lm_head_is_counted(demo, tmp_path, out, tracking, capsys):
    """cost_excluded_layers: [] counts the BF16 lm_head, so the minimum rises above 8."""
    text = default_catalog().read_text(encoding="utf-8")
    assert "cost_excluded_layers: null" in text
    catalog = write_catalog(tmp_path, text.replace("cost_excluded_layers: null", "cost_excluded_layers: []"))
    err = expect_usage_error(
        capsys,
        base_args(demo, out, *QUICK, "--catalog", catalog, "--effective-bits", "8.2"),
        "--effective-bits",
        "8.2 effective bits is not achievable",
        out=out,
        tracking_uri=tracking,
        problems=1,
    )
    low, high = map(float, re.search(r"achievable range is \[([\d.]+), ([\d.]+)\]", err).groups())
    assert 8.2 < low < 16 and high == 16


def test_scheme_bits_below_minimum_names_the_catalog_field(demo, tmp_path, out, tracking, capsys):
    """The same range check when the catalog (not the flag) sets the budget."""
    text = (
        default_catalog()
        .read_text(encoding="utf-8")
        .replace("cost_excluded_layers: null", "cost_excluded_layers: []")
    )
    catalog = write_catalog(tmp_path, text)
    expect_usage_error(
        capsys,
        base_args(demo, out, *QUICK, "--catalog", catalog, scheme="fp8-all-8b"),
        "fp8-all-8b.effective_bits",
        "not achievable",
        out=out,
        tracking_uri=tracking,
        problems=1,
    )


# ----------------------------------------------------------------------------- steps, samples


@pytest.mark.parametrize("flag", ["--num-score-steps", "--num-calib-steps", "--num-calib-samples"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_nonpositive_steps_and_samples(flag, value, demo, out, tracking, capsys):
    args = base_args(demo, out, *QUICK)
    args[args.index(flag) + 1] = value  # QUICK sets each of these flags; replace its value
    expect_usage_error(
        capsys, args, flag, "greater than 0", f"got {value}", out=out, tracking_uri=tracking, problems=1
    )


def test_negative_eval_samples(demo, out, tracking, capsys):
    """0 held-out captions is allowed (it turns the evaluation off); a negative count is not."""
    args = base_args(demo, out, *QUICK)
    args[args.index("--num-eval-samples") + 1] = "-1"
    expect_usage_error(
        capsys,
        args,
        "--num-eval-samples",
        "greater than or equal to 0",
        out=out,
        tracking_uri=tracking,
        problems=1,
    )


# ----------------------------------------------------------------------------- --calib-file


def _invalid_utf8(p: Path) -> None:
    p.write_bytes(b"A red dog sits on the street.\nA blue cat runs.\nUn caf\xe9 cr\xe8me.\nok\n")


CALIB_CASES = {
    "missing": (None, ["does not exist"]),
    "empty": (lambda p: p.write_bytes(b""), ["is empty"]),
    "only-blank-lines": (lambda p: p.write_bytes(b"\n   \n\t\n\r\n\n"), ["only blank lines"]),
    "invalid-utf8": (_invalid_utf8, ["line 3", "UTF-8"]),
    "a-directory": (lambda p: p.mkdir(), ["is not a file"]),
}


@pytest.mark.parametrize("case", list(CALIB_CASES))
def test_bad_calib_file(case, demo, tmp_path, out, tracking, capsys):
    make, needles = CALIB_CASES[case]
    calib = tmp_path / "captions.txt"
    if make is not None:
        make(calib)
    expect_usage_error(
        capsys,
        base_args(demo, out, *QUICK, calib=calib),
        "--calib-file",
        str(calib),
        *needles,
        out=out,
        tracking_uri=tracking,
        problems=1,
    )


def run_ok(args: list, capsys) -> str:
    code = run_cli(args)
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def finished(script_run):
    """A quick real run (LF captions, QUICK) in its own --output-dir and MLflow store:
    conftest.script_run, shared read-only (the tests below check that it stays unchanged)."""
    out = script_run[0]
    assert (out / MANIFEST_FILE).is_file()
    return out


def manifest_of(out: Path) -> dict:
    return json.loads((out / MANIFEST_FILE).read_text())


def test_crlf_captions_are_accepted(finished, demo, tmp_path, out, tracking, capsys):
    lf = demo[1].read_bytes()
    assert b"\r" not in lf
    calib = tmp_path / "crlf.txt"
    calib.write_bytes(lf.replace(b"\n", b"\r\n"))
    run_ok(base_args(demo, out, *QUICK, calib=calib), capsys)
    m, ref = manifest_of(out), manifest_of(finished)
    assert m["calibration"]["crlf"] is True and ref["calibration"]["crlf"] is False
    # The same captions as the LF file: no '\r' reached the tokenizer.
    assert m["calibration"]["split"] == ref["calibration"]["split"]
    assert m["calibration"]["tokens"] == ref["calibration"]["tokens"]
    assert m["search"]["scoring_group"] == ref["search"]["scoring_group"]


def test_one_enormous_line_is_truncated_with_a_warning(demo, tmp_path, out, tracking, capsys, caplog):
    words = demo[1].read_text(encoding="utf-8").split()
    line = " ".join(words * (2_000_000 // len(" ".join(words)) + 1))[:2_000_000]
    calib = tmp_path / "huge.txt"
    calib.write_text(line + "\n", encoding="utf-8")
    err = run_ok(base_args(demo, out, *QUICK, calib=calib), capsys)
    logged = caplog.text + err
    assert re.search(r"1 caption\(s\) longer than seq_len=128 tokens were truncated", logged), logged
    m = manifest_of(out)
    assert m["calibration"]["truncated"] == 1
    assert m["calibration"]["tokens"] <= 128  # one caption, cut to the row length


def test_fewer_captions_than_asked_warns_and_uses_them(demo, tmp_path, out, tracking, capsys, caplog):
    captions = list(dict.fromkeys(demo[1].read_text(encoding="utf-8").splitlines()))[:100]
    calib = tmp_path / "few.txt"
    calib.write_text("\n".join(captions) + "\n", encoding="utf-8")
    err = run_ok(base_args(demo, out, *QUICK, calib=calib), capsys)
    assert re.search(
        r"caption file has 100 unique captions: using \d+ for calibration "
        r"\(asked 512\)",
        caplog.text + err,
    ), caplog.text + err
    split = manifest_of(out)["calibration"]["split"]
    assert split["unique"] == 100
    assert 0 < split["calib"] < 512
    assert split["calib"] + split["eval"] == 100


# ----------------------------------------------------------------------------- --output-dir


def test_output_dir_is_a_file(demo, tmp_path, tracking, capsys):
    target = tmp_path / "out"
    target.write_bytes(b"precious\n")
    expect_usage_error(
        capsys,
        base_args(demo, target, *QUICK),
        "--output-dir",
        "is a file",
        out=target,
        tracking_uri=tracking,
        problems=1,
    )
    assert target.read_bytes() == b"precious\n"


def test_output_dir_below_a_file(demo, tmp_path, tracking, capsys):
    parent = tmp_path / "afile"
    parent.write_bytes(b"precious\n")
    target = parent / "out"
    expect_usage_error(
        capsys,
        base_args(demo, target, *QUICK),
        "--output-dir",
        "not writable",
        out=target,
        tracking_uri=tracking,
        problems=1,
    )
    assert parent.read_bytes() == b"precious\n"


def _writable(folder: str) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def test_output_dir_not_writable(demo, tracking, capsys):
    target = Path("/sys/vlm_test_out")
    if _writable("/sys"):
        pytest.skip("/sys is writable here, so it cannot stand for an unwritable --output-dir")
    assert not target.exists()
    expect_usage_error(
        capsys,
        base_args(demo, target, *QUICK),
        "--output-dir",
        "not writable",
        out=target,
        tracking_uri=tracking,
        problems=1,
    )


@pytest.mark.parametrize("overwrite", [[], ["--overwrite", "false"]], ids=["absent", "false"])
def test_output_dir_holding_a_finished_run(overwrite, finished, demo, tracking, capsys):
    before = snapshot(finished)
    stats = {p: p.stat().st_mtime_ns for p in finished.rglob("*")}
    assert MANIFEST_FILE in before
    expect_usage_error(
        capsys,
        base_args(demo, finished, *QUICK, *overwrite),
        "--output-dir",
        "already holds a finished run",
        "--overwrite",
        out=finished,
        tracking_uri=tracking,
        problems=1,
    )
    assert snapshot(finished) == before
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*")} == stats


def test_usage_error_leaves_an_existing_output_dir_alone(demo, tmp_path, tracking, capsys):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine\n")
    # Two problems: the unknown scheme, and a non-empty dir this tool did not create.
    expect_usage_error(
        capsys,
        base_args(demo, target, scheme="fp8-nope-3b"),
        "--scheme-name",
        "not created by this tool",
        out=target,
        tracking_uri=tracking,
        problems=2,
    )
    assert (target / "notes.txt").read_text() == "mine\n"


# ----------------------------------------------------------------------------- dependencies

WRONG = {"torch": "2.5.1", "transformers": "4.57.1", "nvidia-modelopt": "0.39.0"}


@pytest.mark.parametrize("package", ["torch", "transformers", "nvidia-modelopt"])
@pytest.mark.parametrize("state", ["missing", "wrong-version"])
def test_bad_dependency(package, state, demo, out, tracking, capsys, monkeypatch):
    real = deps.installed_versions()
    found = None if state == "missing" else WRONG[package]
    monkeypatch.setattr(deps, "installed_versions", lambda: {**real, package: found})
    err = expect_usage_error(
        capsys,
        base_args(demo, out, *QUICK),
        f"dependency {package}",
        "pip install",
        out=out,
        tracking_uri=tracking,
        problems=1,
    )
    fix = next(line for line in err.splitlines() if line.strip().startswith("fix:"))
    assert "pip install" in fix and (package in fix)
    assert ("is not installed" if found is None else f"version {found} is outside") in err


def test_installed_dependencies_pass_and_local_versions_count():
    from vlm_autoquant.core.errors import Problems

    problems = Problems()
    deps.check_dependencies(problems)
    assert not problems, problems.items
    local = {name: None for name in deps.REQUIRED}
    local.update(
        {
            "torch": "2.13.0+cpu",
            "transformers": "5.17.0",
            "nvidia-modelopt": "0.47.0",
            "datasets": "5.0.0",
            "mlflow": "3.13.0",
            "accelerate": "1.0.0",
            "compressed-tensors": "0.20.1",
        }
    )
    deps.check_dependencies(problems, local)
    assert not problems, problems.items
    deps.check_dependencies(problems, {**local, "transformers": "5.18.0", "torch": None})
    assert [p.input for p in problems.items] == ["dependency torch", "dependency transformers"]


# ----------------------------------------------------------------------------- tracking


@pytest.mark.parametrize(
    "uri,needles",
    [
        ("http://127.0.0.1:9", ["http://127.0.0.1:9", "unreachable"]),
        ("sqlite:////sys/vlm_test_mlflow/mlflow.db", ["cannot write the SQLite store"]),
    ],
    ids=["http-unreachable", "sqlite-unwritable"],
)
def test_unusable_tracking_store(uri, needles, demo, out, tracking, capsys, monkeypatch):
    import vlm_autoquant.model.lm
    import vlm_autoquant.plan.validate

    loaded = []
    monkeypatch.setattr(vlm_autoquant.model.lm, "load_lm", lambda *a, **k: loaded.append(a))
    monkeypatch.setattr(vlm_autoquant.plan.validate, "load_tokenizer", lambda *a, **k: loaded.append(a))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    if uri.startswith("sqlite") and _writable("/sys"):
        pytest.skip("/sys is writable here, so it cannot stand for an unwritable tracking store")
    expect_usage_error(
        capsys,
        base_args(demo, out, *QUICK),
        "MLFLOW_TRACKING_URI",
        *needles,
        out=out,
        tracking_uri=tracking,
        problems=1,
    )
    assert not loaded, "the model or tokenizer was loaded before the tracking check failed"


# ----------------------------------------------------------------------------- HMAC key, GPU flags


def _key_fifo(tmp: Path) -> Path:
    import os

    os.mkfifo(tmp / "key.fifo")  # opened for reading, it would block until a writer comes
    return tmp / "key.fifo"


def _key_bytes(n: int):
    def make(tmp: Path) -> Path:
        (tmp / "key").write_bytes(b"k" * n)
        return tmp / "key"

    return make


KEY_CASES = {
    "directory": (lambda t: t, ["is a directory, not a regular file"]),
    "dev-null": (lambda t: Path("/dev/null"), ["a character device"]),
    "dev-zero": (lambda t: Path("/dev/zero"), ["a character device"]),
    "fifo": (_key_fifo, ["a FIFO"]),
    "too-short": (_key_bytes(8), ["is 8 bytes"]),
    "too-large": (_key_bytes(1 << 20), [f"is {1 << 20} bytes"]),
}


@pytest.mark.parametrize("case", list(KEY_CASES))
def test_bad_hmac_key_file_is_refused_before_anything_loads(
    case, demo, tmp_path, out, tracking, capsys, monkeypatch
):
    import vlm_autoquant.plan.validate

    make, needles = KEY_CASES[case]
    loaded = []
    monkeypatch.setattr(vlm_autoquant.plan.validate, "load_tokenizer", lambda *a, **k: loaded.append(a))
    monkeypatch.setenv("VLM_AUTOQUANT_HMAC_KEY_FILE", str(make(tmp_path)))
    expect_usage_error(
        capsys,
        base_args(demo, out, *QUICK),
        "VLM_AUTOQUANT_HMAC_KEY_FILE",
        *needles,
        out=out,
        tracking_uri=tracking,
        problems=1,
    )
    assert not loaded, "the tokenizer was loaded before the key file was refused"


def test_a_world_readable_hmac_key_warns_and_a_private_one_does_not(tmp_path, monkeypatch, caplog):
    import logging

    from vlm_autoquant.core.errors import Problems
    from vlm_autoquant.core.hmac_key import check_key_file

    key = tmp_path / "hmac.key"
    key.write_bytes(b"k" * 32)
    monkeypatch.setenv("VLM_AUTOQUANT_HMAC_KEY_FILE", str(key))
    for mode, warned in ((0o600, False), (0o640, False), (0o644, True)):
        key.chmod(mode)
        caplog.clear()
        problems = Problems()
        with caplog.at_level(logging.WARNING):
            check_key_file(problems)
        assert not problems
        assert ("readable by every user" in caplog.text and f"chmod 600 {key}" in caplog.text) == warned, (
            oct(mode),
            caplog.text,
        )


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--gpus", "0,,;x"], "--gpus"),
        (["--gpus", "0,0"], "--gpus"),
        (["--max-gpu-memory=-5GiB"], "--max-gpu-memory"),
        (["--max-gpu-memory", "0GiB"], "--max-gpu-memory"),
        (["--max-gpu-memory", "120GiB,,x"], "--max-gpu-memory"),
    ],
    ids=["gpus-garbage", "gpus-twice", "memory-negative", "memory-zero", "memory-garbage"],
)
def test_bad_gpu_flags_are_refused_on_every_machine(flags, needle, demo, out, tracking, capsys):
    """Refused by their syntax alone, so a CPU machine (this one, maybe) refuses them too."""
    expect_usage_error(
        capsys, base_args(demo, out, *QUICK, *flags), needle, out=out, tracking_uri=tracking, problems=1
    )


# ----------------------------------------------------------------------------- together, --debug


def test_several_problems_are_reported_together(demo, tmp_path, out, tracking, capsys):
    err = expect_usage_error(
        capsys,
        base_args(demo, out, model_dir=tmp_path / "no-model", scheme="fp8-nope-3b"),
        "--model-dir",
        "--scheme-name",
        out=out,
        tracking_uri=tracking,
        problems=2,
    )
    assert err.count("fix:") == 2


def test_many_problems_at_once(demo, tmp_path, tracking, capsys):
    target = tmp_path / "out"
    target.write_text("x")
    calib = tmp_path / "empty.txt"
    calib.write_bytes(b"")
    err = expect_usage_error(
        capsys,
        base_args(
            demo,
            target,
            "--num-score-steps",
            "0",
            "--effective-bits",
            "nan",
            model_dir=tmp_path / "no-model",
            calib=calib,
        ),
        "--model-dir",
        "--calib-file",
        "--output-dir",
        "--num-score-steps",
        "--effective-bits",
        out=target,
        tracking_uri=tracking,
        problems=5,
    )
    assert err.count("fix:") == 5


def test_an_omitted_model_dir_is_one_short_message(tmp_path, out, tracking, capsys):
    """--scheme-name has a default; leaving out --model-dir names it and the fix, in a few lines
    and without argparse's usage dump."""
    err = expect_usage_error(
        capsys, ["--output-dir", out], "--model-dir", "is missing", out=out, tracking_uri=tracking, problems=1
    )
    assert "usage:" not in err and len(err.strip().splitlines()) <= 4, err
    assert "--scheme-name" not in err


def test_an_unknown_flag_is_one_short_message(capsys):
    with pytest.raises(SystemExit) as exc:
        run_cli(["--model-dri", "x"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--model-dri" in err and "--help" in err
    assert "usage:" not in err and len(err.strip().splitlines()) <= 2, err


def test_debug_is_not_needed_for_a_clean_message(demo, tmp_path, out, tracking, capsys):
    """The plain message is already complete; --debug changes neither it nor the exit code."""
    args = base_args(demo, out, *QUICK, model_dir=tmp_path / "nope", scheme="fp8-nope-3b")
    plain = expect_usage_error(
        capsys,
        args,
        "--model-dir",
        "does not exist",
        "--scheme-name",
        out=out,
        tracking_uri=tracking,
        problems=2,
    )
    debug = expect_usage_error(
        capsys,
        [*args, "--debug"],
        "--model-dir",
        "does not exist",
        "--scheme-name",
        out=out,
        tracking_uri=tracking,
        problems=2,
    )
    assert plain.startswith("error: 2 problems with the input:")
    assert debug == plain


# ----------------------------------------------------------------------------- artifacts read back


def _finished_copy(script_run, tmp_path: Path) -> Path:
    return Path(shutil.copytree(script_run[0], tmp_path / "run"))


def test_a_bad_manifest_field_is_named_by_log_only_and_the_export(script_run, tmp_path, tracking, capsys):
    from vlm_autoquant.cli.export import main as export_main

    run = _finished_copy(script_run, tmp_path)
    doc = json.loads((run / MANIFEST_FILE).read_text())
    doc["scheme"]["seq_len"] = "abc"
    doc["layers"][0]["format"] = None
    (run / MANIFEST_FILE).write_text(json.dumps(doc))
    code = run_cli(["--log-only", "--output-dir", run])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "scheme.seq_len" in err and "'abc'" in err and "layers[0]" in err
    code = export_main(["--artifacts-dir", str(run), "--output-dir", str(tmp_path / "o"), "--no-mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and "scheme.seq_len" in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_an_amax_of_the_wrong_shape_is_named(script_run, demo, tmp_path):
    import torch

    from vlm_autoquant.core.errors import UsageError
    from vlm_autoquant.model import quant_state

    state = torch.load(script_run[0] / "quantized_state.pt", weights_only=True)
    key = next(
        k
        for k, v in state["quantizer_state"].items()
        if k.endswith(".weight_quantizer") and torch.is_tensor(v.get("_amax"))
    )
    state["quantizer_state"][key]["_amax"] = torch.ones(3)  # no linear has 3 output channels
    bad = tmp_path / "quantized_state.pt"
    torch.save(state, bad)
    with pytest.raises(UsageError) as info:
        quant_state.restore(demo[0], bad, torch.device("cpu"))
    text = info.value.render()
    assert f"quantizer_state[{key!r}]._amax has shape [3]" in text and "fix:" in text
