"""Faults of the machine and mistakes of the user: each ends in one line, the right exit status,
nothing torn, and MLflow run states that tell what happened."""
import ast
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from workbench import config, runner
from workbench.cli import main
from workbench.data import synthesize_dataset
from workbench.runner import train_joint
from workbench.tracking import MlflowTracker, machine_id, mark_stale_runs, stale_reason

PACKAGE = Path(__file__).resolve().parents[1] / "workbench"


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("workbench: error: ")]
    assert len(lines) == 1, err
    return lines[0][len("workbench: error: "):]


def write_config(cfg, tmp_path) -> str:
    path = tmp_path / "exp.yaml"
    path.write_text(cfg.to_yaml())
    return str(path)


def runs_of(uri, experiment="quickstart"):
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id])


# ---------------------------------------------------------------- the tracking store
@pytest.mark.parametrize("uri, expected, status", [
    ("bogus://nowhere", "unknown scheme bogus://", 2),  # the URI given is wrong: exit 2
    ("file:///{tmp}/mlruns", "MLflow 3 no longer writes a file store", 2),
    ("sqlite:///{tmp}/a_file/mlflow.db", "a_file is a file where a folder is needed", 2),
    ("http://127.0.0.1:{port}", "Connection refused", 1),  # a server that is down: a fault, exit 1
])
def test_a_tracking_store_that_cannot_be_used_stops_before_training(tiny_config, tmp_path, capsys, uri, expected,
                                                                    status):
    (tmp_path / "a_file").write_text("")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = uri.format(tmp=tmp_path, port=port)
    assert main(["run", write_config(tiny_config, tmp_path), "--tracking-uri", uri]) == status
    line = one_error_line(capsys)
    assert line.startswith(f"tracking store {uri}: ") and expected in line, line
    assert not Path(tiny_config.output_dir).exists()  # no run folder left behind


def test_a_store_that_refuses_the_run_leaves_no_run_folder(tiny_config, tmp_path, capsys, monkeypatch):
    from mlflow.tracking import MlflowClient as Client

    def read_only(*args, **kwargs):
        raise PermissionError("attempt to write a readonly database")

    monkeypatch.setattr(Client, "create_run", read_only)
    uri = f"sqlite:///{tmp_path / 'ro.db'}"
    assert main(["run", write_config(tiny_config, tmp_path), "--tracking-uri", uri]) == 1
    assert one_error_line(capsys) == (f"cannot start an MLflow run at {uri}: attempt to write a readonly database")
    assert not list(Path(tiny_config.output_dir).iterdir())


class FlakyStore:
    """Makes the store refuse metrics while ``down`` is set."""

    def __init__(self, tracker):
        self.down = False
        self.refused = 0
        original = tracker.client.log_batch

        def log_batch(run_id, metrics=(), params=(), tags=()):
            if self.down and metrics:
                self.refused += 1
                raise ConnectionError("connection reset by peer")
            return original(run_id, metrics=metrics, params=params, tags=tags)

        tracker.client.log_batch = log_batch


def test_the_store_going_away_mid_run_keeps_the_run_and_its_metrics(tiny_config, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'flaky.db'}"
    cfg = config.replace(tiny_config, epochs_image=3)
    tracker = MlflowTracker(uri)
    tracker.RETRY_SECONDS = 0.0
    store = FlakyStore(tracker)

    def weather(epoch, metrics):  # down during epoch 1's report, back before epoch 3
        store.down = epoch == 1

    result = train_joint(cfg, tracker, report=weather)
    assert store.refused > 0
    err = capsys.readouterr().err
    assert err.count("warning: cannot log to") == 1 and "training goes on" in err
    client = MlflowClient(uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "rank1")] == [1, 2, 3]  # retried: none lost
    assert int(run.data.tags["workbench.heartbeat"]) >= run.info.start_time // 1000  # a sign of life per flush
    assert not (Path(result["run_dir"]) / "undelivered_metrics.csv").exists()


def test_a_store_that_never_comes_back_ends_the_run_non_zero_with_its_metrics_saved(tiny_config, tmp_path):
    from workbench.errors import TrackingError

    uri = f"sqlite:///{tmp_path / 'gone.db'}"
    tracker = MlflowTracker(uri)
    store = FlakyStore(tracker)

    def away(epoch, metrics):
        store.down = True

    with pytest.raises(TrackingError, match="metric values were not delivered and are saved in"):
        train_joint(tiny_config, tracker, report=away)
    (run_dir,) = Path(tiny_config.output_dir).iterdir()
    spooled = (run_dir / "undelivered_metrics.csv").read_text().splitlines()
    assert spooled[0] == "run_id,key,value,timestamp,step" and any(",rank1," in row for row in spooled)
    assert list(run_dir.glob("*_image_FINAL.pth"))  # the checkpoints are kept


# ---------------------------------------------------------------- the disk and the output folder
def test_output_dir_that_is_a_file_is_one_line(tiny_config, tmp_path, capsys):
    blocker = tmp_path / "runs_file"
    blocker.write_text("")
    for output_dir in (blocker, blocker / "sub"):
        cfg = config.replace(tiny_config, output_dir=str(output_dir))
        assert main(["run", write_config(cfg, tmp_path), "--tracking-uri", f"sqlite:///{tmp_path / 'o.db'}"]) == 2
        line = one_error_line(capsys)
        assert line.startswith("output_dir: cannot create the run folder") and "a file stands where" in line
    assert not runs_of(f"sqlite:///{tmp_path / 'o.db'}")


def test_a_full_disk_ends_in_one_line_with_no_torn_checkpoint(tiny_config, tmp_path, capsys, monkeypatch):
    import tempfile

    from workbench import checkpoint

    real_mkstemp = tempfile.mkstemp

    def full_disk_for_checkpoints(prefix="", suffix="", dir=None):
        fd, name = real_mkstemp(prefix=prefix, suffix=suffix, dir=dir)
        if ".pth." in prefix + ".":
            os.close(fd)
            fd = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC, as on a full disk
        return fd, name

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", full_disk_for_checkpoints)
    uri = f"sqlite:///{tmp_path / 'full.db'}"
    assert main(["run", write_config(tiny_config, tmp_path), "--tracking-uri", uri]) == 1
    line = one_error_line(capsys)
    assert line.startswith("cannot write ") and "No space left on device" in line and "mlflow gc" in line
    (run_dir,) = Path(tiny_config.output_dir).iterdir()
    assert not list(run_dir.glob("*.pth")) and not list(run_dir.glob("*.tmp"))  # nothing torn, nothing left
    assert [r.info.status for r in runs_of(uri)] == ["FAILED"]


def test_resume_removes_the_temporaries_of_a_killed_save(interrupted_run, tiny_config, tmp_path):
    cfg = config.replace(tiny_config, epochs_image=2)
    run_dir = interrupted_run(cfg)
    torn = run_dir / (next(run_dir.glob("*_LAST.pth")).name + ".abc123.tmp")
    torn.write_bytes(b"half a checkpoint")
    log = next(run_dir.glob("*.log"))
    assert f"run interrupted; continue it with: workbench resume {run_dir}" in log.read_text()
    assert "run failed" not in log.read_text()  # Ctrl-C is not a failure
    train_joint(cfg, resume_dir=run_dir)
    assert not torn.exists()
    assert "removed 1 partial file(s) of an interrupted save" in log.read_text()


# ---------------------------------------------------------------- runs left RUNNING
def test_stale_runs_are_marked_killed_and_live_ones_kept(tmp_path):
    uri = f"sqlite:///{tmp_path / 'stale.db'}"
    client = MlflowTracker(uri).client
    experiment = client.create_experiment("stale")
    host = socket.gethostname()
    dead_pid = 2 ** 22 + 1  # above Linux's pid_max: never a live process
    runs = {
        "sigkilled": {"workbench.host": host, "workbench.pid": str(dead_pid)},
        "alive": {"workbench.host": host, "workbench.pid": str(os.getpid())},
        "elsewhere_silent": {"workbench.host": "another-machine", "workbench.heartbeat": "1000"},
        "elsewhere_recent": {"workbench.host": "another-machine"},
        # same host name, another PID namespace (a container): its pid means nothing here
        "other_namespace": {"workbench.host": host, "workbench.machine": f"{host}/1", "workbench.pid": str(dead_pid)},
        "sigkilled_here": {"workbench.host": host, "workbench.machine": machine_id(), "workbench.pid": str(dead_pid)},
    }
    ids = {name: client.create_run(experiment, run_name=name, tags=tags).info.run_id for name, tags in runs.items()}
    assert sorted(mark_stale_runs(client, [experiment], "a test")) == sorted([ids["sigkilled"], ids["sigkilled_here"]])
    assert client.get_run(ids["other_namespace"]).info.status == "RUNNING"
    killed = client.get_run(ids["sigkilled"])
    assert killed.info.status == "KILLED" and "marked KILLED by a test" in killed.data.tags["workbench.stale"]
    assert client.get_run(ids["alive"]).info.status == "RUNNING"
    assert client.get_run(ids["elsewhere_recent"]).info.status == "RUNNING"
    two_hours_on = time.time() + 2 * 3600  # another machine's run is judged by its last sign of life
    assert stale_reason(client.get_run(ids["elsewhere_silent"]), two_hours_on).startswith("no sign of life for 120")
    client.set_tag(ids["elsewhere_recent"], "workbench.heartbeat", str(int(two_hours_on) - 60))
    assert stale_reason(client.get_run(ids["elsewhere_recent"]), two_hours_on) is None
    assert stale_reason(client.get_run(ids["alive"]), two_hours_on) is None


def test_resume_after_sigkill_closes_the_stale_run_and_continues_it(interrupted_run, tiny_config, tmp_path, capsys):
    import json

    uri = f"sqlite:///{tmp_path / 'kill.db'}"
    run_dir = interrupted_run(config.replace(tiny_config, epochs_image=2), MlflowTracker(uri))
    run_id = json.loads(next(run_dir.glob("*_run.json")).read_text())["run_id"]
    client = MlflowClient(uri)
    # what SIGKILL leaves: the run RUNNING, owned by a process that is gone
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, "workbench.pid", str(2 ** 22 + 1))
    assert main(["resume", str(run_dir), "--tracking-uri", uri]) == 0
    assert "marked 1 stale RUNNING run(s)" in capsys.readouterr().err
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "workbench.stale" not in run.data.tags  # alive again, tag gone
    client.update_run(run_id, status="RUNNING")  # as if another process were resuming it right now
    client.set_tag(run_id, "workbench.pid", str(os.getpid()))
    assert main(["resume", str(run_dir), "--tracking-uri", uri]) == 2
    assert "is still running (process" in one_error_line(capsys)


# ---------------------------------------------------------------- files that are not checkpoints
def test_eval_names_what_a_wrong_checkpoint_file_is(tiny_config, tmp_path, capsys):
    result = train_joint(config.replace(tiny_config, epochs_image=1))
    run_dir = Path(result["run_dir"])
    final = next(run_dir.glob("*_image_FINAL.pth"))
    state = torch.load(final, weights_only=True)
    files = {
        "prompt_only": next(run_dir.glob("*_image_FINAL_prompt.pth")),
        "prompt_stage": next(run_dir.glob("*_prompt_FINAL.pth")),
        "tensor": tmp_path / "tensor.pth",
        "state_dict": tmp_path / "weights.pth",
        "random": tmp_path / "random.pth",
        "truncated": tmp_path / "truncated.pth",
        "newer": tmp_path / "newer.pth",
        "other_arch": tmp_path / "other_arch.pth",
    }
    torch.save(torch.zeros(3), files["tensor"])
    torch.save({"visual.proj": torch.zeros(2, 2)}, files["state_dict"])
    files["random"].write_bytes(os.urandom(4096))
    files["truncated"].write_bytes(final.read_bytes()[:5000])
    torch.save(state | {"format": 99}, files["newer"])
    torch.save(state | {"metadata": state["metadata"] | {"architecture": "ViT-B-16"}}, files["other_arch"])
    expected = {
        "prompt_only": "is a prompt-only file (*_prompt.pth)",
        "prompt_stage": "is the prompt stage's checkpoint: evaluate it with --prompts",
        "tensor": "holds a single tensor, not a workbench checkpoint",
        "state_dict": "is a plain state dict",
        "random": "is not a readable checkpoint",
        "truncated": "is not a readable checkpoint",
        "newer": "was written by a newer workbench",
        "other_arch": "is from model_type ViT-B-16, expected model_type wb-tiny",
    }
    cfg_path = write_config(tiny_config, tmp_path)
    for name, path in files.items():
        assert main(["eval", cfg_path, "--checkpoint", str(path)]) == 2, name
        line = one_error_line(capsys)
        assert str(path) in line and expected[name] in line, (name, line)


# ---------------------------------------------------------------- the error family and small commands
def test_debug_shows_the_traceback_and_keeps_the_exit_status(tiny_config, tmp_path, capsys, monkeypatch):
    cfg_path = write_config(tiny_config, tmp_path)
    for args in (["run", cfg_path, "--set", "epochs_imag=3", "--debug"], ["--debug", "run", cfg_path, "--set",
                                                                          "epochs_imag=3"]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "did you mean epochs_image" in err.splitlines()[-1]
    assert main(["data", "--debug", "synth", "--out", str(tmp_path / "d"), "--height", "0"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("WORKBENCH_DEBUG", "1")
    assert main(["run", cfg_path, "--set", "epochs_imag=3"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("WORKBENCH_DEBUG", "0")
    assert main(["run", cfg_path, "--set", "epochs_imag=3"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_every_error_class_belongs_to_the_family():
    from workbench import errors

    classes = {name: cls for name, cls in vars(errors).items() if isinstance(cls, type)
               and issubclass(cls, Exception)}
    assert all(issubclass(cls, errors.WorkbenchError) for cls in classes.values())
    assert {name for name, cls in classes.items() if cls.exit_code == 2} == {"UsageError", "ConfigError",
                                                                            "CheckpointError", "TrackingUriError"}
    for path in PACKAGE.glob("*.py"):  # errors are defined in errors.py only
        if path.name != "errors.py":
            defined = [node.name for node in ast.walk(ast.parse(path.read_text()))
                       if isinstance(node, ast.ClassDef) and node.name.endswith("Error")]
            assert not defined, (path.name, defined)


@pytest.mark.parametrize("args, expected", [
    (["--height", "0"], "at least 16 pixels, got 0x64"),
    (["--identities", "1"], "at least 2 identities"),
])
def test_data_synth_refuses_bad_sizes_at_once(tmp_path, capsys, args, expected):
    assert main(["data", "synth", "--out", str(tmp_path / "d")] + args) == 2
    assert expected in one_error_line(capsys)
    assert not list(tmp_path.iterdir())


def test_data_synth_refuses_an_existing_folder_before_rendering(tmp_path, capsys, monkeypatch):
    from workbench import data

    (tmp_path / "d").mkdir()
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(data, "render_hand", lambda *a: pytest.fail("rendered before refusing"))
    assert main(["data", "synth", "--out", str(tmp_path / "d")]) == 2
    assert "already exists" in one_error_line(capsys)
    assert main(["data", "synth", "--out", str(tmp_path / "file" / "d")]) == 2
    assert f"{tmp_path / 'file'} is a file" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "file"]  # no .partial


def test_ui_refuses_a_taken_port(tmp_path, capsys, new_store):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["ui", "--tracking-uri", new_store(tmp_path / "u.db"), "--port", str(port)]) == 1
    assert one_error_line(capsys).startswith(f"port {port} on 127.0.0.1 is not free")


@pytest.mark.parametrize("key", ["experiment", "variant", "dataset", "aspect"])
@pytest.mark.parametrize("value", ["../../elsewhere", "a/b", "..", ".hidden", "a\\b"])
def test_config_strings_cannot_escape_the_output_folder(key, value):
    with pytest.raises(config.ConfigError, match=f"{key}: .* cannot name files"):
        config.load("experiments/quickstart.yaml", [f"{key}={value!r}"])


def test_no_unsafe_loading_or_shell_in_the_package():
    """YAML through safe_load, checkpoints through weights_only, no shell built from values."""
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            assert name not in ("yaml.load", "yaml.unsafe_load", "os.system", "os.popen", "eval", "exec"), \
                (path.name, name)
            if name == "torch.load":
                assert keywords.get("weights_only") == "True", (path.name, node.lineno)
            if name.startswith("subprocess."):
                assert keywords.get("shell", "False") == "False", (path.name, node.lineno)


def test_ui_binds_to_this_machine_only_unless_asked(tmp_path, monkeypatch, new_store):
    import subprocess

    started = []

    class Exited:
        def __init__(self, args, **kwargs):
            started.append(args)
            self.args, self.pid, self.returncode = args, 2 ** 22 + 1, 0

        def poll(self):
            return 0

        def wait(self, timeout=None):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Exited)
    monkeypatch.setattr(os, "killpg", lambda *a: None)
    uri = new_store(tmp_path / "u.db")
    assert main(["ui", "--tracking-uri", uri, "--port", "0"]) == 0
    assert main(["ui", "--tracking-uri", uri, "--port", "0", "--host", "0.0.0.0"]) == 0
    hosts = [args[args.index("--host") + 1] for args in started]
    assert hosts == ["127.0.0.1", "0.0.0.0"]


def test_compare_takes_any_study_name(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'cmp.db'}"
    client = MlflowTracker(uri).client
    experiment = client.create_experiment("quickstart")
    for study in ("it's", "other"):
        run = client.create_run(experiment, tags={"study_name": study, "workbench.role": "trial"}).info.run_id
        client.log_metric(run, "best_mAP", 50.0)
        client.set_terminated(run)
    assert main(["compare", "--study", "it's", "--tracking-uri", uri, "--out", str(tmp_path / "c.csv")]) == 0
    assert "saved 1 runs" in capsys.readouterr().out
    assert main(["compare", "--tracking-uri", "bogus://x"]) == 2
    assert one_error_line(capsys).startswith("tracking store bogus://x: ")
    missing = tmp_path / "typo.db"  # a read-only command never creates a store
    assert main(["compare", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert "no such database file" in one_error_line(capsys) and not missing.exists()
    for out in (tmp_path, tmp_path / "nowhere" / "c.csv"):
        assert main(["compare", "--tracking-uri", uri, "--out", str(out)]) == 2
        assert one_error_line(capsys).startswith(f"--out {out}: ")
    assert main(["compare", "--tracking-uri", uri, "--metric", "best_mAp"]) == 2  # would sort on nothing
    assert one_error_line(capsys) == "--metric best_mAp: no run here logged it; they logged best_mAP"


def test_commands_that_only_read_create_nothing(tmp_path, capsys, monkeypatch, new_store):
    """A mistyped store, study, run folder or checkpoint is one line naming it, and leaves no file."""
    monkeypatch.chdir(tmp_path)
    store = new_store(tmp_path / "store.db")
    assert main(["ui", "--tracking-uri", f"sqlite:///{tmp_path / 'typo.db'}", "--port", "0"]) == 2
    assert "no such database file" in one_error_line(capsys)
    assert main(["ui", "--tracking-uri", store, "--study", "typo", "--port", "0"]) == 2
    assert one_error_line(capsys).startswith("studies/typo.journal: not found; name a study")
    assert main(["resume", str(tmp_path / "typo_run")]) == 2
    assert one_error_line(capsys) == f"run folder not found: {tmp_path / 'typo_run'}"
    assert main(["eval", "--checkpoint", str(tmp_path / "typo.pth")]) == 2
    assert one_error_line(capsys) == f"checkpoint not found: {tmp_path / 'typo.pth'}"
    assert {p.name for p in tmp_path.iterdir()} <= {"store.db", "store.db.lock"}  # the lock: opening store.db


def test_output_dir_that_cannot_be_written_is_one_line(tiny_config, tmp_path, capsys, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK else real_access(path, mode))
    assert main(["run", write_config(tiny_config, tmp_path), "--tracking-uri", f"sqlite:///{tmp_path / 'w.db'}"]) == 2
    assert one_error_line(capsys).startswith("output_dir: cannot write to ")


@pytest.mark.slow  # two server starts: about 75 s on 2 cores; the same logic is tested above with a fake outage
def test_a_real_tracking_server_going_away_and_coming_back(tiny_config, tmp_path, monkeypatch):
    """`mlflow server` stopped after epoch 1 and started again after epoch 2: the run goes on and
    every metric arrives."""
    from servers import free_port, start_mlflow_server, stop_server

    port = free_port()
    uri = f"http://127.0.0.1:{port}"

    def start_server():
        return start_mlflow_server(f"sqlite:///{tmp_path / 'srv.db'}", tmp_path / "artifacts", port)[0]

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    servers = [start_server()]
    try:
        tracker = MlflowTracker(uri)
        tracker.RETRY_SECONDS = 3600.0  # after the first refusal, the next try is the end of the run

        def weather(epoch, metrics):
            if epoch == 1:
                stop_server(servers[-1])
            if epoch == 2:
                servers.append(start_server())

        result = train_joint(config.replace(tiny_config, epochs_image=3, log_checkpoints=False), tracker,
                             report=weather)
        client = MlflowClient(uri)
        run = client.get_run(result["run_id"])
        assert run.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "rank1")] == [1, 2, 3]
        assert len(client.get_metric_history(run.info.run_id, "loss")) == len(tracker.history["loss"])
    finally:
        for server in servers:
            if server.poll() is None:
                stop_server(server)


def test_resume_looks_before_it_reopens_the_run(interrupted_run, tiny_config, tmp_path, capsys, new_store):
    """A torn LAST checkpoint, a store without the run, a tuning trial: refused, the record untouched."""
    import json
    import shutil

    uri = f"sqlite:///{tmp_path / 'look.db'}"
    run_dir = interrupted_run(config.replace(tiny_config, epochs_image=3), MlflowTracker(uri))
    assert "run interrupted; continue it with: workbench resume" in next(run_dir.glob("*.log")).read_text()
    run_id = json.loads(next(run_dir.glob("*_run.json")).read_text())["run_id"]
    client = MlflowClient(uri)
    before = client.get_run(run_id).info
    torn = tmp_path / "torn"
    shutil.copytree(run_dir, torn)
    last = next(torn.glob("*_LAST.pth"))
    last.write_bytes(last.read_bytes()[:1000])
    assert main(["resume", str(torn), "--tracking-uri", uri]) == 2
    assert "is not a readable checkpoint" in one_error_line(capsys)
    after = client.get_run(run_id).info
    assert (after.status, after.end_time) == (before.status, before.end_time) == ("KILLED", before.end_time)
    assert main(["resume", str(run_dir), "--tracking-uri", f"sqlite:///{tmp_path / 'typo.db'}"]) == 2
    assert "no such database file" in one_error_line(capsys) and not (tmp_path / "typo.db").exists()
    assert main(["resume", str(run_dir), "--tracking-uri", new_store(tmp_path / "other.db")]) == 2
    assert f"the MLflow run {run_id} of {run_dir} is not in" in one_error_line(capsys)
    client.set_tag(run_id, "workbench.role", "trial")
    client.set_tag(run_id, "study_name", "s")
    assert main(["resume", str(run_dir), "--tracking-uri", uri]) == 2
    assert "run workbench tune again" in one_error_line(capsys)


def test_files_follow_the_umask(tiny_config, tmp_path):
    previous = os.umask(0o022)
    try:
        result = train_joint(config.replace(tiny_config, epochs_image=1))
    finally:
        os.umask(previous)
    for path in Path(result["run_dir"]).glob("*"):
        if path.suffix in (".pth", ".yaml", ".json"):
            assert path.stat().st_mode & 0o777 == 0o644, path.name  # colleagues can read them


def test_ui_refuses_bad_ports_and_stores(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["ui", "--port", "99999"])
    assert stop.value.code == 2 and "a port is 0-65535, got 99999" in capsys.readouterr().err
    assert main(["ui", "--tracking-uri", "bogus://x", "--port", "0"]) == 2
    assert one_error_line(capsys).startswith("tracking store bogus://x: unknown scheme")


def test_a_run_stopped_before_its_first_checkpoint_says_the_resume_starts_over(tiny_config, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "train_clipreid_prompt_stage", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_joint(tiny_config)
    (run_dir,) = Path(tiny_config.output_dir).iterdir()
    last = next(run_dir.glob("*.log")).read_text().strip().splitlines()[-1]
    assert last.endswith(f"run interrupted; no checkpoint yet, so workbench resume {run_dir} starts it over in its "
                         f"folder and MLflow run")


def test_a_synthetic_data_root_made_with_other_settings_is_refused(tmp_path, capsys):
    """The synth_* keys a run logs must be the data it trains on: a synthetic dataset already in
    data_root made with other ones is one line before any run folder (seed and size may differ)."""
    root = tmp_path / "hands"
    synthesize_dataset(root, identities=6, images_per_identity=3, seed=3, size=(64, 32), test_identities=2)
    assert not (tmp_path / "hands.lock").exists()
    same = ["--set", f"data_root={root}", "--set", "synth_identities=6", "--set", "synth_images_per_identity=3",
            "--set", "synth_test_identities=2", "--set", "seed=1", "--set", "image_size=[128, 64]"]
    cfg = config.load("experiments/quickstart.yaml", [a for a in same if a != "--set"])
    runner.preflight(cfg)  # the dataset's own seed and size are not compared
    runs = tmp_path / "runs"
    assert main(["run", "experiments/quickstart.yaml", *same[:-4], "--set", "synth_identities=40",
                 "--set", f"output_dir={runs}", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"]) == 2
    assert one_error_line(capsys) == (
        f"data_root: {root} holds a synthetic dataset made with synth_identities 6 (the config says 40); give "
        f"another data_root, delete {root} to make it anew, or set synthesize_if_missing: false to train on it as it "
        f"is")
    assert not runs.exists() and not (tmp_path / "m.db").exists()


def test_the_generation_lock_goes_once_the_dataset_is_there(tmp_path):
    """An interrupted generation leaves its lock file; the run that makes the dataset removes it."""
    cfg = config.load("experiments/quickstart.yaml", [f"data_root={tmp_path / 'hands'}", "synth_identities=4",
                                                     "synth_images_per_identity=2", "synth_test_identities=2"])
    (tmp_path / "hands.lock").write_text("")  # left by a generation that was killed
    runner.ensure_dataset(cfg, log=lambda _: None)
    assert (tmp_path / "hands" / "train").is_dir() and not (tmp_path / "hands.lock").exists()
