"""Multi-process (DDP) runs: torchrun's processes on the CPU with gloo, as on GPUs with NCCL.

The end-to-end test launches ``workbench run --nproc 2`` (torch's elastic launcher, as
torchrun does) and checks what the issue asks: it finishes, logs one MLflow run, and its
checkpoint gives the same numbers in a single-process ``workbench eval``. A 2-process step is
the single-process step (the ranks' shares are gathered into the global batch before the
losses, and each image's augmentation is seeded by its place in the global batch), so the
logged losses equal a 1-process run's.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from workbench import config, distributed
from workbench.cli import main
from workbench.data import IdentitySampler
from workbench.errors import DataError
from workbench.runner import check_ranks, train_joint
from workbench.tracking import MlflowTracker

ROOT = Path(__file__).resolve().parents[1]
# every random transform on: each image is augmented alike for every process count
AUGMENTATION = {"flip_prob": 0.5, "pad": 2, "random_erasing": 0.5}


def test_shards_cover_every_item_once_in_order():
    for total in (0, 1, 5, 6, 7, 33):
        for ranks in (1, 2, 3, 4):
            bounds = [distributed.shard_bounds(total, ranks, r) for r in range(ranks)]
            assert bounds[0][0] == 0 and bounds[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [end - start for start, end in bounds]
            assert max(sizes) - min(sizes) <= 1
            sampler = distributed.ShardSampler(total, ranks, ranks - 1)
            assert list(sampler) == list(range(*bounds[-1])) and sampler.sizes() == sizes


def test_identity_sampler_ranks_share_each_global_batch():
    labels = np.repeat(np.arange(12), 5)
    whole = IdentitySampler(labels, batch_size=16, num_instances=4, seed=3)
    ranks = [IdentitySampler(labels, batch_size=16, num_instances=4, seed=3, ranks=2, which=r) for r in (0, 1)]
    for epoch in (0, 1):
        for sampler in (whole, *ranks):
            sampler.set_epoch(epoch)
        batches = list(whole)
        assert [len(r) for r in ranks] == [len(whole)] * 2  # every rank takes as many steps
        for batch, first, second in zip(batches, *ranks):
            assert first + second == batch  # rank order rebuilds the global batch
            ids = [set(labels[first]), set(labels[second])]
            assert len(ids[0]) == len(ids[1]) == 2 and not ids[0] & ids[1]  # different identities, K images each
    with pytest.raises(DataError, match="cannot share equally"):
        IdentitySampler(labels, batch_size=12, num_instances=4, seed=0, ranks=2)


def test_ranks_augment_each_image_as_a_single_process_does():
    """The augmentation seed of an image is its place in the global batch: two ranks' shares
    carry the seeds of the single-process batch, so DDP draws the same augmentation."""
    from workbench.data import SeededBatches

    labels = np.repeat(np.arange(12), 5)
    whole = SeededBatches(IdentitySampler(labels, batch_size=16, num_instances=4, seed=3), seed=3)
    ranks = [SeededBatches(IdentitySampler(labels, batch_size=16, num_instances=4, seed=3, ranks=2, which=r), seed=3)
             for r in (0, 1)]
    seeds = []
    for epoch in (0, 1):
        for batches in (whole, *ranks):
            batches.sampler.set_epoch(epoch)
        pairs = list(whole)
        seeds.append({seed for batch in pairs for _, seed in batch})
        assert len(seeds[-1]) == sum(map(len, pairs))  # one seed per image
        assert all(0 <= seed < 2**32 for seed in seeds[-1])  # what a CPU generator keeps of its seed
        for batch, first, second in zip(pairs, *ranks, strict=True):
            assert first + second == batch
    assert not seeds[0] & seeds[1]  # another epoch, other seeds


def test_configs_that_ranks_cannot_run_are_one_line_before_launching(tiny_config, capsys, monkeypatch):
    check_ranks(tiny_config, 2, 2)  # 4 identities per batch: 2 each
    with pytest.raises(config.ConfigError, match="multiple of 3"):
        check_ranks(tiny_config, 3, 3)
    for bad, expected in ((["--set", "batch_size=6"], "batch_size: 6 holds 3 identities"),
                          (["--set", "image_size=[64]"], "image_size")):
        args = ["run", "experiments/quickstart.yaml", "--nproc", "2", "--set", f"data_root={tiny_config.data_root}",
                "--set", "num_instances=2", "--set", "synthesize_if_missing=false", *bad]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
    monkeypatch.setenv("WORLD_SIZE", "2")  # tune started by torchrun
    assert main(["tune", "experiments/quickstart.yaml", "--trials", "1"]) == 2
    assert "runs trials, not DDP ranks" in capsys.readouterr().err
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # a machine with one GPU
    monkeypatch.setattr("torch.cuda.device_count", lambda: 1)
    with pytest.raises(config.ConfigError, match="2 processes on this machine need a GPU each; 1 are visible"):
        check_ranks(config.replace(tiny_config, device="cuda"), 2, 2)
    check_ranks(config.replace(tiny_config, device="cuda"), 2, 1)  # two machines, one process each


def _workbench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "workbench", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))]


def _test_line(stdout: str, which: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(f"test  {which}"))


def _two_processes_against_one(cfg: config.Config, experiment_file: str, tmp_path: Path, keys: tuple[str, ...],
                               new_store, rtol: float = 1e-4):
    """Run ``cfg`` in this process and with ``workbench run --nproc 2``; check
    that the second logs one MLflow run whose ``keys`` histories and test numbers equal the
    first's (to ``rtol``: float sums in another order, then a few optimizer steps). Returns (the
    2-process command's output, its run folder)."""
    overrides = [f"{k}={v}" for k, v in {**{k: getattr(cfg, k) for k in (
        "data_root", "output_dir", "synthesize_if_missing", "epochs_prompt", "epochs_image", "batch_size",
        "num_instances", "log_every", "test_batch_size", "device", "val_identities", "flip_prob", "pad",
        "random_erasing")},
        "image_size": json.dumps(list(cfg.image_size)).replace(" ", "")}.items()]
    single_uri = f"sqlite:///{tmp_path / 'single.db'}"
    single = train_joint(cfg, MlflowTracker(single_uri))  # the reference: one process, this one

    uri = new_store(tmp_path / "ddp.db")  # two processes, launched as torchrun does
    done = _workbench("run", experiment_file, *[a for kv in overrides for a in ("--set", kv)], "--nproc", "2",
                      "--tracking-uri", uri)
    assert "DDP: 2 processes (gloo), 4 images per process of each 8-image batch" in done.stderr
    assert done.stderr.count(f"epoch {cfg.epochs_image}/{cfg.epochs_image}: loss") == 1  # rank 0 alone prints
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.experiment).experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # rank 0 alone logs
    run = runs[0]
    single_client = MlflowClient(single_uri)
    for key in keys:
        np.testing.assert_allclose(_history(client, run.info.run_id, key),
                                   _history(single_client, single["run_id"], key), rtol=rtol, atol=1e-5, err_msg=key)
    for key in ("test_rank1", "test_mAP", "final_test_mAP", "best_mAP"):
        assert run.data.metrics[key] == pytest.approx(single[key], abs=1e-3), key
    run_dir = Path(done.stdout.split("files in ")[1].split()[0])
    assert len(list(run_dir.glob("*.log"))) == 1 and not list(run_dir.glob("*rank*"))  # one set of files
    return done, run_dir


@pytest.mark.scale
def test_two_process_run_equals_one_process_and_its_checkpoint_evaluates_alone(tiny_config, tmp_path, capsys,
                                                                               new_store):
    cfg = config.replace(tiny_config, epochs_prompt=1, epochs_image=2, **AUGMENTATION)
    done, run_dir = _two_processes_against_one(cfg, "experiments/quickstart.yaml", tmp_path,
                                               ("prompt_loss", "prompt_grad", "loss", "tri_loss", "center_loss",
                                                "i2t_loss", "feat_norm", "mAP"), new_store)

    # the DDP checkpoint in a plain single-process evaluation: the run's FINAL test numbers
    final = next(run_dir.glob("*_image_FINAL.pth"))
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(final), "--tracking-uri", f"sqlite:///{tmp_path / 'eval.db'}"]) == 0
    evaluated = capsys.readouterr().out
    numbers = [float(x) for x in re.findall(r"(?:rank1|rank5|rank10|mAP|mINP) ([\d.]+)", evaluated.splitlines()[-1])]
    expected = [float(x) for x in re.findall(r"(?:rank1|rank5|rank10|mAP|mINP) ([\d.]+)", _test_line(done.stdout,
                                                                                                   "FINAL"))]
    assert numbers == expected


@pytest.mark.scale
def test_promptsg_interrupted_in_one_process_goes_on_in_two_to_the_same_numbers(synth_root, tmp_path,
                                                                                interrupted_run):
    """Resume under DDP, and PromptSG under DDP (its inversion network's BatchNorm normalises over
    the gathered batch): a PromptSG run stopped after its first epoch and resumed on two
    processes logs what an uninterrupted 1-process run logs."""
    cfg = config.load("experiments/promptsg_quickstart.yaml", [
        f"data_root={synth_root}", f"output_dir={tmp_path / 'runs'}", "synthesize_if_missing=false",
        "epochs_image=2", "batch_size=8", "num_instances=2", "log_every=1", "test_batch_size=32", "device=cpu",
        "val_identities=2", *(f"{k}={v}" for k, v in AUGMENTATION.items())])
    single_uri = f"sqlite:///{tmp_path / 'single.db'}"
    single = train_joint(cfg, MlflowTracker(single_uri))
    uri = f"sqlite:///{tmp_path / 'resume.db'}"
    stopped = interrupted_run(cfg, MlflowTracker(uri), at_epoch=1)
    resumed = _workbench("resume", str(stopped), "--nproc", "2", "--tracking-uri", uri)
    assert "DDP: 2 processes" in resumed.stderr and "resuming PromptSG after epoch 1" in resumed.stderr
    run_id = json.loads(next(stopped.glob("*_run.json")).read_text())["run_id"]
    client, single_client = MlflowClient(uri), MlflowClient(single_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and [m.step for m in client.get_metric_history(run_id, "mAP")] == [1, 2]
    for key in ("loss", "id_loss", "tri_loss", "i2t_loss", "t2i_loss", "pos_cos", "grad_visual", "grad_mim",
                "composed_mAP", "prompt_sensitivity"):
        np.testing.assert_allclose(_history(client, run_id, key), _history(single_client, single["run_id"], key),
                                   rtol=1e-3, atol=1e-5, err_msg=key)
    for key in ("test_rank1", "test_mAP", "final_test_mAP", "best_mAP"):
        assert run.data.metrics[key] == pytest.approx(single[key], abs=1e-3), key


def test_a_collective_broken_by_another_rank_is_one_line(monkeypatch):
    from workbench.errors import RankLost

    broken = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error "
                          "[127.0.0.1]:10672: Connection reset by peer. This is typically caused by a remote worker")
    assert distributed.lost_peer(broken) is None  # one process: a bug, keep its traceback
    monkeypatch.setenv("WORLD_SIZE", "2")
    lost = distributed.lost_peer(broken)
    assert isinstance(lost, RankLost) and lost.exit_code == 1
    assert str(lost).startswith("another process of this 2-process run stopped")
    assert distributed.lost_peer(RuntimeError("shape mismatch")) is None
    assert distributed.lost_peer(ValueError("gloo")) is None
