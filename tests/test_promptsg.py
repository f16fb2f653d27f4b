"""PromptSG: the modules, the pseudo-token prompt, what trains, validate_promptsg, a tracked run,
checkpoints, resume, eval and tuning, on the tiny CLIP and the synthetic hands (CPU)."""
import math
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from workbench import config
from workbench.cli import main
from workbench.errors import ConfigError
from workbench.evaluation import EvalSplit, as_percent, cosine_distance, reid_metrics
from workbench.losses import build_loss
from workbench.methods.promptsg import (STEP_KEYS, VALIDATION_KEYS, MultimodalInteraction, PromptSGSettings,
                                        attention_entropy, forward_promptsg, promptsg_loss, train_promptsg_stage,
                                        validate_promptsg)
from workbench.model import (encode_image_tokens, encode_images, encode_prompt_embeddings, load_clip_with_patch,
                             text_encoder_parameters)
from workbench.runner import build_model_and_loaders, load_data, seed_everything, train_joint
from workbench.stages import eval_splits, logit_scale_of
from workbench.tracking import MlflowTracker, RecordingTracker

CPU = torch.device("cpu")


@pytest.fixture
def psg_config(synth_root, tmp_path) -> config.Config:
    return config.load("experiments/promptsg_quickstart.yaml", [
        f"data_root={synth_root}", f"output_dir={tmp_path / 'runs'}", "synthesize_if_missing=false",
        "epochs_image=2", "batch_size=8", "num_instances=2", "log_every=2", "test_batch_size=32", "device=cpu",
        "val_identities=2"])


def build(cfg):
    seed_everything(cfg.seed)
    data = load_data(cfg)
    loaders, model, _, _ = build_model_and_loaders(cfg, data, CPU)
    return loaders, model


def test_slot_embedding_is_the_pseudo_token_and_the_text_path_is_clips(psg_config):
    _, model = build(psg_config)
    psg = model.promptsg
    pseudo = torch.randn(3, model.token_embedding.weight.shape[1])
    embedded = psg.compose(pseudo)
    slot = psg.prefix.shape[1]
    assert torch.equal(embedded[:, slot], pseudo)
    tokens = open_clip.get_tokenizer("wb-tiny")([psg.composed_text])
    assert psg.composed_text == "A photo of a X dorsal right hand."
    reference = model.token_embedding(tokens)[0]
    eot = int(tokens.argmax(-1))
    assert embedded.shape[1] == eot + 1
    assert torch.equal(embedded[0, :slot], reference[:slot]) and torch.equal(embedded[0, slot + 1:],
                                                                              reference[slot + 1:eot + 1])
    with torch.no_grad():  # the word "X" itself in the slot: exactly CLIP's encode_text of the composed prompt
        ours = encode_prompt_embeddings(model, psg.compose(reference[slot][None]), normalize=False)
        assert torch.allclose(ours, model.encode_text(tokens), atol=1e-5)
        simplified = encode_prompt_embeddings(model, psg.simplified, normalize=False)
        plain = open_clip.get_tokenizer("wb-tiny")([psg.simplified_text])
        assert psg.simplified_text == "A photo of a dorsal right hand."
        assert torch.allclose(simplified, model.encode_text(plain), atol=1e-5)


@pytest.mark.parametrize("name", ["wb-tiny", "wb-tiny-rn"])
def test_image_tokens_global_feature_is_clips_image_feature(name):
    torch.manual_seed(0)
    size = (64, 32) if name == "wb-tiny" else (128, 64)
    model = load_clip_with_patch(name, pretrained=None, image_size=size).eval()
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        global_feat, tokens = encode_image_tokens(model, images)
        assert torch.allclose(global_feat, encode_images(model, images), atol=1e-5)
    grid = (64 // 8) * (32 // 8) if name == "wb-tiny" else (128 // 32) * (64 // 32)
    assert tokens.shape == (2, grid, global_feat.shape[1])
    # local tokens that differ from the global feature and from each other: something to attend to
    assert float(F.cosine_similarity(tokens, global_feat[:, None], dim=-1).mean()) < 0.95
    assert float(F.cosine_similarity(tokens[:, :1], tokens[:, 1:], dim=-1).mean()) < 0.95


@pytest.mark.parametrize("fusion", ["query", "reweight"])
def test_module_output_follows_the_pseudo_token_and_the_prompt(psg_config, fusion):
    _, model = build(config.replace(psg_config, mim_fusion=fusion))
    model.eval()
    psg = model.promptsg
    images = torch.randn(4, 3, 64, 32)
    with torch.no_grad():
        global_feat, tokens = encode_image_tokens(model, images)
        pseudo = psg.inversion(global_feat)
        text = encode_prompt_embeddings(model, psg.compose(pseudo), normalize=False)
        moved = encode_prompt_embeddings(model, psg.compose(pseudo + torch.randn_like(pseudo)), normalize=False)
        out, attn = psg.mim(text, global_feat, tokens)
        out_moved, _ = psg.mim(moved, global_feat, tokens)
        composed = forward_promptsg(model, images, "composed")["feature"]
        simplified = forward_promptsg(model, images, "simplified")["feature"]
    assert torch.allclose(out, composed, atol=1e-5)
    assert (out - out_moved).abs().max() > 1e-3  # s* changes the feature
    assert (composed - simplified).abs().max() > 1e-3  # so does the prompt
    assert attn.shape == (4, psg_config.mim_heads, 1 + tokens.shape[1])
    assert torch.allclose(attn.sum(-1), torch.ones(4, psg_config.mim_heads))


def test_attention_over_one_key_ignores_the_text_and_entropy_says_so():
    """The original's failure: attention over one image vector is always 1, whatever the query."""
    torch.manual_seed(0)
    module = MultimodalInteraction(16, heads=2, blocks=1).eval()
    image = torch.randn(3, 16)
    no_tokens = torch.zeros(3, 0, 16)
    with torch.no_grad():
        a, _ = module(torch.randn(3, 16), image, no_tokens)
        b, _ = module(torch.randn(3, 16), image, no_tokens)
        uniform = torch.full((2, 4, 9), 1 / 9)
        peaked = F.one_hot(torch.zeros(2, 4, dtype=torch.long), 9).float()
    assert float(attention_entropy(uniform)) == pytest.approx(1.0)
    assert float(attention_entropy(peaked)) == pytest.approx(0.0, abs=1e-6)
    # with one key the 'query' reading still carries the text in its residual; reweight removes it entirely
    module.fusion = "reweight"
    with torch.no_grad():
        assert torch.allclose(module(torch.randn(3, 16), image, no_tokens)[0],
                              module(torch.randn(3, 16), image, no_tokens)[0])
    assert not torch.allclose(a, b)


def test_inversion_network_learns_from_supcon_and_from_id_triplet(psg_config):
    loaders, model = build(psg_config)
    model.train()
    images, labels, _, _ = next(iter(loaders.train))
    settings = PromptSGSettings.from_config(psg_config)
    scale = logit_scale_of(model, None)
    inversion = list(model.promptsg.inversion.parameters())
    for p in model.parameters():
        p.requires_grad_(True)
    for losses in (("i2t",), ("t2i",), ("id",), ("triplet",)):
        model.zero_grad(set_to_none=True)
        loss, parts, _ = promptsg_loss(model, images, labels, settings, build_loss(losses), scale)
        loss.backward()
        grads = [p.grad for p in inversion[:-2] if p.grad is not None]  # the MLP, not the BatchNorm
        assert grads and sum(float(g.norm()) for g in grads) > 0, losses
    assert float(parts["i2t_loss"].detach()) == 0 and float(parts["tri_loss"].detach()) > 0


def test_a_step_trains_image_encoder_and_modules_never_the_text_encoder(psg_config):
    loaders, model = build(config.replace(psg_config, epochs_image=1))
    text_before = [p.detach().clone() for p in text_encoder_parameters(model)]
    visual_before = [p.detach().clone() for p in model.visual.parameters()]
    inversion_before = [p.detach().clone() for p in model.promptsg.inversion.parameters()]
    mim_before = [p.detach().clone() for p in model.promptsg.mim.parameters()]
    tracker = RecordingTracker()
    result = train_promptsg_stage(model, loaders, PromptSGSettings.from_config(config.replace(psg_config,
                                                                                              epochs_image=1)),
                                  CPU, tracker, log=lambda line: None)
    assert all(torch.equal(a, b) for a, b in zip(text_before, text_encoder_parameters(model)))
    for before, module in ((visual_before, model.visual), (inversion_before, model.promptsg.inversion),
                           (mim_before, model.promptsg.mim)):
        assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))
    assert result["steps"] > 0 and result["selection"] == "val"


def test_validate_promptsg_equals_reid_metrics_on_its_features(psg_config):
    loaders, model = build(psg_config)
    selection, _ = eval_splits(loaders)
    settings = PromptSGSettings.from_config(psg_config)
    features: dict = {}
    result = validate_promptsg(model, selection, CPU, settings, loaders.data.class_to_idx, features)
    for name in ("composed", "simplified", "global"):
        query, gallery = features[name]
        expected = as_percent(reid_metrics(cosine_distance(query, gallery), np.asarray(selection.q_pids),
                                           np.asarray(selection.g_pids), selection.q_camids, selection.g_camids))
        assert result[f"{name}_mAP"] == pytest.approx(expected["mAP"]), name
        assert result[f"{name}_rank1"] == pytest.approx(expected["rank1"]), name
        if name == settings.eval_prompt:
            for key in ("rank1", "rank5", "rank10", "mAP", "mINP"):
                assert result[key] == pytest.approx(expected[key]), key
    composed, simplified = (torch.cat(features[p]) for p in ("composed", "simplified"))
    assert result["prompt_sensitivity"] == pytest.approx(float(F.cosine_similarity(composed, simplified).mean()))
    assert result["prompt_sensitivity"] < 1
    assert "val_loss" not in result  # held-out identities are not in the classifier


def test_classification_loss_only_on_training_identities(psg_config):
    loaders, model = build(psg_config)
    data = loaders.data
    pids = [r.pid for r in data.train]
    settings = PromptSGSettings.from_config(psg_config)
    seen = EvalSplit("val", loaders.train_eval, loaders.train_eval, pids, pids)
    result = validate_promptsg(model, seen, CPU, settings, data.class_to_idx)
    assert math.isfinite(result["val_loss"]) and 0 <= result["val_top1"] <= result["val_top5"] <= 100
    _, test = eval_splits(loaders)
    assert "val_loss" not in validate_promptsg(model, test, CPU, settings, data.class_to_idx)
    renamed = EvalSplit("test", loaders.train_eval, loaders.train_eval, pids, pids)  # never on the test split
    assert "val_loss" not in validate_promptsg(model, renamed, CPU, settings, data.class_to_idx)


def test_promptsg_run_logs_every_diagnostic_and_eval_reproduces_it(psg_config, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train_joint(psg_config, MlflowTracker(uri))
    client = MlflowClient(uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["stage_mode"] == "promptsg"
    assert run.info.run_name.endswith("_promptsg_image")
    for key in ["loss", "id_loss", "tri_loss", "i2t_loss", "t2i_loss", "feat_norm", "arc_conf", "lr", "lr_module",
                *STEP_KEYS]:
        history = client.get_metric_history(run.info.run_id, key)
        assert len({m.step for m in history}) > 1 and all(math.isfinite(m.value) for m in history), key
    for key in ["rank1", "rank5", "rank10", "mAP", "mINP", *VALIDATION_KEYS[:7]]:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    for key in ("test_mAP", "test_composed_mAP", "test_simplified_mAP", "test_global_mAP",
                "test_prompt_sensitivity", "final_test_prompt_sensitivity"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0], key
    entropy = [m.value for m in client.get_metric_history(run.info.run_id, "attn_entropy")]
    assert all(0 < e < 1 for e in entropy)
    assert any(n.startswith("plots/") and n.endswith("_promptsg.png") for n in
               (a.path for a in client.list_artifacts(run.info.run_id, "plots")))
    # the BEST checkpoint holds every module: eval of the run folder gives the run's test numbers
    capsys.readouterr()
    assert main(["eval", "--checkpoint", result["run_dir"], "--tracking-uri", uri]) == 0
    printed = capsys.readouterr().out
    assert f"rank1 {result['test_rank1']:.2f}" in printed and f"mAP {result['test_mAP']:.2f}" in printed


def test_interrupted_promptsg_run_resumes_to_the_same_numbers(interrupted_run, psg_config, tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'resume.db'}"
    cfg = config.replace(psg_config, epochs_image=3)
    reference = train_joint(cfg, MlflowTracker(uri))
    run_dir = interrupted_run(cfg, MlflowTracker(uri), at_epoch=2)
    assert main(["resume", str(run_dir), "--tracking-uri", uri]) == 0
    client = MlflowClient(uri)
    (resumed,) = [r for r in client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
                  if r.info.run_id != reference["run_id"]]
    for key in ("best_mAP", "best_rank1", "test_mAP", "test_prompt_sensitivity", "final_test_mAP"):
        assert resumed.data.metrics[key] == pytest.approx(reference[key], abs=1e-9), key
    entropy = [m.value for m in client.get_metric_history(resumed.info.run_id, "attn_entropy")]
    reference_entropy = [m.value for m in client.get_metric_history(reference["run_id"], "attn_entropy")]
    assert entropy == pytest.approx(reference_entropy, abs=1e-9)


def test_promptsg_config_mistakes_are_one_line(psg_config, tmp_path, capsys):
    for override, expected in (("test_feature=proj_and_pre_proj", "test_feature: stage_mode promptsg needs"),
                               ("train_text_encoder=true", "train_text_encoder: stage_mode promptsg needs"),
                               ("mim_fusion=concat", "mim_fusion: unknown value"),
                               ("promptsg_template=a hand", "promptsg_template:"),
                               ("promptsg_supcon_weight=-1", "promptsg_supcon_weight: must be >= 0")):
        with pytest.raises(ConfigError, match=expected):
            config.replace(psg_config, **dict([override.split("=")]) | (
                {"train_text_encoder": True} if override.startswith("train_text") else {}))
    with pytest.raises(ConfigError, match="mim_heads: 3 heads do not divide CLIP's embedding width 128"):
        build(config.replace(psg_config, mim_heads=3))
    path = tmp_path / "psg.yaml"
    path.write_text(psg_config.to_yaml())
    uri = f"sqlite:///{tmp_path / 'mistakes.db'}"
    for override, expected in (("mim_heads=3", "mim_heads: 3 heads do not divide"),
                               (f"promptsg_template='{'{aspect} hand ' * 30}'", "promptsg_template: the prompt needs"),
                               ("promptsg_template='{aspect}}'", "promptsg_template: '{aspect}}' is not a valid template")):
        assert main(["run", str(path), "--set", override, "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and expected in err, err
    assert not Path(psg_config.output_dir).exists() and not (tmp_path / "mistakes.db").exists()
    assert main(["eval", str(path), "--prompts"]) == 2
    assert "--prompts: PromptSG has no class prompts" in capsys.readouterr().err


def test_tune_searches_promptsg_keys(psg_config, tmp_path, capsys):
    path = tmp_path / "psg.yaml"
    path.write_text(config.replace(psg_config, epochs_image=1, save_checkpoints=False).to_yaml())
    uri = f"sqlite:///{tmp_path / 'tune.db'}"
    assert main(["tune", str(path), "--trials", "2", "--tracking-uri", uri, "--sampler", "random",
                 "--storage", str(tmp_path / "study.log")]) == 0
    out = capsys.readouterr().out  # the config's tune.n_jobs: 2, so each trial had half the CPU threads
    assert ("re-run it alone: env OMP_NUM_THREADS=" in out) == (max(1, torch.get_num_threads() // 2)
                                                               != torch.get_num_threads())
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    trials = [r for r in runs if r.data.tags.get("workbench.role") == "trial"]
    assert len(trials) == 2 and all(r.info.status == "FINISHED" for r in trials)
    assert all({"promptsg_module_lr", "promptsg_supcon_weight", "mim_blocks"} <= set(r.data.params) for r in trials)
    assert len({r.data.params["mim_blocks"] + r.data.params["promptsg_module_lr"] for r in trials}) == 2
