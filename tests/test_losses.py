import math

import torch
import torch.nn.functional as F

from workbench.losses import CenterLoss, build_loss, id_loss, prompt_l2, supcon_loss, triplet_loss


def reference_supcon(text, image, t_label, i_label, temperature=1.0):
    """CLIP-ReID's SupConLoss, written out as the reference does it."""
    mask = (t_label.unsqueeze(1) == i_label.unsqueeze(0)).float()
    logits = text @ image.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_prob = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))
    return -((mask * log_prob).sum(1) / mask.sum(1)).mean()


def test_supcon_matches_clipreid_reference():
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(12, 16, generator=g), torch.randn(12, 16, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 0, 1, 2, 3])
    for scale in (1.0, 14.3):
        ours = supcon_loss(img, txt, labels, labels, scale)
        assert torch.allclose(ours, reference_supcon(img, txt, labels, labels, 1 / scale), atol=1e-5)


def test_i2t_t2i_symmetric_for_identical_features():
    x = F.normalize(torch.randn(8, 6), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert torch.allclose(supcon_loss(x, x, labels, labels), supcon_loss(x, x, labels, labels))
    a, b = torch.randn(8, 6), torch.randn(8, 6)
    assert torch.allclose(supcon_loss(a, b, labels, labels), reference_supcon(a, b, labels, labels))
    assert torch.allclose(supcon_loss(b, a, labels, labels), reference_supcon(b, a, labels, labels))


def reference_triplet(x, labels, margin):
    n = len(x)
    losses = []
    for i in range(n):
        d = [(x[i] - x[j]).pow(2).sum().clamp(min=1e-12).sqrt() for j in range(n)]
        ap = max(d[j] for j in range(n) if labels[j] == labels[i])
        an = min(d[j] for j in range(n) if labels[j] != labels[i])
        losses.append(max(0.0, float(ap - an + margin)))
    return sum(losses) / n


def test_triplet_batch_hard_against_loop_reference():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 5, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert math.isclose(float(triplet_loss(x, labels, 0.3)), reference_triplet(x, labels, 0.3), rel_tol=1e-5)
    # well separated clusters: zero loss
    y = torch.cat([torch.full((2, 3), float(k * 10)) for k in range(4)]) + 0.01 * torch.randn(8, 3)
    assert float(triplet_loss(y, labels, 0.3)) == 0.0


def test_center_loss_value_and_gradient_rescaling():
    center = CenterLoss(3, 2)
    with torch.no_grad():
        center.centers.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]))
    feats = torch.tensor([[1.0, 0.0], [1.0, 3.0]])
    labels = torch.tensor([0, 1])
    loss = center(feats, labels)
    assert math.isclose(float(loss), (1.0 + 4.0) / 2, rel_tol=1e-6)
    (0.5 * loss).backward()
    raw = center.centers.grad.clone()
    center.rescale_grad(0.5)
    assert torch.allclose(center.centers.grad, raw / 0.5)


def test_id_loss_label_smoothing_matches_bot_formula():
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 3, 1, 4])
    eps = 0.1
    target = (1 - eps) * F.one_hot(labels, 5) + eps / 5
    ref = (-target * logits.log_softmax(1)).sum(1).mean()
    assert torch.allclose(id_loss(logits, labels, eps), ref, atol=1e-6)
    assert torch.allclose(id_loss(logits, labels), F.cross_entropy(logits, labels))


def test_prompt_l2_and_build_loss():
    ctx = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert float(prompt_l2(ctx)) == (1 + 4 + 9 + 16) / 4
    losses = build_loss(["id", "i2t"])
    assert losses.id and losses.i2t and not losses.triplet and losses.needs_text


def reference_label_smooth_ce(logits, targets, epsilon):
    """CLIP-ReID's CrossEntropyLabelSmooth: t = (1 - eps) onehot + eps / K, (-t log_softmax).mean(0).sum()."""
    log_probs = torch.log_softmax(logits, dim=1)
    onehot = torch.zeros_like(log_probs).scatter_(1, targets.unsqueeze(1), 1)
    smoothed = (1 - epsilon) * onehot + epsilon / logits.shape[1]
    return (-smoothed * log_probs).mean(0).sum()


def test_i2t_over_all_classes_is_the_official_stage2_loss():
    from workbench.losses import i2t_all_classes_loss

    g = torch.Generator().manual_seed(3)
    image, text = torch.randn(6, 16, generator=g) * 4, torch.randn(5, 16, generator=g) * 3  # raw features
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    ours = i2t_all_classes_loss(image, text, labels, scale=1.0, label_smoothing=0.1)
    assert torch.allclose(ours, reference_label_smooth_ce(image @ text.T, labels, 0.1), atol=1e-5)
    assert torch.allclose(id_loss(image @ text.T, labels, 0.1), reference_label_smooth_ce(image @ text.T, labels, 0.1),
                          atol=1e-5)


def test_soft_margin_triplet():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 5, generator=g)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    dist = torch.cdist(x, x)
    same = labels[:, None] == labels[None, :]
    ap = torch.where(same, dist, torch.full_like(dist, -1)).amax(1)
    an = torch.where(~same, dist, torch.full_like(dist, 1e9)).amin(1)
    reference = torch.nn.SoftMarginLoss()(an - ap, torch.ones_like(ap))
    assert torch.allclose(triplet_loss(x, labels, margin=None), reference, atol=1e-5)
