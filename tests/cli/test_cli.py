"""The script end to end: artifacts, manifest contract, MLflow run, restore in a fresh process."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import torch

from vlm_autoquant.core.artifacts import (
    LAYERS_FILE,
    MANIFEST_FILE,
    QUANT_STATE_FILE,
    SCHEME_FILE,
    SENSITIVITY_FIGURE,
)
from vlm_autoquant.tracking import (
    DEFAULT_EXPERIMENT,
    M_BITS_ACHIEVED,
    M_KL,
    M_PPL_QUANT,
    M_PPL_REF,
    M_TOP1,
    M_WEIGHT_BYTES,
)

from ..conftest import PY, QUICK, ROOT, run_cli, subprocess_env

REQUIRED_KEYS = {
    "schema_version",
    "scheme",
    "model",
    "calibration",
    "effective_bits",
    "layers",
    "summary",
    "versions",
    "timings",
}


@pytest.fixture(scope="module")
def finished(script_run):
    """One real run through the script in a subprocess, into a temporary MLflow store
    (conftest.script_run, shared read-only with other modules)."""
    return script_run


def test_artifacts_and_manifest_contract(finished):
    out, _, log = finished
    for name in (MANIFEST_FILE, QUANT_STATE_FILE, SCHEME_FILE, LAYERS_FILE):
        assert (out / name).is_file(), name
    m = json.loads((out / MANIFEST_FILE).read_text())
    assert REQUIRED_KEYS <= set(m)
    assert m["schema_version"] == 1 and m["model"]["model_type"] == "qwen2_5_vl"
    assert set(m["effective_bits"]) >= {"target", "achieved"}
    assert m["effective_bits"]["achieved"] <= m["effective_bits"]["target"] + 1e-9
    assert m["effective_bits"]["all_linears"] > m["effective_bits"]["achieved"]  # lm_head at 16
    assert m["scheme"]["overrides"]["num_calib_steps"] == 2
    layer = m["layers"][0]
    assert set(layer) >= {"name", "group", "format", "quant_config", "num_weights", "scores", "costs"}
    assert layer["name"].startswith("model.layers.0.")
    assert m["calibration"]["padding_fraction"] <= 0.10
    assert m["model"]["parameters"]["vision_tensors_skipped"] > 0
    for phase in ("load", "calibrate", "score", "solve", "save"):  # "log" comes after the manifest
        assert phase in m["timings"]
    for phase in ("load", "evaluate", "save", "log"):
        assert f"{phase} " in log  # one log line per phase
    for phase in ("calibrate", "score"):  # one start line and one duration line each
        assert log.count(f"{phase}: started") == 1
        assert len(re.findall(rf"INFO +{phase} +[0-9.]+ s ", log)) == 1, log
    assert "overrides num_calib_samples=512 num_calib_steps=2" in log  # name=value, no dict


def test_mlflow_run_holds_params_metrics_artifacts(finished):
    import mlflow

    out, uri, _ = finished
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == DEFAULT_EXPERIMENT
    assert run.data.params["scheme.name"] == "fp8-balanced-10b"
    assert run.data.params["scheme.cost_excluded_layers"] == "*lm_head*"  # what null stands for
    assert "null" not in run.data.params.values()
    assert run.data.params["scheme.num_calib_steps"] == "2"
    for key in (M_BITS_ACHIEVED, M_KL, M_PPL_REF, M_PPL_QUANT, M_TOP1, M_WEIGHT_BYTES):
        assert key in run.data.metrics, key
    assert run.data.tags["versions.nvidia-modelopt"]
    assert run.data.tags["override.num_calib_steps"] == "2"
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {MANIFEST_FILE, QUANT_STATE_FILE, SCHEME_FILE, LAYERS_FILE, SENSITIVITY_FIGURE} <= arts
    figure = next(a for a in client.list_artifacts(run.info.run_id) if a.path == SENSITIVITY_FIGURE)
    assert figure.file_size > 10_000  # a rendered figure, not an empty file
    series = client.get_metric_history(run.info.run_id, "fp8/q_proj")
    assert sorted(p.step for p in series) == [0, 1, 2, 3]  # one point per decoder layer


RESTORE = """
import sys, torch
from pathlib import Path
from vlm_autoquant.model import quant_state
model = quant_state.restore(Path(sys.argv[1]), Path(sys.argv[2]), torch.device("cpu"))
ids = torch.arange(2 * 40).reshape(2, 40) % 400
with torch.no_grad():
    torch.save(model(input_ids=ids).logits, sys.argv[3])
"""


def test_fresh_process_restore_gives_the_same_logits(finished, demo, tmp_path):
    from vlm_autoquant.model import quant_state
    from vlm_autoquant.model.lm import load_lm, text_config

    out, _, _ = finished
    target = tmp_path / "logits.pt"
    subprocess.run(
        [PY, "-c", RESTORE, str(demo[0]), str(out / QUANT_STATE_FILE), str(target)],
        check=True,
        env=subprocess_env(),
        cwd=tmp_path,
        timeout=300,
    )
    fresh = torch.load(target)
    # A second restore, after the first and in this (long-lived) process, gives the same
    # logits: neither run depends on anything the other left or on the process it runs in.
    ids = torch.arange(2 * 40).reshape(2, 40) % 400
    again = quant_state.restore(demo[0], out / QUANT_STATE_FILE, torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, fresh)
    # and the restored model is the quantized one, not the BF16 one
    bf16 = load_lm(demo[0], text_config(demo[0]), torch.device("cpu"))
    with torch.no_grad():
        assert not torch.equal(bf16(input_ids=ids).logits, fresh)


@pytest.fixture(scope="module")
def in_process_run(demo, tmp_path_factory):
    """One run through the CLI in-process (fp8-aggressive-9b, --save-weights), into its own
    store; the output dir, read by the two tests that use it."""
    root = tmp_path_factory.mktemp("in_process")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        for leftover in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(leftover, raising=False)  # also removes what MLflow sets during the run
        mp.chdir(root)  # MLflow's default artifact root is ./mlruns
        assert (
            run_cli(
                [
                    "--scheme-name",
                    "fp8-aggressive-9b",
                    "--model-dir",
                    demo[0],
                    "--output-dir",
                    root / "o",
                    "--calib-file",
                    demo[1],
                    "--save-weights",
                    *QUICK,
                ]
            )
            == 0
        )
    return root / "o"


def test_restore_matches_the_run_model_in_process(demo, in_process_run):
    """Same logits as the model the run quantized (compared in one process, no reload tricks)."""
    from vlm_autoquant.model import quant_state

    m = json.loads((in_process_run / MANIFEST_FILE).read_text())
    restored = quant_state.restore(demo[0], in_process_run / QUANT_STATE_FILE, torch.device("cpu"))
    fp8 = {
        n
        for n, mod in restored.named_modules()
        if getattr(getattr(mod, "weight_quantizer", None), "is_enabled", False)
    }
    assert fp8 == {layer["name"] for layer in m["layers"] if layer["format"] == "FP8"}


def test_list_schemes(capsys):
    assert run_cli(["--list-schemes"]) == 0
    out = capsys.readouterr().out
    assert "fp8-all-8b" in out and "fp8-kl-10b" in out


def test_mlflow_run_main_entry_point(demo, tmp_path):
    """`mlflow run . -e main --env-manager local` end to end into a temporary tracking store."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        "main",
        "--env-manager",
        "local",
        "--experiment-name",
        "e2e",
        "-P",
        "scheme_name=fp8-conservative-12b",
        "-P",
        f"model_dir={demo[0]}",
        "-P",
        f"calib_file={demo[1]}",
        "-P",
        f"output_dir={tmp_path / 'out'}",
    ]
    for flag, value in zip(QUICK[::2], QUICK[1::2]):
        cmd += ["-P", f"{flag.lstrip('-').replace('-', '_')}={value}"]
    env = subprocess_env(MLFLOW_TRACKING_URI=uri)
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    data = runs[0].data
    assert data.params["scheme_name"] == "fp8-conservative-12b"  # logged by mlflow run
    assert "effective_bits" not in data.params  # not given: no "" placeholder param...
    assert data.params["scheme.effective_bits"] == "12.0"  # ...the effective value, once
    assert data.params["num_calib_steps"] == data.params["scheme.num_calib_steps"] == "2"
    assert "" not in data.params.values() and "''" not in data.params.values()
    assert data.metrics[M_BITS_ACHIEVED] <= 12.0 + 1e-9
    assert (tmp_path / "out" / MANIFEST_FILE).exists()
    last = proc.stdout.strip().splitlines()[-1]  # the handoff: run, experiment, output, next
    assert f"MLflow run {runs[0].info.run_id} in experiment 'e2e'" in last
    assert f"output in {tmp_path / 'out'}" in last
    assert (
        f"next: mlflow run . -e export --env-manager local -P run_id={runs[0].info.run_id} "
        f"-P model_dir={demo[0]} -P experiment=e2e"
    ) in last


def test_the_script_ends_with_the_run_and_its_export_command(finished, demo):
    import mlflow

    out, uri, _ = finished
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    model_dir = demo[0]
    lines = (out.parent / "stdout.txt").read_text().strip().splitlines()
    assert lines == [
        f"fp8-balanced-10b: MLflow run {run.info.run_id} in experiment "
        f"'{DEFAULT_EXPERIMENT}'; output in {out}; next: python "
        f"scripts/qwen/qwen2_5_vl_3b_autoquant_fp8_export.py --run-id "
        f"{run.info.run_id} --model-dir {model_dir}"
    ]


def test_a_failed_mlflow_run_is_named_and_says_why(tmp_path):
    """A wrong scheme through `mlflow run` (no --experiment-name): exit non-zero, and the FAILED
    run sits in the README's experiment, named for the scheme, with the reason as a tag."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        "mlflow",
        "run",
        str(ROOT),
        "-e",
        "main",
        "--env-manager",
        "local",
        "-P",
        "scheme_name=fp8-nope-3b",
        "-P",
        f"model_dir={tmp_path}",
    ]
    proc = subprocess.run(
        cmd,
        env=subprocess_env(MLFLOW_TRACKING_URI=uri),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "--scheme-name" in proc.stderr
    client = mlflow.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id])
    assert run.info.status == "FAILED" and run.info.run_name == "fp8-nope-3b"
    assert "--scheme-name" in run.data.tags["failure_reason"]
    (pointer,) = client.search_runs(["0"])  # mlflow run's own, in "Default"
    assert pointer.data.tags["continued_in_run"] == run.info.run_id


def test_save_weights_writes_the_lm_once(demo, in_process_run):
    from safetensors import safe_open

    from vlm_autoquant.core.artifacts import LM_WEIGHTS_FILE
    from vlm_autoquant.core.errors import Problems
    from vlm_autoquant.model.checkpoint import inspect_checkpoint

    out = in_process_run
    with safe_open(str(out / LM_WEIGHTS_FILE), "pt") as f:
        keys = set(f.keys())
    info = inspect_checkpoint(demo[0], Problems())
    assert keys == set(info.lm_keys())  # every LM tensor, tied head once, no quantizer state
    assert json.loads((out / MANIFEST_FILE).read_text())["artifacts"][LM_WEIGHTS_FILE]


def test_a_failed_run_stops_the_weights_digest_it_started(tmp_path, monkeypatch):
    """A run that fails while its base weights are still being hashed (in the background, for
    the manifest) exits without waiting for the hashing: the boundary cancels it."""
    import threading

    import torch
    from safetensors.torch import save_file

    from vlm_autoquant.cli.common import run_guarded
    from vlm_autoquant.core.errors import EXIT_FAILURE, RunFailed
    from vlm_autoquant.model import identity

    save_file({"model.norm.weight": torch.ones(4096)}, str(tmp_path / "model.safetensors"))
    held, real_range = threading.Event(), identity.sha256_range

    def held_range(path, start, end, stop=None):
        held.set()
        assert stop is not None and stop.wait(10)  # reads nothing more until cancelled
        return real_range(path, start, end, stop)

    monkeypatch.setattr(identity, "_futures", {})
    monkeypatch.setattr(identity, "sha256_range", held_range)
    digests = []

    def body() -> int:
        digests.append(identity.start(tmp_path))
        assert held.wait(10)
        raise RunFailed("out of GPU memory in the first calibration batch")

    assert run_guarded(body, debug=False, output_dir=None) == EXIT_FAILURE
    with pytest.raises(identity.Cancelled):
        digests[0].result(timeout=10)
    assert identity._futures == {}
