import math

import pytest
import torch

from workbench.data import build_loaders, load_reid_dataset, synthesize_dataset
from workbench.model import PromptLearner, load_clip_with_patch, register_bnneck_and_arcface
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
