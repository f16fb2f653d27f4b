import pytest
import torch

from workbench.config import ConfigError
from workbench.model import (ArcFace, PromptLearner, all_text_features, encode_prompt_embeddings,
                             freeze_entire_clip_model, load_clip_with_patch, register_bnneck_and_arcface,
                             resolve_model_name, text_features, unfreeze_clip_image_encoder)


@pytest.fixture(scope="module")
def tiny():
    return load_clip_with_patch("wb-tiny", "cpu", pretrained=None, image_size=(64, 32))


def test_model_names():
    assert resolve_model_name("ViT-B/16") == "ViT-B-16"
    assert resolve_model_name("vitb16") == "ViT-B-16"
    assert resolve_model_name("rn50") == "RN50"
    with pytest.raises(ConfigError, match="model_type"):
        resolve_model_name("ViT-Q/99")
    with pytest.raises(ConfigError, match="pretrained"):
        load_clip_with_patch("wb-tiny", pretrained="no-such-tag", image_size=(64, 32))


def test_prompt_text_path_equals_open_clip_encode_text(tiny):
    import open_clip

    pl = PromptLearner(["a", "b", "c"], tiny, 4, "{aspect} hand of a person", "dorsal right", "wb-tiny")
    assert pl.prompt_text == "A photo of a X X X X dorsal right hand of a person."
    tokens = open_clip.get_tokenizer("wb-tiny")([pl.prompt_text])
    with torch.no_grad():
        reference = tiny.encode_text(tokens, normalize=True)
        ours = encode_prompt_embeddings(tiny, tiny.token_embedding(tokens)[:, :pl.eot_index + 1])
    assert torch.allclose(reference, ours, atol=1e-5)
    feats = all_text_features(tiny, pl)
    assert feats.shape == (3, 128) and torch.allclose(feats.norm(dim=1), torch.ones(3))


def test_gradient_reaches_ctx_only(tiny):
    freeze_entire_clip_model(tiny)
    pl = PromptLearner(["a", "b"], tiny, 3, "{aspect} hand", "left", "wb-tiny")
    assert [n for n, p in pl.named_parameters() if p.requires_grad] == ["ctx"]
    text_features(tiny, pl, torch.tensor([0, 1, 1])).sum().backward()
    assert pl.ctx.grad is not None and pl.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny.parameters())


def test_impossible_n_ctx_is_a_config_error(tiny):
    with pytest.raises(ConfigError, match="n_ctx"):
        PromptLearner(["a"], tiny, 70, "{aspect} hand of a person with a long description", "dorsal", "wb-tiny")


def test_bnneck_arcface_and_freezing(tiny):
    feat_dim = register_bnneck_and_arcface(tiny, 5, (64, 32))
    assert feat_dim == 128 and not tiny.bottleneck.bias.requires_grad
    freeze_entire_clip_model(tiny)
    unfreeze_clip_image_encoder(tiny)
    trainable = {n.split(".")[0] for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable == {"visual"}


def test_arcface_margin_on_true_class_only():
    arc = ArcFace(4, 3, scale=10.0, margin=0.5)
    x = torch.randn(2, 4)
    labels = torch.tensor([0, 2])
    plain, margin = arc(x), arc(x, labels)
    mask = torch.nn.functional.one_hot(labels, 3).bool()
    assert torch.allclose(plain[~mask], margin[~mask])
    assert (margin[mask] < plain[mask]).all()


@pytest.mark.parametrize("name", ["ViT-B/16", "RN50"])
def test_real_architectures_at_256x128_with_a_local_weights_file(name, tmp_path):
    """The real architectures, random weights saved to a file and loaded back as `pretrained`."""
    square = load_clip_with_patch(name, "cpu", pretrained=None, image_size=(224, 224))
    path = tmp_path / "weights.pt"
    torch.save({k: v for k, v in square.state_dict().items() if k not in ("bottleneck", "arcface")}, path)
    model = load_clip_with_patch(name, "cpu", pretrained=str(path), image_size=(256, 128))
    out = model.encode_image(torch.randn(1, 3, 256, 128))
    assert out.shape == (1, model.text_projection.shape[1])
    if name == "RN50":
        assert model.visual.attnpool.positional_embedding.shape[0] == 8 * 4 + 1
        # the class token is kept; the grid is interpolated from the pretrained 7x7
        assert torch.equal(model.visual.attnpool.positional_embedding[0],
                           square.visual.attnpool.positional_embedding[0])
