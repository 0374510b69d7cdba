"""The sweep: scoring once per group, same formats as single runs, quality invariants, MLflow."""

from __future__ import annotations

import csv
import json
import threading
import time

import pytest

from vlm_autoquant.cli import sweep_main
from vlm_autoquant.core.artifacts import COMPARISON_FILE, MANIFEST_FILE, PARETO_FIGURE
from vlm_autoquant.tracking import DEFAULT_EXPERIMENT, M_KL

from ..conftest import BUDGETS, QUICK, SWEEP_CATALOG, run_cli


def demo_dir(root):
    return json.loads(next((root / "out").glob(f"*/{MANIFEST_FILE}")).read_text())["model"]["directory"]


def manifests(root):
    return {p.parent.name: json.loads(p.read_text()) for p in (root / "out").glob(f"*/{MANIFEST_FILE}")}


def test_one_search_per_method_whatever_the_formats(swept):
    """The budgets and pcpt (another candidate set) share one gradient search; kl_div has its own."""
    ms = manifests(swept)
    assert set(ms) == {f"b{b}" for b in BUDGETS} | {"kl10", "pcpt10"}
    gradient = [ms[f"b{b}"] for b in BUDGETS] + [ms["pcpt10"]]
    assert len({m["search"]["scoring_group"] for m in gradient}) == 1
    assert [m["search"]["scores"] for m in gradient].count("ran") == 1
    assert [m["search"]["calibration"] for m in gradient].count("ran") == 1
    assert {m["search"]["scores"] for m in gradient} == {"ran", "shared"}
    kl = ms["kl10"]["search"]
    assert kl["scoring_group"] != gradient[0]["search"]["scoring_group"]
    assert kl["scores"] == "ran"
    # kl_div's FP8 calibration is the gradient union's (FP8 + pcpt), not calibrated again
    assert kl["calibration_seeded_from"] == gradient[0]["search"]["scoring_group"]
    assert kl["calibration"] == "restored"
    # each scheme saw only its own candidates
    assert all(set(x["scores"]) <= {"FP8_DEFAULT_CFG", "BF16"} for x in ms["b10"]["layers"])
    assert any("FP8_PER_CHANNEL_PER_TOKEN_CFG" in x["scores"] for x in ms["pcpt10"]["layers"])


def test_quality_invariants(swept):
    ms = manifests(swept)
    kl = {b: ms[f"b{b}"]["quality"]["kl_mean"] for b in BUDGETS}
    assert kl[16] == 0.0 and ms["b16"]["quality"]["top1_agreement"] == 1.0
    assert ms["b16"]["summary"]["fp8"] == 0
    for lo, hi in zip(BUDGETS, BUDGETS[1:]):  # fewer bits, more loss (small noise allowed)
        assert kl[lo] >= kl[hi] * 0.9, (lo, hi, kl)
    assert kl[8] == max(m["quality"]["kl_mean"] for m in ms.values())
    for m in ms.values():
        q = m["quality"]
        assert q["ppl_rel_change"] == pytest.approx(q["ppl_quant"] / q["ppl_ref"] - 1)
        assert m["summary"]["compression_ratio"] == pytest.approx(
            m["summary"]["weight_bytes_bf16"] / m["summary"]["weight_bytes"]
        )


def test_comparison_table_and_figure(swept):
    rows = list(csv.DictReader((swept / "out" / COMPARISON_FILE).open()))
    # the catalog's order, whatever order the searches ran in
    assert [r["scheme"] for r in rows] == [f"b{b}" for b in BUDGETS] + ["kl10", "pcpt10"]
    assert {r["status"] for r in rows} == {"FINISHED"}
    assert rows[0]["kl_mean"] and float(rows[0]["effective_bits"]) == 8.0


def test_mlflow_parent_with_a_child_per_scheme(swept):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{swept / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == len(BUDGETS) + 2
    parent = parents[0]
    assert parent.data.metrics["sweep/scoring_runs"] == 2
    assert parent.data.params["model_dir"] == str(demo_dir(swept))
    assert -1.0 <= parent.data.metrics["sweep/spearman_predicted_vs_kl"] <= 1.0
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert {client.get_experiment(r.info.experiment_id).name for r in runs} == {DEFAULT_EXPERIMENT}
    last = (swept / "stdout.txt").read_text().strip().splitlines()[-1]
    assert last == (
        f"sweep: MLflow run {parent.info.run_id} in experiment '{DEFAULT_EXPERIMENT}'; "
        f"output in {swept / 'out'}; next: mlflow ui --backend-store-uri "
        f"sqlite:///{swept / 'mlflow.db'}"
    )
    assert all(M_KL in c.data.metrics and c.info.status == "FINISHED" for c in children)
    # in turn (two cores), the sweep's log phase is its schemes' reports together
    assert parent.data.metrics["time/log_s"] == pytest.approx(
        sum(c.data.metrics["time/log_s"] for c in children)
    )
    arts = {a.path: a.file_size for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.json", PARETO_FIGURE, COMPARISON_FILE} <= set(arts)
    assert arts[PARETO_FIGURE] > 10_000  # a rendered figure
    child_arts = {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert MANIFEST_FILE in child_arts


def test_single_run_gives_the_same_formats_as_the_sweep(swept, demo, tmp_path, tracking):
    # pcpt alone: its own search, the same formats as in the union; kl10 alone: calibrated by
    # itself on its own model, not seeded from the union nor searched beside it
    for b in ("b9", "pcpt10", "kl10"):
        out = tmp_path / f"single{b}"
        assert (
            run_cli(
                [
                    "--scheme-name",
                    b,
                    "--catalog",
                    swept / "cat.yaml",
                    "--model-dir",
                    demo[0],
                    "--calib-file",
                    demo[1],
                    "--output-dir",
                    out,
                ]
            )
            == 0
        )
        single = json.loads((out / MANIFEST_FILE).read_text())
        in_sweep = manifests(swept)[b]
        assert single["search"]["scores"] == "ran"
        assert [(x["name"], x["format"]) for x in single["layers"]] == [
            (x["name"], x["format"]) for x in in_sweep["layers"]
        ]


def test_sweep_refuses_a_finished_sweep_without_overwrite(swept, demo, capsys):
    code = sweep_main(
        [
            "--model-dir",
            str(demo[0]),
            "--calib-file",
            str(demo[1]),
            "--output-dir",
            str(swept / "out"),
            "--catalog",
            str(swept / "cat.yaml"),
            *QUICK,
        ]
    )
    assert code == 2 and "--overwrite" in capsys.readouterr().err


def _sweep(demo, tmp_path, monkeypatch, schemes: str) -> tuple[int, str]:
    """(exit code, tracking URI) of a quick sweep of `schemes` into tmp_path/out."""
    (tmp_path / "cat.yaml").write_text(SWEEP_CATALOG)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    args = ["--model-dir", demo[0], "--calib-file", demo[1], "--output-dir", tmp_path / "out"]
    args += ["--catalog", tmp_path / "cat.yaml", "--schemes", schemes, *QUICK]
    code = sweep_main([str(a) for a in args])
    return code, uri


def _comparison(root) -> dict[str, dict]:
    """comparison.csv of the sweep into root/out, by scheme."""
    return {r["scheme"]: r for r in csv.DictReader((root / "out" / COMPARISON_FILE).open())}


def _runs_by_name(uri: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {r.data.tags.get("mlflow.runName"): r for r in runs}


def test_a_failing_scheme_or_report_is_marked_and_the_sweep_goes_on(demo, tmp_path, monkeypatch, capsys):
    """b9's solver fails, b10's report fails: both are FAILED rows and FAILED runs with the
    reason (b10's with the command that logs its result, which is on disk); b8 finishes."""
    from vlm_autoquant.run import report
    from vlm_autoquant.search import autoquant

    real_solve, real_log = autoquant.solve, report._log

    def solve(model, found, formats, bits):
        if bits == 9:
            raise RuntimeError("injected solver failure")
        return real_solve(model, found, formats, bits)

    def log(tracker, doc, *args):
        if doc.scheme.name == "b10":
            raise OSError("injected tracking outage")
        return real_log(tracker, doc, *args)

    monkeypatch.setattr(autoquant, "solve", solve)
    monkeypatch.setattr(report, "_log", log)
    code, uri = _sweep(demo, tmp_path, monkeypatch, "b8,b9,b10")
    err = capsys.readouterr().err
    assert code == 1 and "2 of 3 schemes failed: b9, b10" in err and "Traceback" not in err
    rows = _comparison(tmp_path)
    assert rows["b9"]["status"] == "FAILED" and "injected solver failure" in rows["b9"]["error"]
    assert rows["b10"]["status"] == "FAILED" and "injected tracking outage" in rows["b10"]["error"]
    assert "--log-only --output-dir" in rows["b10"]["error"]
    assert rows["b8"]["status"] == "FINISHED"
    assert (tmp_path / "out" / "b10" / MANIFEST_FILE).exists()  # the result is on disk
    assert not (tmp_path / "out" / "b9" / MANIFEST_FILE).exists()
    runs = _runs_by_name(uri)
    assert runs["b9"].info.status == runs["b10"].info.status == "FAILED"
    assert "injected solver failure" in runs["b9"].data.tags["failure_reason"]
    assert "injected tracking outage" in runs["b10"].data.tags["failure_reason"]
    assert runs["b8"].info.status == "FINISHED" and M_KL in runs["b8"].data.metrics
    assert runs["sweep"].data.metrics["sweep/failed"] == 2


def test_beside_a_free_core_a_report_is_logged_beside_the_next_scheme_and_a_stop_waits_for_it(
    demo, tmp_path, monkeypatch, capsys, tracker_child
):
    """With the children's trackers in child processes, the first scheme's report runs while the
    second scheme solves; a Ctrl-C then still leaves the first scheme's run FINISHED with its
    metrics, figure and caption datasets, and the sweep's run KILLED."""
    from vlm_autoquant.run import pipeline
    from vlm_autoquant.search import autoquant

    second_solves, beside = threading.Event(), {}
    real_solve, real_log = autoquant.solve, pipeline.log_finished

    def solve(model, found, formats, bits):
        if bits == 9:
            second_solves.set()
            raise KeyboardInterrupt  # Ctrl-C while the second scheme solves
        return real_solve(model, found, formats, bits)

    def log_finished(tracker, doc, *args):
        beside[doc.scheme.name] = second_solves.wait(20)
        time.sleep(1.0)  # still logging when the stop arrives
        real_log(tracker, doc, *args)

    monkeypatch.setattr(autoquant, "solve", solve)
    monkeypatch.setattr(pipeline, "log_finished", log_finished)
    code, uri = _sweep(demo, tmp_path, monkeypatch, "b8,b9")
    assert code == 130, capsys.readouterr().err[-2000:]
    assert beside == {"b8": True}  # b8's report waited for b9's solve: it ran beside it
    runs = _runs_by_name(uri)
    b8 = runs["b8"]
    assert b8.info.status == "FINISHED" and M_KL in b8.data.metrics and "time/log_s" in b8.data.metrics
    assert b8.data.tags["mlflow.parentRunId"] == runs["sweep"].info.run_id
    assert b8.info.experiment_id == runs["sweep"].info.experiment_id
    assert sorted(d.dataset.name for d in b8.inputs.dataset_inputs) == ["calibration", "held-out"]
    import mlflow

    assert "sensitivity.png" in {a.path for a in mlflow.MlflowClient(uri).list_artifacts(b8.info.run_id)}
    assert runs["b9"].info.status == "KILLED" and runs["sweep"].info.status == "KILLED"


def test_every_members_run_starts_before_its_familys_search_and_a_stop_there_kills_them_all(
    demo, tmp_path, monkeypatch, capsys
):
    """The members' child runs (beside a free core, their MLflow processes) start before the
    family's search, so they are ready when it ends; a Ctrl-C during the search ends each of
    them KILLED, none left RUNNING."""
    from vlm_autoquant.run import sweep

    opened, at_search = [], []
    real_child = sweep._child_run

    def child_run(run, scheme):
        opened.append(scheme.name)
        return real_child(run, scheme)

    def search_family(model, family, *args):
        at_search.append(sorted(opened))
        raise KeyboardInterrupt  # Ctrl-C during the first family's search

    monkeypatch.setattr(sweep, "_child_run", child_run)
    monkeypatch.setattr(sweep, "search_family", search_family)
    code, uri = _sweep(demo, tmp_path, monkeypatch, "b8,b9,kl10")
    assert code == 130, capsys.readouterr().err[-2000:]
    assert at_search == [["b8", "b9"]]  # the first family's members, before its search
    runs = _runs_by_name(uri)
    assert {n: r.info.status for n, r in runs.items()} == {"b8": "KILLED", "b9": "KILLED", "sweep": "KILLED"}


def test_a_child_tracker_that_dies_fails_its_scheme_with_the_command_that_logs_it_later(
    demo, tmp_path, monkeypatch, capsys, tracker_child
):
    from vlm_autoquant.run import pipeline

    real = pipeline.log_finished

    def log_finished(tracker, doc, *args):
        if doc.scheme.name == "b8":
            tracker._proc.kill()  # the MLflow process dies before the report
            tracker._proc.wait()
        return real(tracker, doc, *args)

    monkeypatch.setattr(pipeline, "log_finished", log_finished)
    code, uri = _sweep(demo, tmp_path, monkeypatch, "b8,b9")
    err = capsys.readouterr().err
    assert code == 1 and "1 of 2 schemes failed: b8" in err and "Traceback" not in err
    rows = _comparison(tmp_path)
    assert rows["b8"]["status"] == "FAILED" and "ended unexpectedly" in rows["b8"]["error"]
    assert "--log-only --output-dir" in rows["b8"]["error"]
    assert rows["b9"]["status"] == "FINISHED" and (tmp_path / "out" / "b8" / MANIFEST_FILE).exists()
    assert _runs_by_name(uri)["b9"].info.status == "FINISHED"


@pytest.mark.parametrize("scheme", ["b8", "kl10", "pcpt10"])
def test_a_child_run_exports_by_run_id_and_passes_every_check(
    swept, demo, scheme, tmp_path, monkeypatch, capsys
):
    """Any catalog scheme's run, here a sweep's child runs (all FP8; kl_div; per-channel weights
    with per-token activations), exports by its run id in both formats into checkpoints that
    pass every check, with the FP8 codes byte for byte the run's."""
    from vlm_autoquant.cli.export import main as export_main
    from vlm_autoquant.core.artifacts import RUN_ID_FILE

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{swept / 'mlflow.db'}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(swept)  # the store's artifacts are under ./mlruns there
    run_id = (swept / "out" / scheme / RUN_ID_FILE).read_text().splitlines()[0]
    out = tmp_path / "ckpt"
    code = export_main(
        ["--run-id", run_id, "--model-dir", str(demo[0]), "--output-dir", str(out), "--format", "both"]
    )
    assert code == 0, capsys.readouterr().err[-3000:]
    report = json.loads((out / "export_report.json").read_text())
    assert report["passed"] and report["source"]["run_id"] == run_id
    modelopt = ("formats", "vision", "scales", "weights", "numerics", "loadability")
    assert {k: c["passed"] for k, c in report["checks"].items()} == dict.fromkeys(
        (*modelopt, "names", *(f"modelopt.{k}" for k in modelopt)), True
    )
    assert report["checks"]["modelopt.weights"]["layers"] == report["checks"]["weights"]["layers"]
    assert report["checks"]["weights"]["layers"] == sum(
        r["format"] != "BF16" for r in manifests(swept)[scheme]["layers"]
    )
    assert report["checks"]["numerics"]["kl_mean"] == 0.0
