"""The MLflow UI shows a study as researchers will see it: headless Chromium driven by Playwright
against `mlflow server` on 127.0.0.1. Needs Debian's chromium (.ci/run installs it)."""
import json
import re
import shutil
import urllib.request
from pathlib import Path

import pytest

from servers import start_mlflow_server, stop_server
from workbench import config
from workbench.tuning import TuneOptions, run_study

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt-get install chromium)")


@pytest.fixture
def mlflow_server(tiny_config, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = config.replace(tiny_config, epochs_prompt=1, epochs_image=1, save_checkpoints=False)
    study = run_study(cfg, TuneOptions(trials=2, study_name="browser", tracking_uri=uri, sampler="random"),
                      log=lambda _: None, studies_dir=tmp_path / "studies")
    server, base = start_mlflow_server(uri, tmp_path / "artifacts")
    try:
        yield base, study
    finally:
        stop_server(server)


def test_study_in_the_mlflow_ui(mlflow_server):
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    base, study = mlflow_server
    trial_run_ids = [t.user_attrs["mlflow_run_id"] for t in study.trials]
    search = urllib.request.Request(base + "/api/2.0/mlflow/experiments/get-by-name?experiment_name=quickstart")
    experiment_id = json.loads(urllib.request.urlopen(search).read())["experiment"]["experiment_id"]
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        # the experiment's runs table: the study's parent run, its trials nested under it
        page.goto(f"{base}/#/experiments/{experiment_id}?workflowType=machine_learning")
        page.get_by_text("study_browser", exact=True).wait_for(timeout=60000)
        assert page.get_by_text("_trial0", exact=False).count() == 0  # collapsed under the parent
        page.locator("[role=row]", has_text="study_browser").locator("button").first.click()
        page.get_by_text("_trial0", exact=False).first.wait_for(timeout=30000)
        assert page.get_by_text("_trial1", exact=False).count() >= 1
        page.screenshot(path=str(ARTIFACTS / "mlflow_study_runs.png"))
        # the compare view of two trials: the searched params and the ReID metrics side by side
        page.goto(f"{base}/#/compare-runs?runs={json.dumps(trial_run_ids[:2])}"
                  f"&experiments={json.dumps([experiment_id])}")
        page.get_by_text("Comparing 2 Runs", exact=False).wait_for(timeout=60000)
        page.get_by_text("center_loss_weight", exact=True).first.wait_for(timeout=30000)
        text = page.inner_text("body")
        # the metrics table is a virtualised grid that renders only the rows in view: scroll it
        # (anchored on the metric names that sort first: which rows render depends on how many there are)
        first_rows = re.compile(r"^(arc_conf|best_epoch|best_mAP|center_loss)$")
        grid = page.locator(".ReactVirtualized__Grid", has=page.get_by_text(first_rows)).first
        grid.scroll_into_view_if_needed()
        grid = grid.element_handle()  # the filter above stops matching once the row scrolls away
        height = grid.evaluate("el => el.scrollHeight")
        for y in range(0, height + 200, 150):
            # names and values are two grids scrolled together
            page.evaluate("y => document.querySelectorAll('.ReactVirtualized__Grid')"
                          ".forEach(el => { el.scrollTop = y; })", y)
            page.wait_for_timeout(150)
            text += "\n" + grid.inner_text()
            if page.get_by_text("rank1", exact=True).count():
                break
        page.screenshot(path=str(ARTIFACTS / "mlflow_compare_trials.png"))
        browser.close()
    lines = {line.split("\t")[0].strip() for line in text.splitlines()}
    for key in ("n_ctx", "lr", "center_loss_weight"):  # params: one row each, a value per run
        assert f"\n{key}\t" in text, key
    for key in ("rank1", "mAP"):  # metrics
        assert key in lines, key
    for trial in study.trials[:2]:
        assert str(trial.params["n_ctx"]) in text and repr(trial.params["lr"])[:8] in text
