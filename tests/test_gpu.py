"""What only CUDA runs computes what the plain path computes: the fused Adam, channels-last
ResNets, bf16 autocast, and a run that moves between devices. Skipped without CUDA;
bench/gpu_suite.sh runs them on a lent GPU (with the compiled-encoder check of test_model.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from workbench import config
from workbench.model import encode_images, load_clip_with_patch
from workbench.stages import adam, autocast_for

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")


def test_fused_adam_steps_as_the_plain_one_does():
    torch.manual_seed(0)
    start = [torch.randn(257, 33), torch.randn(33)]
    fused = [torch.nn.Parameter(t.to(CUDA)) for t in start]
    plain = [torch.nn.Parameter(t.to(CUDA)) for t in start]
    fused_opt = adam(fused, CUDA, lr=1e-3, weight_decay=1e-4)
    plain_opt = torch.optim.Adam(plain, lr=1e-3, weight_decay=1e-4, foreach=False)
    assert fused_opt.param_groups[0]["fused"] is True
    for _ in range(10):
        grads = [torch.randn_like(p) for p in fused]
        for params, optimizer in ((fused, fused_opt), (plain, plain_opt)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_channels_last_resnet_computes_what_a_contiguous_one_does():
    torch.manual_seed(0)
    nhwc = load_clip_with_patch("RN50", CUDA, pretrained=None, image_size=(128, 64))  # channels-last on CUDA
    torch.manual_seed(0)
    nchw = load_clip_with_patch("RN50", "cpu", pretrained=None, image_size=(128, 64)).to(CUDA)
    assert nhwc.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc.visual.conv1.weight, nchw.visual.conv1.weight, atol=0, rtol=0)

    def trunk(visual, x):  # the convolutions' feature maps: a random ResNet's pooled output hardly
        for stage in (visual.stem, visual.layer1, visual.layer2, visual.layer3, visual.layer4):  # depends on x
            x = stage(x)
        return x.float()

    images = torch.randn(4, 3, 128, 64, device=CUDA)
    with torch.no_grad():
        a, b = trunk(nhwc.visual.eval(), images), trunk(nchw.visual.eval(), images)
    # cuDNN picks other algorithms for each layout (TF32 included): equal up to rounding, which is
    # far below what tells one image from another
    assert (a - b).norm() < 1e-2 * (b - b.roll(1, 0)).norm()


def test_bf16_autocast_features_stay_close_to_fp32():
    torch.manual_seed(0)
    model = load_clip_with_patch("wb-tiny", CUDA, pretrained=None, image_size=(64, 32)).eval()
    images = torch.randn(8, 3, 64, 32, device=CUDA)
    with torch.no_grad():
        full = encode_images(model, images).float()
        with autocast_for(CUDA, True):
            half = encode_images(model, images)
    assert half.dtype == torch.bfloat16
    assert F.cosine_similarity(full, half.float(), dim=1).min().item() > 0.999


def test_a_run_interrupted_on_cuda_resumes_on_the_cpu(interrupted_run, tiny_config):
    """A checkpoint written on the GPU (fused Adam state, CUDA tensors) continues on a CPU."""
    from workbench.runner import train_joint

    cfg = config.replace(tiny_config, device="cuda", epochs_image=2)
    run_dir = interrupted_run(cfg)
    result = train_joint(config.replace(cfg, device="cpu"), resume_dir=run_dir)
    assert result["best_epoch"] in (1, 2) and math.isfinite(result["best_mAP"])
    assert math.isfinite(result["test_mAP"])
