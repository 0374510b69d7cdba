"""The MLflow UI shows a sweep's comparison: a demo sweep, `mlflow server`, headless Chromium.

Runs a three-scheme demo sweep in-process into a temporary SQLite store, serves that store with
`mlflow server` on 127.0.0.1, opens MLflow's compare-runs page for the sweep's child runs in
Debian's Chromium (driven by Playwright, no downloaded browser) and reads the Parameters and
Metrics tables from the DOM. A full-page screenshot goes into the test's tmp dir, and also to
$SAVE_UI_SCREENSHOT when that is set (that is how docs/mlflow-compare.png is made).

Skips with a reason when the `playwright` package or /usr/bin/chromium is missing; with
REQUIRE_BROWSER=1 (CI) that is a failure instead.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from vlm_autoquant.tracking import (
    M_BITS_ACHIEVED,
    M_BITS_ALL,
    M_BITS_TARGET,
    M_COMPRESSION,
    M_KL,
    M_PPL_QUANT,
    M_PPL_REF,
    M_PPL_REL,
    M_TOP1,
    M_WEIGHT_BYTES,
)

from .conftest import subprocess_env

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
EXPERIMENT = "ui-test"
SCHEMES = ("fp8-all-8b", "fp8-balanced-10b", "fp8-conservative-12b")
SIZES = [
    "--num-calib-samples",
    "256",
    "--num-calib-steps",
    "2",
    "--num-score-steps",
    "2",
    "--num-eval-samples",
    "64",
    "--seq-len",
    "128",
]
# Metrics every child run logs (pipeline.quantize_scheme) that must show up in the UI.
UI_METRICS = (
    M_BITS_ACHIEVED,
    M_BITS_TARGET,
    M_BITS_ALL,
    M_KL,
    M_PPL_REF,
    M_PPL_QUANT,
    M_PPL_REL,
    M_TOP1,
    M_WEIGHT_BYTES,
    M_COMPRESSION,
)
SERVER_TIMEOUT_S = 90
PAGE_TIMEOUT_MS = 60_000


def _unavailable(reason: str) -> None:
    """Skip with the reason, or fail when the environment says a browser is required (CI)."""
    if os.environ.get("REQUIRE_BROWSER") == "1":
        pytest.fail(f"REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    print(f"\nskipping the MLflow UI test: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def sync_playwright():
    """Playwright's entry point, checked before any expensive set-up runs."""
    try:
        from playwright.sync_api import sync_playwright as entry
    except ImportError as exc:
        problem = f"the `playwright` package is not importable ({exc})"
    else:
        problem = None
    if problem:
        _unavailable(f"{problem}; pip install playwright (the browser itself comes from apt: chromium)")
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} does not exist; apt-get install chromium")
    return entry


@pytest.fixture(scope="module")
def ui_sweep(sync_playwright, demo, tmp_path_factory) -> tuple[Path, str]:
    """(root, tracking URI): the three-scheme demo sweep in a fresh SQLite store."""
    from vlm_autoquant.cli import sweep_main

    root = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for leftover in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.delenv(leftover, raising=False)  # also removes what MLflow sets during the sweep
        mp.chdir(root)  # MLflow's default artifact root is ./mlruns: keep it in the tmp dir
        code = sweep_main(
            [
                "--model-dir",
                str(demo[0]),
                "--calib-file",
                str(demo[1]),
                "--output-dir",
                str(root / "out"),
                *SIZES,
                "--schemes",
                ",".join(SCHEMES),
                "--experiment",
                EXPERIMENT,
            ]
        )
    assert code == 0
    return root, uri


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_server(ui_sweep):
    """`mlflow server` on 127.0.0.1 over the sweep's store; yields its base URL."""
    root, uri = ui_sweep
    port = _free_port()
    log_path = root / "mlflow-server.log"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    with log_path.open("wb") as log_file:
        # Own process group: `mlflow server` starts uvicorn as a child; teardown stops both.
        proc = subprocess.Popen(
            cmd,
            cwd=root,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            # No background job consumers (huey): nothing here runs jobs; it saves ~7 processes.
            env=subprocess_env(MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT_S
        while not _healthy(url):
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited with {proc.returncode}:\n"
                    f"{log_path.read_text(errors='replace')[-3000:]}",
                    pytrace=False,
                )
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server did not answer {url}/health within "
                    f"{SERVER_TIMEOUT_S} s:\n{log_path.read_text(errors='replace')[-3000:]}",
                    pytrace=False,
                )
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        else:  # the group may still hold uvicorn workers
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def compare_url(base: str, run_ids: list[str], experiment_ids: list[str]) -> str:
    """MLflow 3.x's compare-runs route (hash router): #/compare-runs?runs=[..]&experiments=[..].

    Routes.getCompareRunPageRoute in the bundled UI builds `?runs=${JSON.stringify(runs)}
    &experiments=${JSON.stringify(experiments)}`; the JSON lists are URL-encoded here.
    """
    q = lambda v: urllib.parse.quote(json.dumps(v))  # noqa: E731
    return f"{base}/#/compare-runs?runs={q(run_ids)}&experiments={q(experiment_ids)}"


# Rows of the compare page's HTML tables in the collapsible section titled `title`
# (Run details, Parameters, Tags): [[header, [cell texts]], ...].
TABLE_ROWS_JS = """(title) => {
  const items = [...document.querySelectorAll('.du-bois-light-collapse-item')].filter(
      it => it.querySelector('.du-bois-light-collapse-header')?.innerText.trim() === title);
  return items.flatMap(it => [...it.querySelectorAll('table.mlflow-compare-run-table tr')].map(
      tr => [...tr.children].map(cell => cell.innerText.trim())).map(
      cells => [cells[0] ?? '', cells.slice(1)]));
}"""

# The Metrics section is two scroll-synced react-virtualized grids (names | values) that render
# only the rows in view: returns the rendered cells by pixel position, and the scroll state.
METRIC_CELLS_JS = """() => {
  const item = [...document.querySelectorAll('.du-bois-light-collapse-item')].find(
      it => it.querySelector('.du-bois-light-collapse-header')?.innerText.trim() === 'Metrics');
  if (!item) return null;
  const grids = [...item.querySelectorAll('.ReactVirtualized__Grid')];
  const cells = g => [...g.querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')]
      .map(c => [parseFloat(c.style.top), parseFloat(c.style.left), c.innerText.trim()]);
  const values = grids.find(g => getComputedStyle(g).overflowY !== 'hidden') || grids[grids.length - 1];
  return {names: cells(grids[0]), values: grids.length > 1 ? cells(values) : [],
          scrollTop: values.scrollTop, clientHeight: values.clientHeight,
          scrollHeight: values.scrollHeight};
}"""

# Scrolls the values grid; the names grid follows. MLflow syncs the names grid to the values
# grid's scroll position as of the *previous* scroll event (it reads the grid's state before the
# update), so scroll 1 px short first: the names then end up 1 px from the values, not a page.
SCROLL_METRICS_JS = """async (top) => {
  const item = [...document.querySelectorAll('.du-bois-light-collapse-item')].find(
      it => it.querySelector('.du-bois-light-collapse-header')?.innerText.trim() === 'Metrics');
  const grids = [...item.querySelectorAll('.ReactVirtualized__Grid')];
  const values = grids.find(g => getComputedStyle(g).overflowY !== 'hidden') || grids[grids.length - 1];
  const frame = () => new Promise(r => requestAnimationFrame(() => setTimeout(r, 50)));
  top = Math.min(top, values.scrollHeight - values.clientHeight);
  values.scrollTop = Math.max(top - 1, 0);
  await frame();
  values.scrollTop = top === 0 ? 1 : top;
  await frame();
  if (top === 0) { values.scrollTop = 0; await frame(); }
  return grids.map(g => g.scrollTop);
}"""


def metric_grid(page) -> dict[float, tuple[str, list[str]]]:
    """{row top (px): (metric name, [value per run column])}, scrolling the virtualized grid."""
    names: dict[float, str] = {}
    values: dict[float, dict[float, str]] = {}
    top = 0
    while True:
        page.evaluate(SCROLL_METRICS_JS, top)
        page.wait_for_timeout(100)  # let react-virtualized render the rows now in view
        state = page.evaluate(METRIC_CELLS_JS)
        assert state is not None, "no Metrics section on the compare page"
        for y, _x, text in state["names"]:
            names[y] = text
        for y, x, text in state["values"]:
            values.setdefault(y, {})[x] = text
        if state["scrollTop"] + state["clientHeight"] >= state["scrollHeight"] - 1:
            break
        top = state["scrollTop"] + max(state["clientHeight"] - 45, 45)
    page.evaluate(SCROLL_METRICS_JS, 0)
    return {
        y: (name, [values.get(y, {})[x] for x in sorted(values.get(y, {}))])
        for y, name in sorted(names.items())
    }


def ui_rounding(value: float) -> float:
    """Largest error of the UI's Utils.formatMetric: 4 significant digits below 1e-3, then 3, 2
    and 1 decimals below 10, 100 and above."""
    v = abs(value)
    step = 1e-3 * v if v < 1e-3 else 1e-3 if v < 10 else 1e-2 if v < 100 else 0.1
    return step * 0.5 * 1.01 + 1e-12


def read_metric_rows(page) -> dict[str, list[str]]:
    """{metric name: [value per run column]} as the compare page's Metrics section shows them."""
    return dict(metric_grid(page).values())


def test_compare_page_shows_the_sweeps_params_and_metrics(sync_playwright, ui_sweep, mlflow_server, tmp_path):
    import mlflow

    root, uri = ui_sweep
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.info.run_name for r in children) == sorted(SCHEMES)
    run_ids = [r.info.run_id for r in children]
    by_id = {r.info.run_id: r for r in children}
    url = compare_url(mlflow_server, run_ids, [experiment.experiment_id])
    print(f"\ncompare page: {url}")

    shot = tmp_path / "mlflow-compare.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(url, wait_until="load")
            # The SPA fetches the runs after load: wait for the Parameters table to be filled.
            page.get_by_text(f"Comparing {len(run_ids)} Runs from 1 Experiment").wait_for()
            page.locator(
                "table.mlflow-compare-run-table th", has_text="scheme.effective_bits"
            ).first.wait_for()
            page.get_by_role("switch", name="Metrics - Show diff only").wait_for()

            # Columns follow the runs; the Run details table says which run each column is.
            details = dict(page.evaluate(TABLE_ROWS_JS, "Run details"))
            columns = details.get("Run ID:")
            assert columns and sorted(columns) == sorted(run_ids), details
            params = dict(page.evaluate(TABLE_ROWS_JS, "Parameters"))
            assert "scheme.effective_bits" in params and "scheme.name" in params, sorted(params)
            assert params["scheme.name"] == [by_id[r].data.params["scheme.name"] for r in columns]
            assert sorted(params["scheme.name"]) == sorted(SCHEMES)
            assert params["scheme.effective_bits"] == [
                by_id[r].data.params["scheme.effective_bits"] for r in columns
            ]
            assert {
                name: float(bits)
                for name, bits in zip(params["scheme.name"], params["scheme.effective_bits"])
            } == {"fp8-all-8b": 8.0, "fp8-balanced-10b": 10.0, "fp8-conservative-12b": 12.0}

            metrics = read_metric_rows(page)
            missing = [m for m in UI_METRICS if m not in metrics]
            assert not missing, f"metrics not shown: {missing}; shown: {sorted(metrics)}"
            for key in (M_BITS_ACHIEVED, M_KL, M_TOP1, M_WEIGHT_BYTES):  # as the UI rounds them
                shown = [float(v) for v in metrics[key]]
                logged = [by_id[r].data.metrics[key] for r in columns]
                assert all(abs(a - b) <= ui_rounding(b) for a, b in zip(shown, logged)), (key, shown, logged)
            assert [float(v) for v in metrics[M_BITS_ACHIEVED]] == pytest.approx(
                [float(b) for b in params["scheme.effective_bits"]], abs=0.01
            )

            # For the picture: what differs between the schemes, without the assistant panel.
            close = page.locator("[data-component-id='mlflow.assistant.chat_panel.close']")
            if close.count():
                close.first.click()
            for section in ("Parameters", "Metrics"):
                page.get_by_role("switch", name=f"{section} - Show diff only").click()
            page.locator("table.mlflow-compare-run-table th", has_text="calib_file").wait_for(
                state="detached"
            )  # the same in every run: hidden now
            diff_params = dict(page.evaluate(TABLE_ROWS_JS, "Parameters"))
            assert {"scheme.name", "scheme.effective_bits"} <= set(diff_params), diff_params
            assert "calib_file" not in diff_params and "model_dir" not in diff_params
            diff_metrics = metric_grid(page)
            rows = {name: y for y, (name, _) in diff_metrics.items()}
            assert {M_BITS_ACHIEVED, M_KL, M_TOP1} <= set(rows), sorted(rows)
            # The grid shows ~6 rows: start it at the quality metrics (the effective bits are in
            # the parameters above and in the parallel-coordinates plot).
            page.evaluate(SCROLL_METRICS_JS, rows[M_KL])
            _show_whole_comparison(page)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    assert shot.stat().st_size > 20_000
    target = os.environ.get("SAVE_UI_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
        print(f"screenshot: {target}")


def _show_whole_comparison(page) -> None:
    """Grow the viewport to the end of the Metrics section (the page scrolls inside <main>)."""
    bottom = page.evaluate("""() => {
      const item = [...document.querySelectorAll('.du-bois-light-collapse-item')].find(
          it => it.querySelector('.du-bois-light-collapse-header')?.innerText.trim() === 'Metrics');
      const main = document.querySelector('main') || document.scrollingElement;
      main.scrollTop = 0;
      return item ? item.getBoundingClientRect().bottom : 1000;
    }""")
    page.set_viewport_size({"width": 1600, "height": int(min(max(bottom + 40, 1000), 2400))})
    page.wait_for_timeout(500)
