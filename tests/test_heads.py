import pytest
import torch

from workbench.heads import ArcFace, infer_feat_dims, register_bnneck_and_arcface
from workbench.model import encode_image_parts, freeze_entire_clip_model, load_clip_with_patch, unfreeze_clip_image_encoder


@pytest.fixture(scope="module")
def tiny():
    return load_clip_with_patch("wb-tiny", "cpu", pretrained=None, image_size=(64, 32))


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


@pytest.mark.parametrize("name", ["wb-tiny", "wb-tiny-rn"])
def test_image_parts_project_to_encode_image(name):
    model = load_clip_with_patch(name, "cpu", pretrained=None, image_size=(64, 32)).eval()
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        pre, proj = encode_image_parts(model, images)
        assert torch.allclose(proj, model.encode_image(images), atol=1e-5)
    assert (pre.shape[1], proj.shape[1]) == infer_feat_dims(model, (64, 32))
    assert not torch.allclose(pre, proj) if pre.shape == proj.shape else True  # the projection is applied
