"""Scaling out on the engines the field uses: one Optuna study on PostgreSQL shared by worker
processes, every worker logging to one `mlflow server` over PostgreSQL, and a dead worker on
another machine found by Optuna's heartbeat. Real servers on 127.0.0.1, started here
(tests/servers.py); .ci/run installs PostgreSQL and the `scale` extra."""
import importlib.util
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient

from servers import free_port, postgres_bin, postgres_server, start_mlflow_server, stop_server
from workbench import config
from workbench.cli import main
from workbench.tuning import PARENT_ATTR, RUN_ATTR, WORKER_ENDED

COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)


def _missing() -> str | None:
    if importlib.util.find_spec("psycopg") is None:
        return 'psycopg is not installed (pip install -e ".[scale]")'
    if not (postgres_bin("initdb") and postgres_bin("pg_ctl")):
        return "PostgreSQL is not installed (apt-get install postgresql)"
    return None


# CI installs both (.ci/run): there a missing one fails the tests instead of skipping them.
pytestmark = [pytest.mark.scale,
              pytest.mark.skipif(_missing() is not None and not os.environ.get("CI"), reason=str(_missing()))]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """(Optuna storage URL, MLflow tracking URL): PostgreSQL with two databases, and `mlflow
    server` over the second one."""
    with postgres_server(("optuna", "mlflow")) as urls:
        server, tracking = start_mlflow_server(urls["mlflow"], tmp_path_factory.mktemp("artifacts"))
        try:
            yield urls["optuna"], tracking
        finally:
            stop_server(server)


def write_config(cfg, path, **changes):
    path.write_text(config.replace(cfg, save_checkpoints=False, **changes).to_yaml())
    return str(path)


def tune_command(config_path, study, storage, tracking, trials, *extra):
    return [sys.executable, "-m", "workbench", "tune", config_path, "--trials", str(trials), "--study-name", study,
            "--storage", storage, "--tracking-uri", tracking, *extra]


def on_another_machine(command):
    """``command`` in a UTS namespace of its own whose host name is other-machine: to the study it
    is a worker on another host, whose process this machine cannot see."""
    unshare = ["unshare", "--uts"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--uts"]
    return [*unshare, "sh", "-c", 'hostname other-machine && exec "$@"', "sh", *command]


def test_three_workers_reach_the_exact_trial_count_under_one_parent_run(servers, tiny_config, tmp_path):
    storage, tracking = servers
    config_path = write_config(tiny_config, tmp_path / "exp.yaml", epochs_prompt=1, epochs_image=1)
    command = tune_command(config_path, "three", storage, tracking, 7)
    workers = [subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for _ in range(3)]
    outputs = [worker.communicate(timeout=600)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0, 0], "\n----\n".join(outputs)

    study = optuna.load_study(study_name="three", storage=storage)
    assert sum(t.state in COUNTED for t in study.trials) == 7  # not one more: claims go through the database
    assert not [t for t in study.trials if not t.state.is_finished()]
    assert len({t.user_attrs["worker"] for t in study.trials}) >= 2  # the workers did share the study

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name(tiny_config.experiment)
    parents = client.search_runs([experiment.experiment_id], "tags.study_name = 'three' and "
                                                             "tags.`workbench.role` = 'study'")
    assert [p.info.run_id for p in parents] == [study.user_attrs[PARENT_ATTR]]  # created once, found by the others
    assert parents[0].info.status == "FINISHED"
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    assert {r.info.run_id for r in children} == {t.user_attrs[RUN_ATTR] for t in study.trials}
    assert all(r.info.status == "FINISHED" for r in children)


def test_a_worker_killed_on_another_machine_is_replaced_through_the_heartbeat(servers, tiny_config, tmp_path):
    """A worker on another machine dies in the middle of a trial (SIGKILL): the next worker fails
    that trial through the heartbeat, marks its run KILLED and retries its values. (A worker that is
    only stopped, SIGSTOP, can be stopped inside a database transaction whose row locks then block
    the others until PostgreSQL drops its session: not tested here.)"""
    storage, tracking = servers
    heartbeat = {"tune": {**tiny_config.tune.__dict__, "heartbeat_interval": 1, "grace_period": 4, "retry_failed": 1}}
    slow = write_config(tiny_config, tmp_path / "slow.yaml", epochs_prompt=1, epochs_image=200, **heartbeat)
    quick = write_config(tiny_config, tmp_path / "quick.yaml", epochs_prompt=1, epochs_image=1, **heartbeat)
    victim = subprocess.Popen(on_another_machine(tune_command(slow, "dead", storage, tracking, 2)), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    running = []
    while not running:  # stop it in the middle of its first trial, once that trial has its MLflow run
        assert time.time() < deadline and victim.poll() is None, "the worker on the other machine did not start"
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name="dead", storage=storage)
        except KeyError:  # not created yet
            continue
        running = [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)) if RUN_ATTR in t.user_attrs]
    time.sleep(1.5)  # a heartbeat or two
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    (lost,) = running
    assert lost.user_attrs["worker"].startswith("other-machine/")  # host name/PID namespace:pid
    rescuer = subprocess.run(tune_command(quick, "dead", storage, tracking, 2), cwd=tmp_path, capture_output=True,
                             text=True, timeout=600)
    assert rescuer.returncode == 0, rescuer.stdout + rescuer.stderr

    study = optuna.load_study(study_name="dead", storage=storage)
    failed = study.trials[lost.number]
    assert failed.state == optuna.trial.TrialState.FAIL and failed.user_attrs["fail_reason"].startswith(WORKER_ENDED)
    assert "heartbeat" in failed.user_attrs["fail_reason"]
    assert sum(t.state in COUNTED and t.number != lost.number for t in study.trials) == 2  # it does not count
    assert not [t for t in study.trials if not t.state.is_finished()]
    retry = [t for t in study.trials if t.user_attrs.get("retry_of") == lost.number]
    assert len(retry) == 1 and retry[0].params == lost.params  # retried once with its own values (retry_failed: 1)
    client = MlflowClient(tracking)
    assert client.get_run(lost.user_attrs[RUN_ATTR]).info.status == "KILLED"
    assert client.get_run(study.user_attrs[PARENT_ATTR]).info.status == "FINISHED"
    assert f"trial {lost.number:3d} FAIL" in rescuer.stdout + rescuer.stderr


def test_an_unreachable_database_is_one_line_and_no_study(tiny_config, tmp_path, capsys):
    config_path = write_config(tiny_config, tmp_path / "exp.yaml")
    storage = f"postgresql://workbench:s3cret@127.0.0.1:{free_port()}/optuna"  # nothing listens there
    status = main(["tune", config_path, "--trials", "1", "--storage", storage,
                   "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    shown = storage.replace("s3cret", "***")  # a password is never shown
    assert status == 1 and len(err) == 1 and err[0].startswith(f"workbench: error: --storage: cannot open {shown}")
    assert "s3cret" not in err[0]
    assert not (tmp_path / "studies").exists()


def test_a_session_paused_inside_a_transaction_is_ended_after_the_grace_period(servers):
    """A worker paused (SIGSTOP, a suspended machine) while it holds the claim lock, or row locks
    inside a transaction, would block every other worker: its PostgreSQL sessions carry
    idle_in_transaction_session_timeout = the grace period, so the server ends them and the
    others go on; the paused worker's own unlock, when it comes back, is quiet."""
    import threading

    from workbench.tuning import _advisory_lock

    storage, _ = servers
    paused = _advisory_lock(storage, "claim:paused", grace_period=1)()
    paused.__enter__()  # holds the lock inside a transaction, then says nothing: a paused worker
    taken = threading.Event()

    def other_worker():
        with _advisory_lock(storage, "claim:paused", grace_period=1)():
            taken.set()

    thread = threading.Thread(target=other_worker, daemon=True)
    thread.start()
    assert taken.wait(timeout=20), "the other worker still waits for the paused session's lock"
    paused.__exit__(None, None, None)  # back from the pause: its session is gone, and so is its lock
