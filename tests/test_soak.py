"""Soak: two worker processes run many short trials of one study (one journal storage, one SQLite
MLflow store); afterwards the study and the store must agree exactly.

    python -m pytest -q -s -m slow tests/test_soak.py   # WORKBENCH_SOAK_TRIALS=40 for a shorter one
"""
import os
import subprocess
import sys
import time
from collections import Counter

import optuna
import pytest
from mlflow.tracking import MlflowClient

from workbench import config

TRIALS = int(os.environ.get("WORKBENCH_SOAK_TRIALS", "200"))
EPOCHS = 2  # two image epochs: each COMPLETE run must hold a rank1 and an mAP for both


@pytest.mark.slow
def test_two_workers_share_one_study_for_many_trials(tiny_config, tmp_path):
    cfg = config.replace(tiny_config, epochs_prompt=1, epochs_image=EPOCHS, save_checkpoints=False)
    cfg_path = tmp_path / "soak.yaml"
    cfg_path.write_text(cfg.to_yaml())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    journal = tmp_path / "soak.journal"
    command = [sys.executable, "-m", "workbench.cli", "tune", str(cfg_path), "--trials", str(TRIALS),
               "--storage", str(journal), "--tracking-uri", uri, "--pruner", "none", "--sampler", "random",
               "--keep-checkpoints", "none"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}  # two workers on a small machine: one core each
    started = time.perf_counter()
    logs = [open(tmp_path / f"worker{i}.log", "w") for i in range(2)]
    workers = [subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env) for log in logs]
    for worker in workers:
        worker.wait(timeout=max(900, 30 * TRIALS))
    for log in logs:
        log.close()
    wall = time.perf_counter() - started
    outputs = [(tmp_path / f"worker{i}.log").read_text() for i in range(2)]
    assert [w.returncode for w in workers] == [0, 0], [out[-3000:] for out in outputs]

    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    trials = optuna.load_study(study_name="soak", storage=storage).trials
    states = Counter(t.state.name for t in trials)
    per_worker = Counter(t.user_attrs.get("worker") for t in trials)
    print(f"\nsoak: {TRIALS} trials by 2 workers in {wall:.0f}s ({wall / TRIALS:.1f}s a trial); states {dict(states)}; "
          f"per worker {sorted(per_worker.values())}")
    assert len(trials) == TRIALS and states == {"COMPLETE": TRIALS}
    assert sorted(t.number for t in trials) == list(range(TRIALS))

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    runs = client.search_runs([experiment.experiment_id], max_results=50000)
    assert not [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    (parent,) = [r for r in runs if r.data.tags.get("workbench.role") == "study"]
    assert parent.info.status == "FINISHED"
    children = {r.info.run_id: r for r in runs if r.data.tags.get("workbench.role") == "trial"}
    assert len(children) == TRIALS
    for trial in trials:
        child = children[trial.user_attrs["mlflow_run_id"]]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.data.tags["trial_number"] == str(trial.number) and child.data.tags["state"] == "COMPLETE"
        assert child.info.status == "FINISHED"
        for key in ("rank1", "mAP"):
            steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, key))
            assert steps == list(range(1, EPOCHS + 1)), (trial.number, key, steps)
