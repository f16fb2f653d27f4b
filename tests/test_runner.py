"""End to end: the reduced quickstart against a real SQLite MLflow store, checked through MlflowClient."""
import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from workbench import config
from workbench.cli import main
from workbench.runner import train_joint
from workbench.tracking import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, MlflowTracker, RecordingTracker

PER_STEP = ["loss", "id_loss", "tri_loss", "center_loss", "i2t_loss", "t2i_loss", "feat_norm", "arc_conf", "lr",
            "prompt_loss", "prompt_norm", "prompt_var", "prompt_grad", "logits_std"]
PER_EPOCH = ["rank1", "rank5", "rank10", "mAP", "prompt_rank1", "prompt_mAP"]
AT_END = ["best_rank1", "best_mAP", "best_epoch", "prompt_stage_seconds", "image_stage_seconds"]


def artifact_names(client, run_id, path=None):
    names = []
    for item in client.list_artifacts(run_id, path):
        names += artifact_names(client, run_id, item.path) if item.is_dir else [item.path]
    return names


def test_quickstart_end_to_end_in_mlflow(tiny_config, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train_joint(tiny_config, MlflowTracker(uri))
    client = MlflowClient(uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.info.run_name == config.build_filename(tiny_config, tiny_config.epochs_image, "image")
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == "quickstart" and experiment.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    for key in PER_STEP + PER_EPOCH:
        history = client.get_metric_history(run.info.run_id, key)
        assert len({m.step for m in history}) > 1, key
        assert all(math.isfinite(m.value) for m in history), key
    for key in AT_END:
        assert key in run.data.metrics, key
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}  # the runs table's Dataset column
    assert sorted(inputs) == ["test split 0", "train", "validation"]
    assert inputs["train"].name == "synthetic_hands" and len({d.digest for d in inputs.values()}) == 3
    assert json.loads(inputs["train"].source)["uri"] == str(Path(tiny_config.data_root).resolve())
    assert run.data.metrics["best_rank1"] == pytest.approx(result["best_rank1"])
    assert run.data.params["lr"] == "0.001" and run.data.params["n_ctx"] == "4"
    assert run.data.params["tune.metric"] == "best_mAP" and "loss_list" in run.data.params
    for tag in ("stage_mode", "model", "dataset", "aspect", "git_commit", "config_hash"):
        assert tag in run.data.tags, tag
    # selection read the validation hold-out; the test split was evaluated once, at the end
    assert run.data.tags["selection"] == "val" and run.data.tags["select_metric"] == tiny_config.select_metric
    for key in ("test_rank1", "test_rank5", "test_rank10", "test_mAP", "test_mINP", "final_test_mAP"):
        assert run.data.metrics[key] == pytest.approx(result[key]), key
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0], key
    assert run.data.metrics["num_val_query"] > 0 and run.data.metrics["num_val_gallery"] == 2
    assert run.data.tags["config_hash"] == tiny_config.hash()
    stem = run.info.run_name
    names = set(artifact_names(client, run.info.run_id))
    expected = {f"{stem}.log", f"{stem}_config.yaml", f"plots/{stem}_losses.png", f"plots/{stem}_metrics.png",
                f"plots/{stem}_prompt.png", f"checkpoints/{stem}_BEST.pth", f"checkpoints/{stem}_FINAL.pth",
                f"checkpoints/{stem}_BEST_prompt.pth", f"checkpoints/{stem}_FINAL_prompt.pth",
                "checkpoints/" + config.build_filename(tiny_config, 2, "prompt", "pth", tag="FINAL")}
    assert expected <= names, expected - names
    run_dir = Path(result["run_dir"])
    assert not list(run_dir.glob("*.tmp"))  # atomic writes leave no partial files

    # the BEST checkpoint evaluates to the numbers it was saved with
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(tiny_config.to_yaml())
    assert main(["eval", str(cfg_path), "--checkpoint", str(run_dir / f"{stem}_BEST.pth"), "--split", "val"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith(f"rank1 {result['best_rank1']:.2f}") and f"mAP {result['best_mAP']:.2f}" in out
    # ... and on the test split to the test numbers the run logged for it
    assert main(["eval", str(cfg_path), "--checkpoint", str(run_dir / f"{stem}_BEST.pth")]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.startswith(f"rank1 {result['test_rank1']:.2f}") and f"mAP {result['test_mAP']:.2f}" in out
    assert main(["eval", str(cfg_path), "--checkpoint", str(run_dir / f"{stem}_FINAL.pth")]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"mAP {result['final_test_mAP']:.2f}" in out
    # evaluating with another config says what differs, or why the weights do not fit
    assert main(["eval", str(cfg_path), "--checkpoint", str(run_dir / f"{stem}_BEST.pth"),
                 "--set", "eval_neck_feat=after"]) == 0
    assert "warning: the checkpoint was trained with eval_neck_feat='before' (now 'after')" in capsys.readouterr().out
    assert main(["eval", str(cfg_path), "--checkpoint", str(run_dir / f"{stem}_BEST.pth"),
                 "--set", "val_identities=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "size mismatch" in err and "_config.yaml of its run folder" in err
    assert run.data.metrics["num_valid_selection_query"] > 0


@pytest.mark.parametrize("mode, extra", [("prompt_only", []), ("image_only", ["epochs_prompt=0"])])
def test_stage_modes(tiny_config, mode, extra):
    cfg = config.replace(tiny_config, stage_mode=mode, save_checkpoints=False,
                         **{k: int(v) for k, v in (e.split("=") for e in extra)})
    tracker = RecordingTracker()
    result = train_joint(cfg, tracker)
    keys = set(tracker.history)
    log = next(Path(result["run_dir"]).glob("*.log")).read_text()
    if mode == "prompt_only":
        assert "prompt_loss" in keys and "id_loss" not in keys and result["image_stage_seconds"] is None
        # image-to-prompt retrieval on training identities is not a ReID result: never best_*
        assert {"prompt_rank1", "prompt_mAP"} <= keys and not {"best_rank1", "best_mAP"} & keys
        assert result["best_rank1"] is None and "selection" not in tracker.tags
    else:
        assert "prompt_loss" not in keys and "id_loss" in keys and result["prompt_stage_seconds"] is None
        assert tracker.history["i2t_loss"][0][1] == 0.0  # no trained prompt: no text losses ...
        assert "i2t/t2i losses are off" in log  # ... and the log says so
    assert tracker.status == "FINISHED"


def test_without_a_holdout_selection_reads_the_test_split_and_says_so(tiny_config):
    tracker = RecordingTracker()
    result = train_joint(config.replace(tiny_config, val_identities=0, save_checkpoints=False, epochs_prompt=1),
                         tracker)
    log = next(Path(result["run_dir"]).glob("*.log")).read_text()
    assert tracker.tags["selection"] == "test" and result["selection"] == "test"
    assert "warning: no validation split" in log
    assert result["test_rank1"] == pytest.approx(result["best_rank1"])  # BEST re-evaluated on the same split


def test_select_metric_picks_the_epoch_with_the_best_of_that_metric(tiny_config):
    tracker = RecordingTracker()
    result = train_joint(config.replace(tiny_config, select_metric="mAP", save_checkpoints=False, epochs_prompt=1,
                                        epochs_image=3), tracker)
    maps = dict(tracker.history["mAP"])
    best_epoch = max(maps, key=lambda e: (maps[e], -e))
    assert result["best_epoch"] == best_epoch and result["best_mAP"] == pytest.approx(maps[best_epoch])
    assert tracker.tags["select_metric"] == "mAP" and tracker.tags["selection"] == "val"


def test_cli_run_prints_metrics_and_run_id(tiny_config, tmp_path, capsys):
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(tiny_config.to_yaml())
    uri = f"sqlite:///{tmp_path / 'cli.db'}"
    assert main(["run", str(cfg_path), "--set", "epochs_image=1", "--set", "save_checkpoints=false",
                 "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "best val rank1" in out and "test  BEST  rank1" in out and "MLflow run" in out
    run_id = out.split("MLflow run ")[1].split()[0]
    assert MlflowClient(uri).get_run(run_id).info.status == "FINISHED"


def test_config_mistakes_exit_2_before_a_run_exists(tiny_config, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'err.db'}"
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(tiny_config.to_yaml())
    assert main(["run", str(cfg_path), "--set", "epochs_imag=3"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "did you mean epochs_image" in err
    assert main(["run", str(cfg_path), "--set", "data_root=/nonexistent", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("workbench: error: data_root: dataset folder not found: /nonexistent (set data_root, or "
                           "synthesize_if_missing: true for the synthetic dataset)")
    (tmp_path / "empty").mkdir()  # a folder, but not a dataset
    assert main(["run", str(cfg_path), "--set", f"data_root={tmp_path / 'empty'}", "--tracking-uri", uri]) == 2
    assert capsys.readouterr().err.strip() == (
        f"workbench: error: data_root: {tmp_path / 'empty'} has no train/, query/, gallery/: not a dataset in the "
        f"folder layout (train/, query/, gallery/ of identity folders, or Market-1501's bounding_box_train/, query/, "
        f"bounding_box_test/)")
    (tmp_path / "market" / "bounding_box_train").mkdir(parents=True)  # Market-1501's, without its test folders
    assert main(["eval", str(cfg_path), "--set", f"data_root={tmp_path / 'market'}"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        f"workbench: error: data_root: {tmp_path / 'market'} has no query/, bounding_box_test/: not a dataset in the "
        f"Market-1501 layout")
    experiment = MlflowClient(uri).get_experiment_by_name("quickstart")
    assert experiment is None or not MlflowClient(uri).search_runs([experiment.experiment_id])
    assert not Path(tiny_config.output_dir).exists()


def test_a_fault_during_a_run_is_one_line_exit_1_and_a_failed_run(synth_root, tiny_config, tmp_path, capsys):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synth_root, root)
    victim = sorted((root / "train").rglob("*.png"))[0]
    victim.write_bytes(b"broken")
    uri = f"sqlite:///{tmp_path / 'c.db'}"
    cfg_path = tmp_path / "exp.yaml"
    for workers in (0, 2):  # in the main process, and raised inside DataLoader workers
        cfg_path.write_text(config.replace(tiny_config, data_root=str(root), num_workers=workers).to_yaml())
        assert main(["run", str(cfg_path), "--tracking-uri", uri]) == 1
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("cannot read image") == 1  # printed once
        line = err.strip().splitlines()[-1]
        assert line.startswith("workbench: error: cannot read image") and victim.name in line
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED", "FAILED"]
    (log,) = list(Path(tiny_config.output_dir).glob("*/*.log"))[:1]
    assert "Traceback" in log.read_text()  # the log file keeps the whole story
    assert main(["run", str(cfg_path), "--tracking-uri", uri, "--debug"]) == 1  # --debug shows the traceback
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_interrupted_run_resumes_to_the_same_numbers(interrupted_run, tiny_config, tmp_path, capsys):
    """... also with loader worker processes, which augment each image as the main process does."""
    uri = f"sqlite:///{tmp_path / 'resume.db'}"
    cfg = config.replace(tiny_config, epochs_image=3)
    reference = train_joint(cfg, MlflowTracker(uri))  # num_workers auto: 0 on the CPU with images in memory
    run_dir = interrupted_run(config.replace(cfg, num_workers=2), MlflowTracker(uri), at_epoch=2)
    client = MlflowClient(uri)
    killed = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id],
                                "attributes.status = 'KILLED'")
    assert len(killed) == 1
    assert [m.step for m in client.get_metric_history(killed[0].info.run_id, "rank1")] == [1, 2]

    assert main(["resume", str(run_dir), "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert killed[0].info.run_id in out
    run = client.get_run(killed[0].info.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "rank1")] == [1, 2, 3]
    for key in ("best_rank1", "best_mAP", "best_epoch"):
        assert run.data.metrics[key] == pytest.approx(reference[key], abs=1e-9), key
    final = client.get_metric_history(run.info.run_id, "mAP")[-1].value
    assert final == pytest.approx(reference["final_mAP"], abs=1e-9)
    for key in ("test_mAP", "final_test_mAP", "final_test_mINP"):  # finer than 2 held-out identities
        assert run.data.metrics[key] == pytest.approx(reference[key], abs=1e-9), key
    assert not list(run_dir.glob("*LAST*"))  # only needed while the run was unfinished
    ended = client.get_run(run.info.run_id).info
    assert main(["resume", str(run_dir), "--tracking-uri", uri]) == 2  # finished: nothing to resume ...
    assert "already finished" in capsys.readouterr().err
    after = client.get_run(run.info.run_id).info  # ... and its record is left as it was
    assert (after.status, after.end_time) == ("FINISHED", ended.end_time)


@pytest.mark.parametrize("override, expected", [("model_type=ViT-Z/99", "model_type: unknown CLIP model"),
                                                ("device=cuda:7", "device: cuda:7 requested")])
def test_model_and_device_mistakes_stop_before_a_run_exists(tiny_config, tmp_path, capsys, override, expected):
    import torch

    if override.startswith("device") and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    uri = f"sqlite:///{tmp_path / 'early.db'}"
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(tiny_config.to_yaml())
    assert main(["run", str(cfg_path), "--set", override, "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith(f"workbench: error: {expected}")
    assert not Path(tiny_config.output_dir).exists()  # no run folder ...
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is None or not client.search_runs([experiment.experiment_id])  # ... and no MLflow run


def test_multi_line_errors_keep_their_reason_on_one_line():
    from workbench.cli import _one_line
    from workbench.config import ConfigError

    assert _one_line(ConfigError("model: Error(s) in loading state_dict for CLIP:\n\tsize mismatch for x")) == \
        "model: Error(s) in loading state_dict for CLIP: size mismatch for x"
    worker = ConfigError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
                         "last):\n  File ...\nworkbench.data.DataError: cannot read image a.png")
    assert _one_line(worker) == "cannot read image a.png"


def test_sigterm_ends_the_run_killed_with_its_metrics_and_a_resumable_checkpoint(tiny_config, tmp_path, new_store):
    import signal
    import subprocess
    import sys
    import time

    uri = new_store(tmp_path / "term.db")
    cfg_path = tmp_path / "exp.yaml"
    cfg_path.write_text(config.replace(tiny_config, epochs_prompt=1, epochs_image=200).to_yaml())
    process = subprocess.Popen([sys.executable, "-m", "workbench.cli", "run", str(cfg_path), "--tracking-uri", uri],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(Path(tiny_config.output_dir).glob("*/*_LAST.pth")):
        assert process.poll() is None and time.time() < deadline, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and err.strip().splitlines()[-1] == "terminated (SIGTERM)", err
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert run.info.status == "KILLED", err
    assert client.get_metric_history(run.info.run_id, "rank1")  # what was logged reached the store
    assert client.get_metric_history(run.info.run_id, "prompt_loss")


def test_metrics_reach_mlflow_while_the_run_goes_on(tiny_config, tmp_path):
    uri = f"sqlite:///{tmp_path / 'live.db'}"
    client = MlflowClient(uri)
    seen = {}

    def look(epoch, metrics):
        if epoch == 1:
            run = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])[0]
            assert run.info.status == "RUNNING"
            seen.update({key: len(client.get_metric_history(run.info.run_id, key))
                         for key in ("prompt_loss", "prompt_rank1", "loss", "rank1")})

    train_joint(config.replace(tiny_config, epochs_prompt=1, epochs_image=2, save_checkpoints=False),
                MlflowTracker(uri), report=look)
    assert seen["prompt_loss"] > 0 and seen["prompt_rank1"] == 1 and seen["loss"] > 0 and seen["rank1"] == 1


def test_a_kill_in_the_first_image_epoch_resumes_exactly(tiny_config, tmp_path):
    """Killed after the prompt stage's FINAL and before the image stage's first LAST: the resumed
    run starts the image stage from the prompt stage's end, random state included."""
    from workbench.tracking import NullTracker

    cfg = config.replace(tiny_config, epochs_image=2)
    reference = train_joint(cfg, NullTracker())

    class KillAtFirstImageStep(NullTracker):
        def log_metrics(self, metrics, step):
            if "id_loss" in metrics:
                raise KeyboardInterrupt
            super().log_metrics(metrics, step)

    with pytest.raises(KeyboardInterrupt):
        train_joint(cfg, KillAtFirstImageStep())
    (run_dir,) = [d for d in Path(cfg.output_dir).iterdir() if str(d) != reference["run_dir"]]
    assert list(run_dir.glob("*prompt_FINAL.pth")) and not list(run_dir.glob("*LAST*"))
    assert f"continue it with: workbench resume {run_dir}" in next(run_dir.glob("*.log")).read_text()
    resumed = train_joint(cfg, NullTracker(), resume_dir=run_dir)
    for key in ("best_mAP", "final_mAP", "test_mAP", "final_test_mAP"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-9), key


def test_system_metrics_are_logged_beside_the_curves(tiny_config, tmp_path):
    uri = f"sqlite:///{tmp_path / 'system.db'}"
    cfg = config.replace(tiny_config, stage_mode="prompt_only", epochs_prompt=3, system_metrics=True,
                         system_metrics_interval=0.2)
    result = train_joint(cfg, MlflowTracker(uri))
    client = MlflowClient(uri)
    history = client.get_metric_history(result["run_id"], "system/cpu_utilization_percentage")
    assert history and all(0 <= m.value <= 100 * 64 for m in history)
    assert "system/system_memory_usage_megabytes" in client.get_run(result["run_id"]).data.metrics
    off = train_joint(config.replace(cfg, system_metrics=None), MlflowTracker(uri))  # null: on with CUDA only
    assert not any(k.startswith("system/") for k in client.get_run(off["run_id"]).data.metrics)


def test_val_every_validates_every_kth_epoch_and_the_last(tiny_config, tmp_path):
    tracker = RecordingTracker()
    reports = []
    cfg = config.replace(tiny_config, stage_mode="image_only", epochs_image=5, val_every=2)
    result = train_joint(cfg, tracker, report=lambda epoch, metrics: reports.append(epoch))
    steps = {key: [step for step, _ in tracker.history[key]] for key in ("rank1", "epoch_loss")}
    assert reports == [2, 4, 5] and steps["rank1"] == [2, 4, 5] and steps["epoch_loss"] == [1, 2, 3, 4, 5]
    assert result["best_epoch"] in (2, 4, 5)
    assert not list(Path(result["run_dir"]).glob("*LAST*"))
    with pytest.raises(config.ConfigError, match="val_every: must be >= 1"):
        config.replace(cfg, val_every=0)


def test_val_start_skips_the_early_validations(tiny_config, tmp_path):
    tracker = RecordingTracker()
    reports = []
    cfg = config.replace(tiny_config, stage_mode="image_only", epochs_image=6, val_every=2, val_start=3)
    result = train_joint(cfg, tracker, report=lambda epoch, metrics: reports.append(epoch))
    steps = {key: [step for step, _ in tracker.history[key]] for key in ("mAP", "epoch_loss")}
    assert reports == [4, 6] and steps["mAP"] == [4, 6] and steps["epoch_loss"] == [1, 2, 3, 4, 5, 6]
    assert result["best_epoch"] in (4, 6)
    log = next(Path(result["run_dir"]).glob("*.log")).read_text()
    assert "image epoch 1/6: loss" in log and "(first validation at epoch 4)" in log
    late = train_joint(config.replace(cfg, val_every=1, val_start=9), RecordingTracker())  # past the end: the last only
    assert late["best_epoch"] == 6
    with pytest.raises(config.ConfigError, match="val_start: must be >= 1"):
        config.replace(cfg, val_start=0)


def test_workers_starting_together_generate_the_dataset_once(tiny_config, tmp_path):
    """The workers of a study start together on a missing synthetic dataset: one generates it, the
    others wait for it and use it (they used to write into the same temporary folder)."""
    import threading

    from workbench.data import load_reid_dataset
    from workbench.runner import ensure_dataset

    cfg = config.replace(tiny_config, data_root=str(tmp_path / "made" / "hands"), synthesize_if_missing=True,
                         synth_identities=4, synth_test_identities=2, synth_images_per_identity=3)
    said, errors = [], []

    def worker():
        try:
            ensure_dataset(cfg, said.append)
        except Exception as err:  # reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(said) == 1
    assert load_reid_dataset(cfg.data_root).num_classes == 4


def test_a_reused_prompt_stage_gives_what_training_it_gives(tiny_config):
    """Runs that differ only in image-stage keys share one prompt stage (PromptStageCache): the
    run that reuses it logs and ends with exactly what training its own prompt stage gives."""
    import torch

    from workbench.checkpoint import read_checkpoint
    from workbench.runner import PromptStageCache

    cache = PromptStageCache()
    first = train_joint(tiny_config, RecordingTracker(), prompt_cache=cache)
    other = config.replace(tiny_config, lr=3e-3, center_loss_weight=1e-2, val_start=2)
    reused_tracker, fresh_tracker = RecordingTracker(), RecordingTracker()
    reused = train_joint(other, reused_tracker, prompt_cache=cache)
    fresh = train_joint(other, fresh_tracker)
    assert cache.misses == 1
    assert reused_tracker.tags["prompt_stage_from"] == first["run_id"]
    assert set(reused_tracker.history) == set(fresh_tracker.history)
    for key, points in fresh_tracker.history.items():
        if key not in ("prompt_stage_seconds", "image_stage_seconds", "total_seconds"):
            assert reused_tracker.history[key] == points, key
    for key in ("prompt_rank1", "prompt_mAP", "best_mAP", "best_epoch", "final_mAP", "test_mAP", "final_test_mAP"):
        assert reused[key] == fresh[key], key
    saved = {}
    for name, result in (("reused", reused), ("fresh", fresh)):
        (path,) = Path(result["run_dir"]).glob("*_prompt_FINAL.pth")
        saved[name] = read_checkpoint(path)
    assert saved["reused"]["metadata"]["config"]["lr"] == 3e-3
    metadata = saved["reused"]["metadata"]
    assert metadata["run_id"] == reused["run_id"] and metadata["stage"] == "prompt"
    for key, value in saved["fresh"]["model_state_dict"].items():
        assert torch.equal(saved["reused"]["model_state_dict"][key], value), key

    # what the prompt stage reads makes a new entry: n_ctx, and lr while lr_prompt falls back on it
    train_joint(config.replace(other, n_ctx=3), RecordingTracker(), prompt_cache=cache)
    assert cache.misses == 2
    assert PromptStageCache.key(config.replace(other, lr_prompt=None)) != \
        PromptStageCache.key(config.replace(other, lr_prompt=None, lr=1e-3))
    assert PromptStageCache.key(other) == PromptStageCache.key(config.replace(other, lr=1e-3, epochs_image=9))


def test_runs_side_by_side_in_threads_give_what_each_gives_alone(tiny_config, tmp_path):
    """Parallel tuning trials are runs in threads of one process. Seeding, building the model and
    the prompt stage draw from the process-wide generators under a lock; the image stage from a
    generator of its own. So neither run shifts or reseeds the other's random numbers, and each
    gives, to the bit, what it gives alone (with the same number of CPU threads)."""
    import threading

    import torch

    runs = {"a": config.replace(tiny_config, output_dir=str(tmp_path / "a"), epochs_image=4, save_checkpoints=False),
            "b": config.replace(tiny_config, output_dir=str(tmp_path / "b"), seed=7, lr=3e-4, save_checkpoints=False)}
    keys = ("best_mAP", "best_rank1", "best_epoch", "final_mAP", "test_mAP", "final_test_mAP", "final_test_mINP")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = {name: train_joint(cfg) for name, cfg in runs.items()}
        together: dict = {}
        threads = [threading.Thread(target=lambda n=name, c=cfg: together.__setitem__(n, train_joint(c, quiet=True)))
                   for name, cfg in runs.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        torch.set_num_threads(before)
    for name in runs:
        assert {k: together[name][k] for k in keys} == {k: alone[name][k] for k in keys}, name
