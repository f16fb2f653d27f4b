import math

import pytest
import torch

from workbench.data import build_loaders, load_reid_dataset, synthesize_dataset
from workbench.heads import register_bnneck_and_arcface
from workbench.model import PromptLearner, load_clip_with_patch
from workbench.stages import (ImageStageSettings, NonFiniteLossError, PromptStageSettings, StepMetrics,
                              cosine_factor, train_clipreid_image_stage, train_clipreid_prompt_stage)
from workbench.tracking import RecordingTracker

PER_STEP_IMAGE = {"loss", "id_loss", "tri_loss", "center_loss", "i2t_loss", "t2i_loss", "feat_norm", "arc_conf", "lr"}
PER_STEP_PROMPT = {"prompt_loss", "i2t_loss", "t2i_loss", "prompt_norm", "prompt_var", "prompt_grad", "logits_std", "lr"}


@pytest.fixture(scope="module")
def two_ids(tmp_path_factory):
    """2 identities x 2 images: exactly one PK batch of 2 x 2."""
    return synthesize_dataset(tmp_path_factory.mktemp("d") / "two", identities=2, images_per_identity=2, seed=5,
                              size=(64, 32))


def run_both_stages(name, image_size, root, tmp_path):
    data = load_reid_dataset(root)
    loaders = build_loaders(data, image_size=image_size, batch_size=4, num_instances=2, test_batch_size=8,
                            num_workers=0, seed=0)
    device = torch.device("cpu")
    model = load_clip_with_patch(name, device, pretrained=None, image_size=image_size)
    prompt = PromptLearner(data.classnames, model, 4, "{aspect} hand of a person", "dorsal", name)
    register_bnneck_and_arcface(model, data.num_classes, image_size)
    tracker = RecordingTracker()
    before = [p.detach().clone() for p in model.visual.parameters()]
    ctx_before = prompt.ctx.detach().clone()
    p = train_clipreid_prompt_stage(model, prompt, loaders.train_eval,
                                    PromptStageSettings(epochs=1, lr=1e-3, batch_size=4, log_every=1),
                                    device, tracker, log=lambda _: None, checkpoint_path=tmp_path / "p_FINAL.pth")
    assert not torch.equal(prompt.ctx, ctx_before)
    assert all(torch.equal(a, b) for a, b in zip(before, model.visual.parameters()))  # CLIP frozen in stage 1
    ctx_after_prompt_stage = prompt.ctx.detach().clone()
    reports = []
    i = train_clipreid_image_stage(model, prompt, loaders, ImageStageSettings(epochs=1, lr=1e-4, log_every=1),
                                   device, tracker, log=lambda _: None, report=lambda e, m: reports.append((e, m)),
                                   checkpoint_path=lambda tag: tmp_path / f"i_{tag}.pth", start_step=p["steps"])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.visual.parameters()))
    assert torch.equal(prompt.ctx, ctx_after_prompt_stage)  # freeze_prompt: the image stage leaves it
    return tracker, p, i, reports


@pytest.mark.parametrize("name, size", [("wb-tiny", (64, 32)), ("ViT-B/16", (256, 128)), ("RN50", (256, 128))])
def test_one_step_of_each_stage(name, size, two_ids, tmp_path):
    tracker, p, i, reports = run_both_stages(name, size, two_ids, tmp_path)
    assert p["steps"] == 1 and i["steps"] == 1
    steps = {key: [s for s, _ in values] for key, values in tracker.history.items()}
    assert PER_STEP_PROMPT | PER_STEP_IMAGE <= set(steps)
    assert steps["prompt_loss"] == [0] and steps["loss"] == [1]  # global steps continue across stages
    assert {"rank1", "rank5", "rank10", "mAP", "prompt_rank1"} <= set(steps)
    assert all(math.isfinite(v) for _, v in tracker.history["loss"] + tracker.history["prompt_loss"])
    assert [e for e, _ in reports] == [1] and 0 <= reports[0][1]["rank1"] <= 100
    assert {f.name for f in tmp_path.iterdir()} == {"p_FINAL.pth", "i_BEST.pth", "i_BEST_prompt.pth",
                                                   "i_FINAL.pth", "i_FINAL_prompt.pth", "i_LAST.pth"}


def test_non_finite_loss_is_an_error():
    buffer = StepMetrics(RecordingTracker(), "image")
    buffer.add(3, {"loss": torch.tensor(float("nan")), "lr": 0.1})
    with pytest.raises(NonFiniteLossError, match="step 3"):
        buffer.flush()


def test_cosine_schedule_shape():
    assert cosine_factor(0, 10, 0, 1e-3, 1e-6) == pytest.approx(1.0)
    assert cosine_factor(10, 10, 0, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert cosine_factor(0, 10, 2, 1e-3, 1e-6) == pytest.approx(1 / 3)
    values = [cosine_factor(e, 10, 0, 1e-3, 1e-6) for e in range(10)]
    assert values == sorted(values, reverse=True)


def test_image_stage_trains_what_the_settings_say():
    from workbench.stages import _image_stage_trainables

    model = load_clip_with_patch("wb-tiny", "cpu", pretrained=None, image_size=(64, 32))
    prompt = PromptLearner(["a", "b"], model, 2, "{aspect} hand", "left", "wb-tiny")
    register_bnneck_and_arcface(model, 2, (64, 32))

    def trained(**kw):
        params = {id(p) for p in _image_stage_trainables(model, prompt, ImageStageSettings(1, 1e-4, **kw), print)}
        names = {n.split(".")[0] for n, p in model.named_parameters() if id(p) in params}
        return names | ({"ctx"} if id(prompt.ctx) in params else set()), params

    names, params = trained()
    assert names == {"visual", "bottleneck", "arcface"}
    assert id(model.bottleneck.bias) not in params and id(model.bottleneck.weight) in params
    names, _ = trained(train_text_encoder=True, freeze_prompt=False)
    assert {"transformer", "token_embedding", "ln_final", "ctx"} <= names
    assert "logit_scale" not in names


def official_warmup_multistep(epoch, milestones, gamma, warmup_factor, warmup_iters):
    """The official CLIP-ReID WarmupMultiStepLR factor at its last_epoch ``epoch`` (linear warm-up)."""
    import bisect

    factor = 1.0
    if epoch < warmup_iters:
        alpha = epoch / warmup_iters
        factor = warmup_factor * (1 - alpha) + alpha
    return factor * gamma ** bisect.bisect_right(milestones, epoch)


def test_multistep_schedule_against_the_official_formula():
    from workbench.stages import lr_factor

    ours = [lr_factor(e, 60, 10, 5e-6, 1e-6, 0.1, "multistep", (30, 50), 0.1) for e in range(60)]
    assert ours[0] == pytest.approx(0.1)  # the warm-up starts at warmup_factor
    for e in range(10):  # the official's epoch e+1 runs at its factor for last_epoch e+1: one epoch ahead
        assert ours[e] == pytest.approx(official_warmup_multistep(e, [30, 50], 0.1, 0.1, 10))
    for e in range(10, 60):  # after warm-up the decays fall on the same (1-based) epochs 30 and 50
        assert ours[e] == pytest.approx(official_warmup_multistep(e + 1, [30, 50], 0.1, 0.1, 10))
    assert ours[28] == 1.0 and ours[29] == pytest.approx(0.1) and ours[49] == pytest.approx(0.01)
    # a decay that falls inside the warm-up multiplies it, as in the official scheduler
    assert lr_factor(1, 10, 4, 1e-3, 1e-6, 0.2, "multistep", (2,), 0.5) == pytest.approx((0.2 + 0.8 / 4) * 0.5)
    # the default warm-up factor keeps the original ramp (e + 1) / (w + 1)
    assert [lr_factor(e, 10, 3, 1e-3, 1e-6) for e in range(3)] == pytest.approx([1 / 4, 2 / 4, 3 / 4])


def official_settings(**changes):
    base = dict(epochs=1, lr=1e-4, loss_list=("id", "triplet", "i2t"), log_every=1, id_head_linear=True)
    base.pop("id_head_linear")
    base.update(i2t_mode="all_classes", i2t_logit_mode="raw_dot", i2t_label_smoothing=0.1, label_smoothing=0.1,
                train_feature="raw", pre_proj=True, bias_lr_factor=2.0, weight_decay_bias=5e-4,
                loss_weights={"id": 0.25, "triplet": 1.0, "i2t": 1.0, "t2i": 1.0}, lr_schedule="multistep",
                lr_steps=(1,), warmup_epochs=0)
    base.update(changes)
    return ImageStageSettings(**base)


def test_official_recipe_trains_its_head_and_losses(two_ids, tmp_path):
    from workbench.evaluation import FeatureSpec, extract_features
    from workbench.heads import head_branches, infer_feat_dims
    from workbench.stages import _image_stage_trainables, _param_groups

    data = load_reid_dataset(two_ids)
    loaders = build_loaders(data, image_size=(64, 32), batch_size=4, num_instances=2, test_batch_size=8,
                            num_workers=0, seed=0)
    model = load_clip_with_patch("wb-tiny", "cpu", pretrained=None, image_size=(64, 32))
    prompt = PromptLearner(data.classnames, model, 4, "{aspect} hand", "dorsal", "wb-tiny")
    register_bnneck_and_arcface(model, data.num_classes, (64, 32), id_head="linear", pre_proj_branch=True)
    pre_dim, proj_dim = infer_feat_dims(model, (64, 32))
    assert not hasattr(model, "arcface") and model.classifier.bias is None
    assert [(b.num_features, c.in_features) for b, c in head_branches(model)] == [(proj_dim, proj_dim),
                                                                                  (pre_dim, pre_dim)]
    settings = official_settings()
    params = _image_stage_trainables(model, prompt, settings, print)
    groups = _param_groups(model, prompt, params, settings)
    assert [g["lr"] for g in groups] == [pytest.approx(1e-4), pytest.approx(2e-4)]
    assert groups[1]["weight_decay"] == 5e-4 and groups[0]["weight_decay"] == 1e-4
    assert id(model.classifier_pre.weight) in {id(p) for p in groups[0]["params"]}
    tracker = RecordingTracker()
    result = train_clipreid_image_stage(model, prompt, loaders, settings, torch.device("cpu"), tracker,
                                        log=lambda _: None)
    history = tracker.history
    assert history["i2t_loss"][0][1] > 0 and history["t2i_loss"][0][1] == 0 and history["center_loss"][0][1] == 0
    assert result["selection"] == "test" and set(result) >= {"test_rank1", "final_test_mAP", "best_mINP"}
    feats = extract_features(model, loaders.query, torch.device("cpu"), settings.feature_spec)
    assert feats.shape == (len(data.query), pre_dim + proj_dim)
    assert torch.allclose(feats.norm(dim=1), torch.ones(len(data.query)), atol=1e-5)
    after = extract_features(model, loaders.query, torch.device("cpu"), FeatureSpec("after", False, True))
    assert after.shape == feats.shape and not torch.allclose(after, feats)


def test_prompt_stage_keeps_the_last_partial_batch_and_logs_class_variance(two_ids):
    data = load_reid_dataset(two_ids)  # 4 training images
    loaders = build_loaders(data, image_size=(64, 32), batch_size=4, num_instances=2, test_batch_size=8,
                            num_workers=0, seed=0)
    model = load_clip_with_patch("wb-tiny", "cpu", pretrained=None, image_size=(64, 32))
    prompt = PromptLearner(data.classnames, model, 2, "{aspect} hand", "dorsal", "wb-tiny")
    tracker = RecordingTracker()
    for mode in ("cosine_scaled", "raw_dot"):
        result = train_clipreid_prompt_stage(
            model, prompt, loaders.train_eval, PromptStageSettings(epochs=2, lr=1e-3, batch_size=3, log_every=1,
                                                                   logit_mode=mode),
            torch.device("cpu"), tracker, log=lambda _: None)
        assert result["steps"] == 4  # 4 images in batches of 3: 2 batches an epoch, the partial one too
    assert len(tracker.history["prompt_class_var"]) == 8
    assert all(v > 0 for _, v in tracker.history["prompt_class_var"])
