"""Studies of the reduced quickstart against real Optuna storage and a real SQLite MLflow store."""
import json
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from workbench import config
from workbench.cli import main
from workbench.tuning import TuneOptions, run_study, suggest_overrides

FAST = ["epochs_prompt=1", "epochs_image=2", "save_checkpoints=true"]


@pytest.fixture
def tune_config(tiny_config):
    return config.replace(tiny_config, epochs_prompt=1, epochs_image=2)


def study_runs(uri, study_name):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id], f"tags.study_name = '{study_name}'")
    parents = [r for r in runs if r.data.tags.get("workbench.role") == "study"]
    children = [r for r in runs if r.data.tags.get("workbench.role") == "trial"]
    return client, parents, children


def test_study_trials_mlflow_layout_and_resume(tune_config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = TuneOptions(trials=3, study_name="s1", storage=f"sqlite:///{tmp_path / 's1.db'}", tracking_uri=uri)
    study = run_study(tune_config, options, log=lambda _: None, studies_dir=tmp_path / "studies")
    trials = study.trials
    assert len(trials) == 3 and all(t.state.is_finished() for t in trials)
    space = tune_config.tune.space
    for t in trials:
        assert space["n_ctx"]["low"] <= t.params["n_ctx"] <= space["n_ctx"]["high"]
        assert space["lr"]["low"] <= t.params["lr"] <= space["lr"]["high"]
        assert space["center_loss_weight"]["low"] <= t.params["center_loss_weight"] <= space["center_loss_weight"]["high"]
    assert trials[0].params == {"n_ctx": 4, "lr": 0.001, "center_loss_weight": 0.0003}  # the config as written

    client, parents, children = study_runs(uri, "s1")
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {"study_name", "storage", "sampler", "pruner"} <= set(parent.data.tags)
    assert "space.lr" in parent.data.params
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["state"] in ("COMPLETE", "PRUNED")
        assert child.info.run_name.endswith(f"_trial{child.data.tags['trial_number']}")
        assert "rank1" in child.data.metrics and "lr" in child.data.params
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    assert parent.data.tags["best_trial"] == str(best.number)
    names = {a.path for a in client.list_artifacts(parent.info.run_id)} | \
        {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {"s1_trials.csv", "s1_best.json", "plots/s1_optimization_history.png", "plots/s1_slice.png",
            "plots/s1_parallel_coordinate.png"} <= names
    best_run = client.get_run(best.user_attrs["mlflow_run_id"])
    checkpoints = {a.path for a in client.list_artifacts(best_run.info.run_id, "checkpoints")}
    assert any(p.endswith("_BEST.pth") for p in checkpoints)
    others = [c for c in children if c.info.run_id != best_run.info.run_id]
    assert all(not client.list_artifacts(c.info.run_id, "checkpoints") for c in others)
    on_disk = {p.parent.parent.name for p in Path(tune_config.output_dir).glob("*/*/*.pth")}
    assert on_disk == {f"s1_trial{best.number}"}  # the other trials' checkpoints are removed

    # the frozen features were extracted once for the whole study
    assert len(list((tmp_path / "studies" / "s1_features").glob("*.pt"))) == 1

    # a trial (which found the features cached) re-run alone gives the same numbers
    from workbench.runner import train_joint

    later = [t for t in complete if t.number > 0]
    if later:
        alone = train_joint(config.replace(tune_config, **later[0].params, save_checkpoints=False))
        assert alone["best_mAP"] == pytest.approx(later[0].value, abs=1e-9)

    # re-running the same command resumes: only the missing trials run
    options.trials = 4
    study = run_study(tune_config, options, log=lambda _: None, studies_dir=tmp_path / "studies")
    assert len(study.trials) == 4
    _, parents, children = study_runs(uri, "s1")
    assert len(parents) == 1 and len(children) == 4


def test_feature_cache_computed_once_per_study(tune_config, tmp_path, monkeypatch):
    from workbench import runner

    calls = []
    original = runner.cache_image_features
    monkeypatch.setattr(runner, "cache_image_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    options = TuneOptions(trials=3, study_name="cache", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                          pruner="none")
    run_study(tune_config, options, log=lambda _: None, studies_dir=tmp_path / "studies")
    assert len(calls) == 1


def test_failing_trial_leaves_the_study_running(tune_config, tmp_path):
    cfg = config.replace(tune_config, tune={**tune_config.tune.__dict__,
                                            "space": {"n_ctx": {"type": "categorical", "choices": [4, 70]}}})
    options = TuneOptions(trials=4, study_name="fails", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                          sampler="random")
    lines = []
    study = run_study(cfg, options, log=lines.append, studies_dir=tmp_path / "studies")
    states = [t.state for t in study.trials]
    assert len(states) == 4 and optuna.trial.TrialState.COMPLETE in states
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all("n_ctx" in t.user_attrs["fail_reason"] for t in failed)
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    run = client.get_run(failed[0].user_attrs["mlflow_run_id"])
    assert run.info.status == "FAILED" and "n_ctx" in run.data.tags["fail_reason"]
    assert any("FAIL" in line for line in lines)


def test_pruned_trial_ends_cleanly(tune_config, tmp_path):
    cfg = config.replace(tune_config, epochs_image=3)
    options = TuneOptions(trials=1, study_name="prune", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    from workbench import tuning

    class AlwaysPrune(optuna.pruners.BasePruner):
        def prune(self, study, trial):
            return True

    original = tuning.build_pruner
    tuning.build_pruner = lambda name, epochs: AlwaysPrune()
    try:
        study = run_study(cfg, options, log=lambda _: None, studies_dir=tmp_path / "studies")
    finally:
        tuning.build_pruner = original
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    run = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["state"] == "PRUNED"
    assert "rank1" in run.data.metrics  # the numbers up to the pruned epoch stay


def test_space_validation_and_suggestions():
    with pytest.raises(config.ConfigError, match="empty range"):
        config.load(None, ["tune.space={lr: {type: float, low: 1.0e-3, high: 1.0e-4}}"])
    with pytest.raises(config.ConfigError, match="did you mean lr"):
        config.load(None, ["tune.space={lrr: {type: float, low: 1.0e-4, high: 1.0e-3}}"])
    trial = optuna.trial.FixedTrial({"n_ctx": 8, "lr": 1e-4, "center_loss_weight": 1e-3})
    assert suggest_overrides(trial, config.Config().tune.space) == {"n_ctx": 8, "lr": 1e-4,
                                                                    "center_loss_weight": 1e-3}


def test_two_processes_share_one_study(tune_config, tmp_path):
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(config.replace(tune_config, epochs_image=1, save_checkpoints=False).to_yaml())
    command = [sys.executable, "-m", "workbench.cli", "tune", str(cfg_path), "--trials", "4", "--study-name",
               "shared", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--pruner", "none"]
    workers = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    assert all(w.returncode == 0 for w in workers), outputs
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "studies" / "shared.journal")))
    trials = optuna.load_study(study_name="shared", storage=storage).trials
    assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == [0, 1, 2, 3]
    assert sum(out.count(" COMPLETE ") for out in outputs) == 4


def test_cli_tune_and_compare(tune_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(config.replace(tune_config, epochs_image=1, save_checkpoints=False).to_yaml())
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["tune", str(cfg_path), "--trials", "2", "--tracking-uri", uri, "--sampler", "random"]) == 0
    out = capsys.readouterr().out
    assert "best trial" in out and "workbench run" in out
    assert main(["compare", "--study", "exp", "--tracking-uri", uri, "--out", str(tmp_path / "c.csv")]) == 0
    out = capsys.readouterr().out
    assert "saved 2 runs" in out
    import pandas as pd

    table = pd.read_csv(tmp_path / "c.csv")
    assert list(table["best_mAP"]) == sorted(table["best_mAP"], reverse=True)
    assert main(["tune", str(cfg_path), "--trials", "0", "--tracking-uri", uri]) == 2


def test_tune_refuses_to_select_on_the_test_split(tune_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg_path = tmp_path / "nohold.yaml"
    cfg_path.write_text(config.replace(tune_config, val_identities=0, epochs_image=1, save_checkpoints=False).to_yaml())
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    assert main(["tune", str(cfg_path), "--trials", "1", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "val_identities" in err and "--select-on-test" in err
    assert not (tmp_path / "studies").exists()  # refused before anything was created
    assert main(["tune", str(cfg_path), "--trials", "1", "--tracking-uri", uri, "--select-on-test"]) == 0
    assert main(["tune", str(cfg_path), "--trials", "1", "--set", "stage_mode=prompt_only",
                 "--tracking-uri", uri]) == 2


def test_workbench_ui_serves_the_tracking_store(tmp_path):
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"sqlite:///{tmp_path / 'ui.db'}"
    ui = subprocess.Popen([sys.executable, "-m", "workbench.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert f"http://127.0.0.1:{port}" in ui.stdout.readline()
        deadline = time.time() + 120
        while True:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search"
                                              "?max_results=5", timeout=2).read()
                break
            except OSError:
                assert time.time() < deadline and ui.poll() is None, "workbench ui did not serve"
                time.sleep(0.5)
        assert b"experiments" in body
    finally:
        ui.terminate()
        ui.wait(timeout=30)
