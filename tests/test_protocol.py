"""The hand protocol end to end on a look-alike download: prepare, train on split 0, evaluate every
split with `workbench eval --splits all`, and find the numbers and pictures in MLflow."""
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from workbench import config
from workbench.cli import main
from workbench.evaluation import validate
from workbench.prepare import prepare_11k, synthesize_11k_download
from workbench.runner import build_model_and_loaders, load_data, seed_everything, train_joint
from workbench.stages import ImageStageSettings, eval_splits
from workbench.tracking import MlflowTracker

SPLITS = 3
KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("protocol")
    download = synthesize_11k_download(base / "11k", identities=14, images_per_aspect=4, size=(64, 48))
    prepare_11k(download, base / "prepared", aspects="dorsal_r", splits=SPLITS, seed=3, log=lambda _: None)
    cfg = config.load("experiments/quickstart.yaml", [
        f"data_root={base / 'prepared' / 'dorsal_r'}", f"output_dir={base / 'runs'}", "synthesize_if_missing=false",
        "epochs_prompt=1", "epochs_image=2", "batch_size=8", "num_instances=2", "test_batch_size=32", "device=cpu",
        "image_size=[64, 32]", "val_identities=0", "dataset=11k", "log_every=2"])
    uri = f"sqlite:///{base / 'mlflow.db'}"
    result = train_joint(cfg, MlflowTracker(uri))
    cfg_path = base / "exp.yaml"
    cfg_path.write_text(cfg.to_yaml())
    return cfg, cfg_path, uri, result


def direct_numbers(cfg, checkpoint: Path, split: int) -> dict:
    """One split evaluated the plain way: its own loaders, validate()."""
    from workbench.checkpoint import load_checkpoint

    cfg = config.replace(cfg, split=split)
    seed_everything(cfg.seed)
    loaders, model, _, _ = build_model_and_loaders(cfg, load_data(cfg), torch.device("cpu"))
    load_checkpoint(checkpoint, model=model, restore_rng=False)
    _, test = eval_splits(loaders)
    return validate(model, test, torch.device("cpu"), ImageStageSettings.from_config(cfg).feature_spec,
                    max_rank=cfg.max_rank)


def test_a_run_on_a_prepared_tree_validates_on_its_val_folder_and_tests_on_split_0(trained):
    cfg, _, uri, result = trained
    run = MlflowClient(uri).get_run(result["run_id"])
    assert run.data.tags["selection"] == "val" and run.data.params["split"] == "0"
    assert run.data.metrics["num_val_query"] > 0
    contexts = sorted(i.tags[0].value for i in run.inputs.dataset_inputs)
    assert contexts == ["test split 0", "train", "validation"]


def test_eval_over_all_splits_matches_a_direct_computation_and_lands_in_the_run(trained, capsys):
    cfg, cfg_path, uri, result = trained
    run_dir = Path(result["run_dir"])
    assert main(["eval", "--checkpoint", str(run_dir), "--splits", "all", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert f"over {SPLITS} split(s)" in out and "(the checkpoint's run)" in out
    best = next(run_dir.glob("*_image_BEST.pth"))
    direct = {split: direct_numbers(cfg, best, split) for split in range(SPLITS)}
    client = MlflowClient(uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"  # eval adds to the run, it does not reopen it
    for key in KEYS:
        values = np.array([direct[split][key] for split in range(SPLITS)])
        assert run.data.metrics[f"splits_mean_{key}"] == pytest.approx(values.mean(), abs=1e-4), key
        assert run.data.metrics[f"splits_std_{key}"] == pytest.approx(values.std(ddof=1), abs=1e-4), key
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"splits_{key}"))
        assert [s for s, _ in history] == list(range(SPLITS))
        assert [v for _, v in history] == pytest.approx([direct[s][key] for s in range(SPLITS)], abs=1e-4), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    stem = run.info.run_name + "_eval"
    assert {f"eval/{stem}_splits.csv", f"eval/{stem}_cmc.png", f"eval/{stem}_ranked_split0.png"} <= artifacts
    for name in ("cmc.png", "ranked_split0.png"):
        assert (run_dir / f"{stem}_{name}").stat().st_size > 10_000  # a real picture, next to the run
    table = (run_dir / f"{stem}_splits.csv").read_text().splitlines()
    assert table[0] == "split,rank1,rank5,rank10,mAP,mINP,num_valid_q" and len(table) == 1 + SPLITS


def test_eval_tables_flip_prompts_and_mistakes(trained, capsys):
    cfg, cfg_path, uri, result = trained
    run_dir = Path(result["run_dir"])
    assert main(["eval", "--checkpoint", str(run_dir), "--splits", "0,2", "--table", "latex", "--flip",
                 "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert r"\begin{tabular}{lrrrrrr}" in out and "over 2 split(s)" in out
    run = MlflowClient(uri).get_run(result["run_id"])
    assert "splits_flip_mean_mAP" in run.data.metrics
    assert main(["eval", "--checkpoint", str(run_dir), "--prompts"]) == 0
    assert "image-to-prompt retrieval over the" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(next(run_dir.glob("*_prompt_FINAL.pth"))), "--prompts"]) == 0
    assert main(["eval", "--checkpoint", str(next(run_dir.glob("*_prompt_FINAL.pth")))]) == 2
    assert "is the prompt stage's checkpoint" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run_dir), "--splits", "7"]) == 2
    assert "no split 7 in this dataset (it has 0, 1, 2)" in capsys.readouterr().err
    assert main(["eval", str(cfg_path), "--splits", "all", "--table", "md", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "| split | rank1 |" in out and "(a new eval run)" in out


def test_compare_prints_paper_tables(trained, capsys):
    cfg, _, uri, _ = trained
    assert main(["compare", "--experiment", cfg.experiment, "--tracking-uri", uri, "--table", "md"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("| run_name | status |") and "|---|" in out
    assert main(["compare", "--experiment", cfg.experiment, "--tracking-uri", uri, "--table", "latex"]) == 0
    assert r"\toprule" in capsys.readouterr().out
