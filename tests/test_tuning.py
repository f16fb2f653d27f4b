"""Studies of the reduced quickstart against real Optuna storage and a real SQLite MLflow store."""
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from workbench import config
from workbench.cli import main
from workbench import tuning
from workbench.errors import ResourceError, UsageError
from workbench.tuning import (FAULT, INTERRUPTED, WORKER_ENDED, Study, TuneOptions, check_space_ends, check_study_name,
                              run_study, storage_for, suggest_overrides)

FAST = ["epochs_prompt=1", "epochs_image=2", "save_checkpoints=true"]


@pytest.fixture
def tune_config(tiny_config):
    return config.replace(tiny_config, epochs_prompt=1, epochs_image=2)


def with_space(cfg, space):
    return config.replace(cfg, tune={**cfg.tune.__dict__, "space": space})


def write_config(cfg, path):
    path.write_text(config.replace(cfg, epochs_image=1, save_checkpoints=False).to_yaml())
    return str(path)


def journal_study(path, name):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name, storage=storage)


def refused(capsys, argv):
    """main(argv)'s exit status and its error line, the last line of stderr (a trial's own output
    may come before it)."""
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("workbench: error: "), err
    return status, err.splitlines()[-1]


def fake_train_joint(run_dir, error=None):
    """A train_joint that opens its MLflow run through the trial's tracker and returns at once (or
    raises ``error`` first): for the bookkeeping around trials, without training."""
    def train_joint(cfg, tracker, report, *, run_name, parent_run_id, extra_tags, **_):
        if error is not None:
            raise error
        with tracker.start_run(run_name, cfg.experiment, tags=extra_tags, parent_run_id=parent_run_id) as run_id:
            tracker.log_metrics({"mAP": 50.0}, step=1)
        return {"best_mAP": 50.0 + cfg.lr, "run_id": run_id, "run_dir": str(run_dir)}
    return train_joint


def study_runs(uri, study_name):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id], f"tags.study_name = '{study_name}'")
    parents = [r for r in runs if r.data.tags.get("workbench.role") == "study"]
    children = [r for r in runs if r.data.tags.get("workbench.role") == "trial"]
    return client, parents, children


def test_study_trials_mlflow_layout_and_resume(tune_config, tmp_path, monkeypatch, recwarn):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    options = TuneOptions(trials=3, study_name="s1", storage=f"sqlite:///{tmp_path / 's1.db'}", tracking_uri=uri)
    study = run_study(tune_config, options, log=lambda _: None, studies_dir=tmp_path / "studies")
    assert not [w for w in recwarn if "tight_layout" in str(w.message)]  # the study's plots warn nobody
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
    assert parent.data.metrics["n_out_of_reach"] == sum(bool(t.user_attrs.get(tuning.OUT_OF_REACH)) for t in trials)
    assert parent.data.tags["pruner"] == "median + out of reach"
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


def test_trials_write_no_last_checkpoint(tune_config, tmp_path, monkeypatch):
    """A trial is replaced, never resumed: it writes BEST and FINAL but no LAST after each epoch,
    which a plain run does."""
    from workbench import runner, stages

    tags = []
    original = stages.save_checkpoint
    monkeypatch.setattr(stages, "save_checkpoint", lambda path, **kw: tags.append(kw["tag"]) or original(path, **kw))
    cfg = config.replace(tune_config, save_checkpoints=True, output_dir=str(tmp_path / "runs"))
    runner.train_joint(cfg)
    assert tags.count("LAST") == cfg.epochs_image and "FINAL" in tags
    tags.clear()
    options = TuneOptions(trials=1, study_name="nolast", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    run_study(cfg, options, log=lambda _: None, studies_dir=tmp_path / "studies")
    assert "LAST" not in tags and {"BEST", "FINAL"} <= set(tags)


def test_parallel_trials_are_pinned_to_the_visible_gpus(tune_config, tmp_path, monkeypatch):
    """--n-jobs with several GPUs: worker i runs every trial of its own on cuda:(i mod GPUs)."""
    import threading

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert tuning.trial_devices("auto", 3) == ["cuda:0", "cuda:1", "cuda:0"]
    assert tuning.trial_devices("cuda", 2) == ["cuda:0", "cuda:1"]
    assert tuning.trial_devices("cpu", 2) == [None, None] and tuning.trial_devices("cuda:1", 2) == [None, None]
    seen = []
    fake = fake_train_joint(tmp_path)

    def train_joint(cfg, *args, **kwargs):
        seen.append((threading.get_ident(), cfg.device))
        time.sleep(0.2)  # long enough for both workers to claim trials
        return fake(cfg, *args, **kwargs)

    monkeypatch.setattr(tuning, "train_joint", train_joint)
    options = TuneOptions(trials=6, study_name="gpus", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", n_jobs=2,
                          sampler="random")
    run_study(config.replace(tune_config, device="auto"), options, log=lambda _: None,
              studies_dir=tmp_path / "studies")
    by_worker = {}
    for worker, device in seen:
        by_worker.setdefault(worker, set()).add(device)
    assert len(seen) == 6 and all(len(devices) == 1 for devices in by_worker.values())
    assert set().union(*by_worker.values()) == {"cuda:0", "cuda:1"}


def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_by_its_age(tune_config, tmp_path,
                                                                                  monkeypatch):
    """Optuna never calls a trial stale that has no heartbeat at all (a worker killed between its
    claim and its first beat, a workbench before heartbeats): past the grace period it is failed."""
    url = f"sqlite:///{tmp_path / 'study.db'}"
    cfg = config.replace(tune_config, tune={**tune_config.tune.__dict__, "heartbeat_interval": 1, "grace_period": 2})
    ghost = optuna.create_study(study_name="ghost", storage=url, direction="maximize").ask()
    ghost.set_user_attr("worker", "another-machine:4242")
    time.sleep(2.5)
    monkeypatch.setattr(tuning, "train_joint", fake_train_joint(tmp_path))
    lines = []
    study = run_study(cfg, TuneOptions(trials=1, study_name="ghost", storage=url,
                                       tracking_uri=f"sqlite:///{tmp_path / 'm.db'}"),
                      log=lines.append, studies_dir=tmp_path / "studies")
    dead = study.trials[ghost.number]
    assert dead.state == optuna.trial.TrialState.FAIL and dead.user_attrs["fail_reason"].startswith(WORKER_ENDED)
    assert [t.state for t in study.trials[1:]] == [optuna.trial.TrialState.COMPLETE]
    assert any("no heartbeat for 2 s from another-machine:4242" in line for line in lines)


def test_a_dead_pid_means_a_dead_worker_only_in_this_pid_namespace(tune_config, tmp_path, monkeypatch):
    """Worker ids name the host and its PID namespace: a container sharing this host name but not
    its process ids is another machine, whose trial a dead local pid does not fail."""
    import socket

    from workbench.tracking import machine_id

    storage = tmp_path / "ns.journal"
    ghosts = optuna.create_study(study_name="ns", storage=storage_for("ns", str(storage))[0], direction="maximize")
    dead_pid = 2 ** 22 + 1  # above Linux's pid_max: never a live process
    here, container, legacy = ghosts.ask(), ghosts.ask(), ghosts.ask()
    here.set_user_attr("worker", f"{machine_id()}:{dead_pid}")
    container.set_user_attr("worker", f"{socket.gethostname()}/1:{dead_pid}")
    legacy.set_user_attr("worker", f"{socket.gethostname()}:{dead_pid}")  # an id from before the namespace
    monkeypatch.setattr(tuning, "train_joint", fake_train_joint(tmp_path))
    study = run_study(tune_config, TuneOptions(trials=1, study_name="ns", storage=str(storage),
                                               tracking_uri=f"sqlite:///{tmp_path / 'm.db'}"),
                      log=lambda _: None, studies_dir=tmp_path / "studies")
    for dead in (here, legacy):
        assert study.trials[dead.number].state == optuna.trial.TrialState.FAIL
        assert study.trials[dead.number].user_attrs["fail_reason"].startswith(WORKER_ENDED)
    assert study.trials[container.number].state == optuna.trial.TrialState.RUNNING


def test_a_database_that_stops_answering_is_a_fault():
    """Optuna's storage error and a lost connection stop the study (the trial is replaced), as a
    full disk or a tracking store that went away do; a trial's own error does not."""
    import sqlalchemy

    assert tuning._is_fault(optuna.exceptions.StorageInternalError("connection lost"))
    assert tuning._is_fault(sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("server closed")))
    assert not tuning._is_fault(ValueError("a NaN loss"))


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
    names = [t.state.name for t in study.trials]
    last_trial_line = [line for line in lines if line.startswith("trial")][-1]
    assert last_trial_line.endswith(f"[4/4 trials: {names.count('COMPLETE')} complete, 0 pruned, "
                                    f"{names.count('FAIL')} failed; 0 replaced]")


def test_trials_validate_from_the_first_judged_epoch(tune_config, tmp_path, monkeypatch):
    """Validations before the pruner's first judged epoch only draw curves: trials skip them (a
    config's own val_start is kept), and the re-run command says so."""
    seen = []
    fake = fake_train_joint(tmp_path)
    monkeypatch.setattr(tuning, "train_joint", lambda cfg, *a, **k: seen.append(cfg.val_start) or fake(cfg, *a, **k))
    cfg = config.replace(tune_config, epochs_image=40)
    for pruner, own, expected in (("median", None, 10), ("hyperband", None, 10), ("none", None, 1),
                                  ("median", 3, 3)):
        options = TuneOptions(trials=1, study_name=f"v{pruner}{own}", pruner=pruner,
                              tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
        study = run_study(config.replace(cfg, val_start=own), options, log=lambda _: None,
                          studies_dir=tmp_path / "studies")
        assert seen[-1] == expected
        assert ("val_start=10" in study.trials[0].user_attrs["rerun"]) == (own is None and expected == 10)


def test_parallel_trials_print_one_line_each_and_share_prompt_stages(tune_config, tmp_path, capsys):
    """Trials side by side keep their progress bars and log lines to their log files (they would
    interleave on the console); trials that differ only in image-stage keys train one prompt stage.
    The config's tune.n_jobs sets how many run at once when --n-jobs does not."""
    cfg = with_space(tune_config, {"lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}})
    cfg = config.replace(cfg, tune={**cfg.tune.__dict__, "n_jobs": 2})
    options = TuneOptions(trials=3, study_name="quiet", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                          pruner="none")
    lines = []
    study = run_study(cfg, options, log=lines.append, studies_dir=tmp_path / "studies")
    assert any("to go, 2 at a time" in line for line in lines)
    err = capsys.readouterr().err
    assert "image epoch" not in err and "image stage" not in err and "prompt stage" not in err
    assert len([line for line in lines if line.startswith("trial")]) == 3
    logs = [next(Path(t.user_attrs["run_dir"]).glob("*.log")).read_text() for t in study.trials]
    assert all("image epoch 2/2" in log for log in logs)
    assert sum("prompt stage: the same as in MLflow run" in log for log in logs) == 2  # one trained it


@pytest.mark.parametrize("why", [None, "out of reach: best so far 1 + 2 = 3, behind the study's best 4"])
def test_pruned_trial_ends_cleanly(tune_config, tmp_path, monkeypatch, why):
    cfg = config.replace(tune_config, epochs_image=3, select_metric="rank1")  # best_mAP: mAP at the best rank-1
    options = TuneOptions(trials=1, study_name="prune", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")

    class AlwaysPrune(tuning.ReachPruner):  # after two validations (epochs 1 and 2)
        def reason(self, study, trial):
            return (why or "median") if trial.last_step >= 2 else None

    monkeypatch.setattr(tuning, "build_pruner", lambda *args: AlwaysPrune(optuna.pruners.NopPruner()))
    lines = []
    study = run_study(cfg, options, log=lines.append, studies_dir=tmp_path / "studies")
    (trial,) = study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED
    run = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["state"] == "PRUNED"
    assert "rank1" in run.data.metrics  # the numbers up to the pruned epoch stay
    # Out of reach: the trial and its line say why; the median rule needs no words
    assert trial.user_attrs.get(tuning.OUT_OF_REACH) == why
    # ... and what the sampler learns from it: its objective's value then, the tune metric (mAP) at
    # the epoch with the best select_metric (rank1); a median-pruned trial has none
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    curves = {k: [m.value for m in sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)]
              for k in ("rank1", "mAP")}
    assert len(curves["mAP"]) == 2 and cfg.tune.metric == "best_mAP" and cfg.select_metric == "rank1"
    selected = curves["mAP"][1] if curves["rank1"][1] > curves["rank1"][0] else curves["mAP"][0]
    assert trial.user_attrs.get(tuning.STOPPED_VALUE) == (selected if why else None)
    (line,) = [line for line in lines if line.startswith("trial")]
    assert (why in line) if why else line.rstrip().endswith("replaced]")


def _reach_study(direction="maximize", n_complete=5):
    """A study of ``n_complete`` complete trials reporting steps 10-20 (value 50 + step + k, so
    each gains 20 - step after a step; the best ends at 74) and a ReachPruner judging from step 10."""
    sign = 1 if direction == "maximize" else -1
    pruner = tuning.ReachPruner(optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=10),
                                n_startup_trials=5, n_warmup_steps=10)
    study = optuna.create_study(direction=direction, pruner=pruner)
    for k in range(n_complete):
        trial = study.ask()
        for step in range(10, 21):
            trial.report(sign * (50 + step + k), step)
        study.tell(trial, sign * (70 + k))
    return study, pruner, sign


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
def test_reach_pruner_stops_only_trials_that_cannot_catch_the_best(direction):
    def judge(values: dict, n_complete=5):
        study, pruner, sign = _reach_study(direction, n_complete)
        trial = study.ask()
        for step, value in values.items():
            trial.report(sign * value, step)
        return trial.should_prune(), pruner.pop_reason(trial.number)

    sign = 1 if direction == "maximize" else -1
    # Each complete trial gains 20 - step after a step. At step 19 (gain 1, median 71): best so far
    # 71.9 + 2 x 1 = 73.9 is behind the best, 74: stop; 72.1 + 2 = 74.1 could still win.
    stop, why = judge({14: 60.0, 19: 71.9})
    assert stop and why == (f"out of reach: best so far {sign * 71.9:.2f} {'+' if sign > 0 else '-'} 2 x the largest "
                            f"gain of a complete trial after step 19 (1.00) = {sign * 73.9:.2f}, behind the study's "
                            f"best {sign * 74:.2f}")
    assert judge({14: 60.0, 19: 72.1}) == (False, None)
    assert judge({17: 69.5}) == (False, None)  # at step 17 the margin is 2 x 3: 75.5 reaches 74
    assert judge({19: 71.9}, n_complete=4) == (False, None)  # too few complete trials to know the gains
    assert judge({8: 10.0, 9: 10.0}) == (False, None)  # before the first judged step
    # The last step: no complete trial reported after it, nothing is left to save; a trial behind
    # the best completes (above the median, 72) instead of turning PRUNED at its end.
    assert judge({19: 72.5, 20: 73.9}) == (False, None)
    assert judge({15: 60.0}) == (True, "median")  # the median rule first (67 at step 15)


def test_reach_pruner_keeps_optunas_median_decisions():
    """Every decision of Optuna's median pruner stands: where it prunes, "median"; where the reach
    rule also keeps a trial, the same as Optuna alone."""
    rng = np.random.default_rng(0)
    decisions = {"median": 0, "kept": 0}
    for _ in range(20):
        median = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=3)
        study = optuna.create_study(direction="maximize", pruner=median)
        for _ in range(int(rng.integers(3, 9))):
            trial = study.ask()
            curve = np.cumsum(rng.uniform(0, 5, size=10))
            for step, value in enumerate(curve, 1):
                trial.report(float(value), step)
            study.tell(trial, float(curve.max()))
        trial = study.ask()
        reach = tuning.ReachPruner(median, n_startup_trials=5, n_warmup_steps=3)
        for step, value in enumerate(np.cumsum(rng.uniform(0, 5, size=10)), 1):
            trial.report(float(value), step)
            frozen = study._storage.get_trial(trial._trial_id)
            why = reach.reason(study, frozen)
            if median.prune(study, frozen):
                assert why == "median"
                decisions["median"] += 1
            else:
                assert why is None or why.startswith("out of reach")
                decisions["kept"] += 1
    assert decisions["median"] and decisions["kept"]


def test_reach_pruner_bounds_every_objective_by_the_best_reported_value():
    """An objective below a trial's best reported value (final_mAP; best_mAP selected on rank-1)
    never makes the rule stricter: the gain after a step is the best value's, never negative."""
    pruner = tuning.ReachPruner(optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=10),
                                n_startup_trials=5, n_warmup_steps=10)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    for _ in range(5):  # peak at step 10, objective the last value (87.1)
        trial = study.ask()
        for step, value in {10: 87.6, 11: 87.0, 12: 87.1}.items():
            trial.report(value, step)
        study.tell(trial, 87.1)
    trial = study.ask()
    trial.report(80.0, 10)
    trial.report(87.5, 11)  # above the study's best already: it can become the best
    assert not trial.should_prune() and pruner.pop_reason(trial.number) is None


def test_trials_stopped_out_of_reach_stay_out_of_the_median():
    """The median's population stays Optuna's: complete trials only, whatever stopped the others."""
    def judge(pruned_out_of_reach: bool):
        median = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=10)
        pruner = tuning.ReachPruner(median, n_startup_trials=5, n_warmup_steps=10)
        study = optuna.create_study(direction="maximize", pruner=pruner)
        for value in (10, 20, 30, 40, 50):  # median 30 at step 12; each ends at 100 (far from reach)
            trial = study.ask()
            trial.report(value, 12)
            trial.report(100.0, 30)
            study.tell(trial, 100.0)
        for _ in range(2):
            trial = study.ask()
            trial.report(100.0, 12)
            if pruned_out_of_reach:
                trial.set_user_attr(tuning.OUT_OF_REACH, "out of reach: ...")
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        trial = study.ask()
        trial.report(35.0, 12)
        frozen = study._storage.get_trial(trial._trial_id)
        assert pruner.reason(study, frozen) is None and not median.prune(study, frozen)

    judge(pruned_out_of_reach=False)
    judge(pruned_out_of_reach=True)  # 35 > 30 either way: two stopped trials do not raise the median


def test_value_so_far_is_the_objective_of_a_stopped_run():
    """best_* reads the BEST epoch's value (the first with the highest select_metric), as the run's
    selection does; final_* the last epoch's."""
    nan = float("nan")
    rows = [{"rank1": 50.0, "mAP": 40.0}, {"rank1": 70.0, "mAP": 55.0}, {"rank1": 70.0, "mAP": 60.0},
            {"rank1": nan, "mAP": 90.0}, {"rank1": 65.0, "mAP": 58.0}]
    assert tuning.value_so_far("best_mAP", rows, "rank1") == 55.0  # not the highest mAP (90, 60)
    assert tuning.value_so_far("best_rank1", rows, "rank1") == 70.0
    assert math.isnan(tuning.value_so_far("best_rank1", rows, "mAP"))  # the BEST epoch (mAP 90) has no rank1
    assert tuning.value_so_far("final_mAP", rows, "rank1") == 58.0
    assert math.isnan(tuning.value_so_far("best_mAP", [{"rank1": nan, "mAP": 3.0}], "rank1"))  # nothing selected


def _stopped_study(stopped_as: optuna.trial.TrialState, sampler) -> optuna.Study:
    """19 trials of x in [0, 1]: the best complete at x = 0.3 (99), the others far below, and one at
    x = 0.9 that reached 98 when it was stopped out of reach (PRUNED), or the same trial COMPLETE."""
    from optuna.distributions import FloatDistribution

    study = optuna.create_study(direction="maximize", sampler=sampler)
    space = {"x": FloatDistribution(0.0, 1.0)}
    for i, x in enumerate(np.linspace(0.0, 1.0, 18)):
        study.add_trial(optuna.trial.create_trial(params={"x": float(x)}, distributions=space,
                                                  value=99.0 if i == 5 else 40.0 + i, intermediate_values={30: 40.0}))
    if stopped_as == optuna.trial.TrialState.PRUNED:
        study.add_trial(optuna.trial.create_trial(
            params={"x": 0.9}, distributions=space, state=stopped_as, intermediate_values={30: 98.0},
            user_attrs={tuning.OUT_OF_REACH: "out of reach: ...", tuning.STOPPED_VALUE: 98.0}))
    else:
        study.add_trial(optuna.trial.create_trial(params={"x": 0.9}, distributions=space, value=98.0,
                                                  intermediate_values={30: 98.0}))
    return study


def _proposals(study: optuna.Study) -> list[float]:
    from optuna.distributions import FloatDistribution

    proposed = []
    for _ in range(3):
        trial = study.ask({"x": FloatDistribution(0.0, 1.0)})
        proposed.append(trial.params["x"])
        study.tell(trial, state=optuna.trial.TrialState.FAIL)  # out of TPE's view, as before the ask
    return proposed


def test_the_sampler_learns_from_a_stopped_trial_as_from_a_complete_one():
    """TPE's good group is the best tenth of the trials, complete ones first: a trial stopped out of
    reach at 98, second to 99, belongs there. The study keeps it PRUNED; its sampler proposes what
    Optuna's TPE proposes when that trial is COMPLETE at 98, not what it proposes with it PRUNED."""
    pruned, complete = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE
    ours = _stopped_study(pruned, tuning.build_sampler("tpe", seed=3))
    as_complete = _proposals(_stopped_study(complete, optuna.samplers.TPESampler(seed=3, constant_liar=True)))
    as_pruned = _proposals(_stopped_study(pruned, optuna.samplers.TPESampler(seed=3, constant_liar=True)))
    assert as_complete != as_pruned  # the example tells the two apart
    assert _proposals(ours) == as_complete
    stopped = ours.trials[18]
    assert stopped.state == pruned and ours.best_value == 99.0  # the study's own record is unchanged
    view = tuning.StudyAsLearned(ours)
    shown = {t.number: t for t in view._get_trials(deepcopy=False, states=(complete, pruned))}
    assert shown[stopped.number].state == complete and shown[stopped.number].value == 98.0
    assert stopped.number not in {t.number for t in view.get_trials(states=(pruned,))}
    median_pruned = ours.ask()  # pruned by the median: no value when stopped, PRUNED for the sampler too
    ours.tell(median_pruned, state=pruned)
    assert median_pruned.number in {t.number for t in view.get_trials(states=(pruned,))}
    assert ours.trials[18].state == pruned  # the storage's trial was copied, not changed


def test_the_sampler_learns_from_a_stopped_trial_when_sampling_each_parameter_alone():
    """TPE's other path (multivariate off, Optuna's default before 5.0) reads the trials the same way."""
    pruned, complete = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE
    ours = tuning.ReachAwareTPESampler(seed=3, constant_liar=True, multivariate=False)
    plain = optuna.samplers.TPESampler(seed=3, constant_liar=True, multivariate=False)
    as_complete = _proposals(_stopped_study(complete, plain))
    assert as_complete != _proposals(_stopped_study(pruned, optuna.samplers.TPESampler(
        seed=3, constant_liar=True, multivariate=False)))
    assert _proposals(_stopped_study(pruned, ours)) == as_complete


def test_without_stopped_trials_the_sampler_is_optunas_tpe():
    plain = _proposals(_stopped_study(optuna.trial.TrialState.COMPLETE, optuna.samplers.TPESampler(
        seed=5, constant_liar=True)))
    assert _proposals(_stopped_study(optuna.trial.TrialState.COMPLETE, tuning.build_sampler("tpe", 5))) == plain


def test_stop_out_of_reach_is_a_tune_key():
    assert isinstance(tuning.build_pruner("median", 40), tuning.ReachPruner)
    assert isinstance(tuning.build_pruner("median", 40, False), optuna.pruners.MedianPruner)
    assert isinstance(tuning.build_pruner("hyperband", 40), optuna.pruners.HyperbandPruner)
    assert config.load(None, ["tune.stop_out_of_reach=false"]).tune.stop_out_of_reach is False
    with pytest.raises(config.ConfigError, match="stop_out_of_reach"):
        config.load(None, ["tune.stop_out_of_reach=sometimes"])


def test_space_validation_and_suggestions():
    with pytest.raises(config.ConfigError, match="empty range"):
        config.load(None, ["tune.space={lr: {type: float, low: 1.0e-3, high: 1.0e-4}}"])
    with pytest.raises(config.ConfigError, match="did you mean lr"):
        config.load(None, ["tune.space={lrr: {type: float, low: 1.0e-4, high: 1.0e-3}}"])
    trial = optuna.trial.FixedTrial({"n_ctx": 8, "lr": 1e-4, "center_loss_weight": 1e-3})
    assert suggest_overrides(trial, config.Config().tune.space) == {"n_ctx": 8, "lr": 1e-4,
                                                                    "center_loss_weight": 1e-3}


@pytest.mark.parametrize("space, message", [
    ({"n_ctx": {"type": "int", "low": 0, "high": 8}}, "tune.space.n_ctx: reaches 0, which the config refuses: n_ctx: "),
    ({"epochs_image": {"type": "int", "low": 2, "high": 400}, "lr": {"type": "float", "low": 1e-4, "high": 1e-3}},
     None),
    ({"id_head": {"type": "categorical", "choices": ["arcface", "cosface"]}},
     "tune.space.id_head: reaches 'cosface', which the config refuses: id_head: unknown value"),
    # legal together with the other searched key's ends, though not with the config as written (batch 8)
    ({"num_instances": {"type": "categorical", "choices": [2, 8]},
      "batch_size": {"type": "categorical", "choices": [16, 32]}}, None),
    ({"batch_size": {"type": "int", "low": 8, "high": 30, "step": 8}}, None),  # Optuna's grid ends at 24
    ({"num_instances": {"type": "categorical", "choices": [2, 16]},
      "batch_size": {"type": "categorical", "choices": [16, 24]}},
     "tune.space.num_instances: reaches 16, which the config refuses: batch_size: must be a multiple"),
])
def test_a_space_reaching_past_a_key_is_refused_before_the_study(tune_config, tmp_path, space, message):
    """Each end of a range, and each choice, with the rest of the config as written; nothing of
    the study (journal, MLflow parent run) exists when it is refused."""
    options = TuneOptions(trials=1, study_name="ends", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    cfg = with_space(tune_config, space)
    if message is None:
        check_space_ends(cfg, cfg.tune.space)
        return
    with pytest.raises(config.ConfigError) as err:
        run_study(cfg, options, log=lambda _: None, studies_dir=tmp_path / "studies")
    assert str(err.value).startswith(message)
    assert not (tmp_path / "studies").exists() and not (tmp_path / "m.db").exists()


def test_a_study_checks_the_data_root_before_it_exists(tune_config, tmp_path):
    """As `workbench run` does: a data_root that is no dataset is one error, with no journal or
    MLflow parent run left behind."""
    (tmp_path / "empty").mkdir()
    options = TuneOptions(trials=1, study_name="nodata", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(config.ConfigError, match="has no train/, query/, gallery/"):
        run_study(config.replace(tune_config, data_root=str(tmp_path / "empty")), options, log=lambda _: None,
                  studies_dir=tmp_path / "studies")
    assert not (tmp_path / "studies").exists() and not (tmp_path / "m.db").exists()


def test_the_sampler_seed_of_a_resumed_study_stays_in_range(tune_config, tmp_path):
    """The k-th session samples with seed + k, taken modulo 2**32 (the largest seed is legal)."""
    cfg = config.replace(tune_config, seed=2**32 - 1, epochs_image=1, save_checkpoints=False)
    for trials in (1, 2):  # the second session resumes the study
        options = TuneOptions(trials=trials, study_name="edge", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}",
                              pruner="none")
        assert len(run_study(cfg, options, log=lambda _: None, studies_dir=tmp_path / "studies").trials) == trials


def test_two_processes_share_one_study(tune_config, tmp_path, new_store):
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(config.replace(tune_config, epochs_image=1, save_checkpoints=False).to_yaml())
    command = [sys.executable, "-m", "workbench.cli", "tune", str(cfg_path), "--trials", "4", "--study-name",
               "shared", "--tracking-uri", new_store(tmp_path / "m.db"), "--pruner", "none"]
    workers = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(2)]
    outputs = [w.communicate(timeout=600)[0] for w in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
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
    assert main(["tune", "--trials", "2", "--tracking-uri", uri, "--sampler", "random"]) == 0  # exp.yaml here
    out = capsys.readouterr().out
    assert "best trial" in out and "workbench run exp.yaml" in out
    assert "OMP_NUM_THREADS" not in out  # one trial at a time: it had the threads a run has
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


def test_workbench_ui_serves_the_tracking_store(tmp_path, new_store):
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = new_store(tmp_path / "ui.db")
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


def test_killed_and_interrupted_trials_do_not_count(tune_config, tmp_path):
    options = TuneOptions(trials=3, study_name="count", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    study = Study(tune_config, options, log=lambda _: None, studies_dir=tmp_path / "studies")
    for reason in [None, INTERRUPTED, "ValueError: the run produced no finite best_mAP", WORKER_ENDED]:
        trial = study.study.ask()
        if reason is None:
            study.study.tell(trial, 50.0)
        else:
            trial.set_user_attr("fail_reason", reason)
            study.study.tell(trial, state=optuna.trial.TrialState.FAIL)
    study.study.ask()  # running
    assert study.remaining() == 1 and study._claimed() == 3
    assert study.tally() == "2/3 trials: 1 complete, 0 pruned, 1 failed; 2 replaced"


def test_sampler_of_a_resumed_study_does_not_repeat_itself(tune_config, tmp_path):
    cfg = with_space(tune_config, {"lr": {"type": "float", "low": 1e-4, "high": 5e-4}})  # no baseline trial
    uri = f"sqlite:///{tmp_path / 'm.db'}"

    def first_params(name, storage):
        options = TuneOptions(trials=1, study_name=name, storage=str(storage), tracking_uri=uri, sampler="random")
        study = Study(cfg, options, log=lambda _: None, studies_dir=tmp_path / "studies")
        return suggest_overrides(study.study.ask(), cfg.tune.space)

    first = first_params("a", tmp_path / "a.journal")
    assert first_params("b", tmp_path / "b.journal") == first  # a fresh study is reproducible
    assert first_params("a", tmp_path / "a.journal") != first  # opened again: new proposals


def test_killed_worker_is_failed_and_replaced(tune_config, tmp_path, monkeypatch, capsys, new_store):
    """SIGKILL mid-trial, then the same command again: the killed trial is FAIL in Optuna and its
    MLflow run KILLED with the reason; a new trial with new parameters replaces it."""
    monkeypatch.chdir(tmp_path)
    cfg = with_space(tune_config, {"lr": {"type": "float", "low": 1e-4, "high": 5e-4}})
    uri = new_store(tmp_path / "m.db")
    argv = ["tune", write_config(cfg, tmp_path / "exp.yaml"), "--trials", "1", "--tracking-uri", uri,
            "--sampler", "random", "--pruner", "none"]
    worker = subprocess.Popen([sys.executable, "-m", "workbench.cli"] + argv, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    journal = tmp_path / "studies" / "exp.journal"
    try:
        deadline = time.time() + 300
        while not (journal.exists() and any("mlflow_run_id" in t.user_attrs
                                            for t in journal_study(journal, "exp").trials)):
            assert worker.poll() is None and time.time() < deadline, "the trial's MLflow run never appeared"
            time.sleep(0.05)
    finally:
        worker.kill()  # SIGKILL: no handler runs, the trial and its MLflow run stay RUNNING
        worker.wait()
    assert main(argv) == 0
    assert "1 replaced" in capsys.readouterr().out

    killed, new = journal_study(journal, "exp").trials
    assert killed.state == optuna.trial.TrialState.FAIL and killed.user_attrs["fail_reason"] == WORKER_ENDED
    assert new.state == optuna.trial.TrialState.COMPLETE and new.params != killed.params
    client, parents, children = study_runs(uri, "exp")
    assert [p.info.status for p in parents] == ["FINISHED"] and len(children) == 2
    killed_run = client.get_run(killed.user_attrs["mlflow_run_id"])
    assert killed_run.info.status == "KILLED" and killed_run.data.tags["state"] == "FAIL"
    assert killed_run.data.tags["fail_reason"].startswith(WORKER_ENDED)
    assert client.get_run(new.user_attrs["mlflow_run_id"]).info.status == "FINISHED"


def test_study_whose_trials_all_fail_ends_with_one_line(tune_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = with_space(tune_config, {"n_ctx": {"type": "categorical", "choices": [70, 71]}})  # both too long
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    status, err = refused(capsys, ["tune", write_config(cfg, tmp_path / "bad.yaml"), "--trials", "2",
                                   "--tracking-uri", uri, "--sampler", "random"])
    assert status == 1 and "all 2 trials failed; the first reason (trial 0): " in err and "n_ctx" in err
    _, parents, children = study_runs(uri, "bad")
    assert [p.info.status for p in parents] == ["FAILED"] and len(children) == 2


def test_tune_refuses_bad_arguments_before_anything_starts(tune_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg_path = write_config(tune_config, tmp_path / "exp.yaml")
    (tmp_path / "somefile.txt").write_text("")
    base = ["tune", cfg_path, "--trials", "1", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    for extra, status, words in [(["--n-jobs", "0"], 2, "--n-jobs"), (["--n-jobs", "-2"], 2, "--n-jobs"),
                                 (["--timeout", "-1"], 2, "--timeout"), (["--timeout", "0"], 2, "--timeout"),
                                 (["--study-name", "../../x"], 2, "--study-name"),
                                 (["--storage", "somefile.txt/study.journal"], 2, "somefile.txt"),
                                 (["--storage", "sqlite:////nonexistent/dir/x.db"], 1, "cannot open"),
                                 (["--storage", "postgresql://u@localhost/db"], 1, "cannot open")]:
        code, err = refused(capsys, base + extra)
        assert code == status and words in err, (extra, err)
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "studies").exists()  # nothing was created
    assert not (tmp_path.parent / "x.journal").exists()  # studies/../../x


def test_study_names_are_plain_file_names(tmp_path):
    for name in ["quickstart", "exp_1a2b3c4d", "run-2.v1"]:
        assert check_study_name(name) == name
    for name in ["../../x", "a/b", ".hidden", "", "a" * 201, "a b"]:
        with pytest.raises(UsageError, match="--study-name"):
            check_study_name(name)
    with pytest.raises(UsageError):  # workbench ui --study takes the same path
        storage_for("../x", None, tmp_path / "studies")


def test_tune_without_config_lists_the_experiment_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "a.yaml").write_text("lr: 1.0e-3\ntune:\n  metric: best_mAP\n")
    (tmp_path / "b.yaml").write_text("lr: 1.0e-3\n")
    (tmp_path / "c.yaml").write_text("tune:\n  sampler: random\n")
    status, err = refused(capsys, ["tune", "--trials", "50"])
    assert status == 2 and "no exp.yaml here" in err and err.endswith(": c.yaml, experiments/a.yaml")


def test_sigterm_stops_parallel_trials_promptly(tune_config, tmp_path, monkeypatch, capsys):
    """--n-jobs 2: SIGTERM reaches the main thread only; the running trials are interrupted at their
    next logged step (FAIL 'interrupted', MLflow runs KILLED), no new trial starts, exit 143."""
    import signal
    import threading

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    argv = ["tune", write_config(tune_config, tmp_path / "par.yaml"), "--trials", "6", "--n-jobs", "2",
            "--tracking-uri", uri, "--pruner", "none"]
    original, sent = tuning._TrialTracker.log_metrics, []

    def log_metrics(self, metrics, step):
        if not sent:  # the first logged step of any trial: SIGTERM to the main thread, as `kill` sends it
            sent.append(1)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            deadline = time.time() + 10
            while time.time() < deadline:  # until the main thread has stopped the study: then this raises
                original(self, {}, step)
                time.sleep(0.01)
            raise AssertionError("a logged step did not interrupt the trial")  # its fail_reason says so
        original(self, metrics, step)

    monkeypatch.setattr(tuning._TrialTracker, "log_metrics", log_metrics)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert main(argv) == 143
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert "terminated (SIGTERM)" in capsys.readouterr().err
    trials = journal_study(tmp_path / "studies" / "par.journal", "par").trials
    assert 1 <= len(trials) <= 2  # the two first trials, not six
    assert all(t.state == optuna.trial.TrialState.FAIL and t.user_attrs["fail_reason"] == INTERRUPTED
               for t in trials), [(t.state, t.user_attrs.get("fail_reason")) for t in trials]
    client, parents, children = study_runs(uri, "par")
    assert [p.info.status for p in parents] == ["KILLED"] and len(children) == len(trials)
    assert all(c.info.status == "KILLED" and c.data.tags["state"] == "FAIL" for c in children)
    experiment = client.get_experiment_by_name("quickstart").experiment_id
    assert not client.search_runs([experiment], "attributes.status = 'RUNNING'")


def test_fault_of_the_environment_stops_the_study_and_is_replaced(tune_config, tmp_path, monkeypatch, capsys):
    """A ResourceError (disk full) is not the trial's fault: the study stops after that trial with
    the error (exit 1), and the trial does not count: the next run replaces it."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    argv = ["tune", write_config(tune_config, tmp_path / "disk.yaml"), "--trials", "2", "--tracking-uri", uri]
    monkeypatch.setattr(tuning, "train_joint", fake_train_joint(
        tmp_path, ResourceError("cannot write x.pth: No space left on device")))
    status, err = refused(capsys, argv)
    assert status == 1 and err.endswith("cannot write x.pth: No space left on device")
    (trial,) = journal_study(tmp_path / "studies" / "disk.journal", "disk").trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == FAULT + "ResourceError: cannot write x.pth: No space left on device"
    assert [p.info.status for p in study_runs(uri, "disk")[1]] == ["FAILED"]

    monkeypatch.setattr(tuning, "train_joint", fake_train_joint(tmp_path))
    assert main(argv) == 0
    assert "2/2 trials: 2 complete, 0 pruned, 0 failed; 1 replaced" in capsys.readouterr().out
    assert len(journal_study(tmp_path / "studies" / "disk.journal", "disk").trials) == 3


def test_failing_bookkeeping_keeps_a_finished_trial(tune_config, tmp_path, monkeypatch, capsys):
    """The store refusing the outcome tags after a successful run: a warning, the trial COMPLETE."""
    original = MlflowClient.set_tag

    def set_tag(self, run_id, key, value, *args, **kwargs):
        if key in ("state", "objective"):
            raise RuntimeError("store hiccup")
        return original(self, run_id, key, value, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "set_tag", set_tag)
    monkeypatch.setattr(tuning, "train_joint", fake_train_joint(tmp_path))
    options = TuneOptions(trials=1, study_name="tags", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    (trial,) = run_study(tune_config, options, log=lambda _: None, studies_dir=tmp_path / "studies").trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == pytest.approx(50.0 + tune_config.lr)
    assert "warning: cannot tag trial 0 COMPLETE in MLflow (store hiccup)" in capsys.readouterr().err


def test_any_error_ends_the_parent_run(tune_config, tmp_path, monkeypatch, capsys):
    """An error after the trials (here the summary) ends the study's parent run FAILED; when the
    store cannot even do that, the original error still comes through."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setattr(tuning, "train_joint", fake_train_joint(tmp_path))
    monkeypatch.setattr(Study, "summarise", lambda self: (_ for _ in ()).throw(RuntimeError("summary broke")))
    options = TuneOptions(trials=1, study_name="end", tracking_uri=uri)
    with pytest.raises(RuntimeError, match="summary broke"):
        run_study(tune_config, options, log=lambda _: None, studies_dir=tmp_path / "studies")
    assert [p.info.status for p in study_runs(uri, "end")[1]] == ["FAILED"]

    def refuse(*args, **kwargs):
        raise RuntimeError("store down")

    monkeypatch.setattr(MlflowClient, "set_terminated", refuse)
    with pytest.raises(RuntimeError, match="summary broke"):
        run_study(tune_config, options, log=lambda _: None, studies_dir=tmp_path / "studies")
    assert "(store down)" in capsys.readouterr().err


def test_storage_that_is_not_a_journal_is_a_usage_error(tune_config, tmp_path, monkeypatch, capsys):
    import random

    monkeypatch.chdir(tmp_path)
    cfg_path = write_config(tune_config, tmp_path / "exp.yaml")
    (tmp_path / "random.bin").write_bytes(random.Random(0).randbytes(4096))
    (tmp_path / "broken.journal").write_text('{"op_code": 0}\n')  # a journal's first line, not its entry
    (tmp_path / "folder").mkdir()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    base = ["tune", cfg_path, "--trials", "1", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]
    for storage, words in [("random.bin", "--storage random.bin: not an Optuna journal file ("),
                           ("exp.yaml", "--storage exp.yaml: not an Optuna journal file (its first line is not JSON)"),
                           ("broken.journal", "--storage broken.journal: not an Optuna journal file (KeyError"),
                           ("folder", "--storage folder is a folder; give a journal file or a database URL"),
                           ("bogus://x", "--storage bogus://x: unknown scheme bogus://"),
                           ("http://localhost:5000", "unknown scheme http://")]:
        code, err = refused(capsys, base + ["--storage", storage])
        assert code == 2 and words in err, (storage, err)
    assert not (tmp_path / "m.db").exists() and not (tmp_path / "studies").exists()  # no parent run, no study
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # no .lock, unchanged


def test_unusable_tracking_store_leaves_no_study(tune_config, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, err = refused(capsys, ["tune", write_config(tune_config, tmp_path / "exp.yaml"), "--trials", "1",
                                   "--tracking-uri", "bogus://x"])
    assert status == 2 and "bogus://x" in err
    assert not (tmp_path / "studies").exists()


def test_a_trial_beside_another_re_runs_to_the_same_numbers(tune_config, tmp_path):
    """The re-run command of a trial that ran beside another (its overrides, its val_start and the
    CPU threads it had) reproduces the trial's value to the bit when run alone. That runs in
    threads do not disturb each other's random numbers is held by test_runner's
    test_runs_side_by_side_in_threads_give_what_each_gives_alone."""
    import shlex

    import torch

    from workbench.runner import train_joint

    cfg = config.replace(tune_config, epochs_image=4, save_checkpoints=False)
    path = tmp_path / "exp.yaml"
    path.write_text(cfg.to_yaml())
    options = TuneOptions(trials=2, study_name="exact", n_jobs=2, pruner="none",
                          tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    study = run_study(cfg, options, str(path), log=lambda _: None, studies_dir=tmp_path / "studies")
    before = torch.get_num_threads()
    try:
        for trial in study.trials:
            args = shlex.split(trial.user_attrs["rerun"])
            threads = int(args[1].split("=")[1]) if args[0] == "env" else before
            assert args[0] != "env" or threads == max(1, before // 2)
            torch.set_num_threads(threads)
            overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
            rerun = train_joint(config.load(args[args.index("run") + 1], overrides), quiet=True)
            assert rerun["best_mAP"] == trial.value, trial.number
    finally:
        torch.set_num_threads(before)


def test_prune_replay_bench_replays_a_sequential_study_exactly(tmp_path, capsys, monkeypatch):
    """bench/prune_replay.py: a study run one trial at a time with Optuna's median pruner replays
    to the same outcomes under the median line (nothing saved, the same complete trials), then one
    line per out-of-reach margin."""
    import importlib.util

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    spec = importlib.util.spec_from_file_location("prune_replay", Path(__file__).parents[1] / "bench" / "prune_replay.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # its dataclass looks itself up there
    spec.loader.exec_module(bench)
    journal = str(tmp_path / "s.journal")
    study = optuna.create_study(study_name="s", storage=JournalStorage(JournalFileBackend(journal)),
                                direction="maximize", pruner=tuning.build_pruner("median", 40, False))
    rng = np.random.default_rng(1)
    for _ in range(12):
        trial = study.ask()
        top, rate, values = rng.uniform(60, 95), rng.uniform(0.05, 0.3), []
        for epoch in range(10, 41):  # rising curves with noise, validated from epoch 10 as in a trial
            values.append(float(top * (1 - np.exp(-rate * epoch)) + rng.normal(0, 0.5)))
            trial.report(values[-1], epoch)
            if trial.should_prune():
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                break
        else:
            study.tell(trial, max(values))  # best_mAP: the best validated value
    assert bench.main(["--journal", journal, "--study", "s", "--margin", "1", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    complete = sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert out[0] == f"12 trials, {complete} complete in the study (maximize, 40 epochs)"
    assert out[1].startswith("median: ") and "(+0 saved)" in out[1] and f"{complete} complete" in out[1]
    assert [line.split(":")[0] for line in out if not line.startswith("    ")][2:] == [
        "median + out of reach, margin 1x", "median + out of reach, margin 2x"]


def test_parallel_trials_share_the_cores_for_their_loader_workers(tiny_config, monkeypatch):
    import os

    from workbench.runner import workers_side_by_side

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    auto = config.replace(tiny_config, num_workers="auto", device="auto")
    assert workers_side_by_side(auto, 1) == "auto"  # one run: it resolves auto itself, with every core
    assert workers_side_by_side(auto, 2) == 7 and workers_side_by_side(auto, 4, "cuda:1") == 3
    assert workers_side_by_side(auto, 2, "cpu") == 0  # on the CPU the trials' threads take the cores
    assert workers_side_by_side(config.replace(auto, num_workers=5), 4) == 5  # a count is the config's
