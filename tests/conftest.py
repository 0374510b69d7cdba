"""Shared fixtures: a tiny random Qwen2.5-VL checkpoint (built once), captions, MLflow store."""

from __future__ import annotations

import gc
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# Offline and quiet, before any library import reads them.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "qwen" / "qwen2_5_vl_3b_autoquant_fp8_schemes.py"
# Real data shipped with the tests (source and licence in each folder's README.md).
DATA = Path(__file__).resolve().parent / "data"
COCO = DATA / "coco2017_captions" / "captions_11k.txt"
QWEN_TOKENIZER = DATA / "qwen2_5_tokenizer"
# Small but real: the catalog's seq/batch shape with few steps keeps a run to a few seconds.
# The `defaults:` block of a small catalog for tests (few tiny batches; schemes add the rest).
SMALL_DEFAULTS = """\
defaults:
  formats: [FP8_DEFAULT_CFG]
  method: gradient
  num_calib_samples: 512
  num_calib_steps: 2
  num_score_steps: 2
  num_eval_samples: 64
  seq_len: 128
  batch_size: 8
  seed: 1234
  disabled_layers: ["*lm_head*"]
"""
QUICK = [
    "--num-calib-samples",
    "512",
    "--num-calib-steps",
    "2",
    "--num-score-steps",
    "2",
    "--num-eval-samples",
    "64",
    "--seq-len",
    "128",
]


# The sweep's test catalog: five budgets, kl_div and pcpt beside them (tests/run/test_sweep.py).
BUDGETS = (8, 9, 10, 12, 16)
SWEEP_CATALOG = (
    SMALL_DEFAULTS
    + "schemes:\n"
    + "".join(f"  b{b}:\n    description: {b} bits\n    effective_bits: {b}\n" for b in BUDGETS)
    + """
  kl10:
    description: kl
    method: kl_div
    effective_bits: 10
    num_score_steps: 1
  pcpt10:
    description: per-channel/per-token next to per-tensor
    formats: [FP8_DEFAULT_CFG, FP8_PER_CHANNEL_PER_TOKEN_CFG]
    effective_bits: 10
"""
)


@pytest.fixture(scope="session")
def swept(demo, tmp_path_factory):
    """One sweep of SWEEP_CATALOG on the demo (its root: out/, cat.yaml, mlflow.db, stdout.txt),
    read by tests/run/test_sweep.py and compared with by tests/search/test_replicas.py."""
    import contextlib
    import io
    import os

    from vlm_autoquant.cli import sweep_main

    root = tmp_path_factory.mktemp("sweep")
    (root / "cat.yaml").write_text(SWEEP_CATALOG)
    old, cwd = os.environ.get("MLFLOW_TRACKING_URI"), os.getcwd()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.chdir(root)  # MLflow's default artifact root is ./mlruns
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            code = sweep_main(
                [
                    "--model-dir",
                    str(demo[0]),
                    "--calib-file",
                    str(demo[1]),
                    "--output-dir",
                    str(root / "out"),
                    "--catalog",
                    str(root / "cat.yaml"),
                ]
            )
    finally:
        (root / "stdout.txt").write_text(stdout.getvalue())
        os.chdir(cwd)
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI")
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
    assert code == 0
    return root


# Modules imported since the last gc.freeze(): torch, transformers, ModelOpt, MLflow and
# matplotlib leave ~1.5 M objects that live as long as the process, and every full collection
# walks all of them again (75 full collections, ~40 s CPU over the default run). Frozen, they are
# skipped; what the tests make after the freeze is collected as usual.
_FROZEN_AT = [0]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Freeze what the imports made, before the next test sets up, once many modules arrived."""
    if len(sys.modules) - _FROZEN_AT[0] > 300:
        gc.collect()
        gc.freeze()
        _FROZEN_AT[0] = len(sys.modules)


@pytest.fixture(scope="session", autouse=True)
def _store_template(tmp_path_factory) -> Iterator[None]:
    """New SQLite stores made in this process are copies of one store that MLflow's own
    migrations made once (each migration takes ~1.5 s; the suite makes dozens). The copy's
    Default experiment points at ./mlruns/0 of the directory it is made in, as MLflow's would;
    the creation around it (lock, temporary file, rename) is the package's own. Subprocesses
    migrate for real, and so does the child process a run starts to migrate while it imports
    (`StoreBuild`): here a run makes its store in-process instead, unless a test asks for the
    child with the `store_child` fixture."""
    from vlm_autoquant import tracking_store

    real, real_spare = tracking_store._migrate, tracking_store._cores_to_spare
    tracking_store._cores_to_spare = lambda: False  # no child: the store is made in-process
    root = tmp_path_factory.mktemp("store_template")
    template = root / "mlflow.db"

    def migrate(path: Path) -> None:
        if not template.exists():
            cwd = os.getcwd()
            os.chdir(root)  # MLflow roots the Default experiment's artifacts at ./mlruns
            try:
                real(template)
            finally:
                os.chdir(cwd)
        shutil.copyfile(template, path)
        with sqlite3.connect(path) as db:
            db.execute(
                "UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                (str(root / "mlruns"), str(Path.cwd() / "mlruns")),
            )
        db.close()
        with open(path, "rb+") as f:
            os.fsync(f.fileno())

    tracking_store._migrate = migrate
    yield
    tracking_store._migrate, tracking_store._cores_to_spare = real, real_spare


@pytest.fixture(scope="session", autouse=True)
def _tracker_in_process() -> Iterator[None]:
    """A scheme's tracker stays in the test process (as on two cores, where CI runs); a test
    asks for the child process with the `tracker_child` fixture."""
    from vlm_autoquant import tracking

    real = tracking.tracker_in_child
    tracking.tracker_in_child = lambda: False
    yield
    tracking.tracker_in_child = real


@pytest.fixture
def tracker_child(monkeypatch) -> None:
    """A scheme's tracker lives in a child process, as beside a free core."""
    from vlm_autoquant import tracking

    monkeypatch.setattr(tracking, "tracker_in_child", lambda: True)


@pytest.fixture
def store_child(monkeypatch) -> None:
    """A run's new SQLite store migrates in a child process, as outside the tests."""
    from vlm_autoquant import tracking_store

    monkeypatch.setattr(tracking_store, "_cores_to_spare", lambda: True)  # even on two cores


@pytest.fixture(scope="session", autouse=True)
def _datasets_cache(tmp_path_factory):
    os.environ["HF_DATASETS_CACHE"] = str(tmp_path_factory.mktemp("hf_datasets"))


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> tuple[Path, Path]:
    """(model_dir, captions): the embedded demo's tiny checkpoint, released layout."""
    from vlm_autoquant.model.demo import build_demo

    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def layouts(demo, tmp_path_factory) -> dict[str, Path]:
    """The same random weights (same seed) in every supported checkpoint layout."""
    from vlm_autoquant.model.demo import build_checkpoint, make_captions

    root = tmp_path_factory.mktemp("layouts")
    out = {"released": demo[0]}
    for layout in ("save_pretrained", "legacy"):
        out[layout] = build_checkpoint(
            root / layout, "tiny", layout, seed=0, tokenizer=make_captions(3000, 0)
        )
    return out


@pytest.fixture(scope="session")
def script_run(demo, tmp_path_factory) -> tuple[Path, str, str]:
    """(out, uri, stderr): one real run of the script in a subprocess (fp8-balanced-10b, QUICK)
    into its own SQLite store; its stdout is kept in `out.parent / "stdout.txt"`. Shared by every
    test that only reads a finished run (its artifacts, manifest and MLflow run), so none of them
    may change `out` or the store: a test that writes to a store copies the database first
    (test_export.source)."""
    root = tmp_path_factory.mktemp("script_run")
    out = root / "out"
    uri = f"sqlite:///{root / 'mlflow.db'}"
    proc = subprocess.run(
        [
            PY,
            str(SCRIPT),
            "--scheme-name",
            "fp8-balanced-10b",
            "--model-dir",
            str(demo[0]),
            "--output-dir",
            str(out),
            "--calib-file",
            str(demo[1]),
            *QUICK,
        ],
        cwd=root,
        env=subprocess_env(MLFLOW_TRACKING_URI=uri),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (root / "stdout.txt").write_text(proc.stdout)
    return out, uri, proc.stderr


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(tmp_path)  # artifacts land under tmp_path/mlruns
    return uri


def run_cli(args: list[str]) -> int:
    """The real entry point, in-process (imports once; the subprocess tests cover the script)."""
    from vlm_autoquant.cli import main

    return main([str(a) for a in args])


def subprocess_env(**extra: str) -> dict:
    # MLflow leaves MLFLOW_EXPERIMENT_ID etc. in os.environ after in-process runs; a child
    # process must not inherit them.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")
    }
    env.update(PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


PY = sys.executable
