"""Losses of CLIP-ReID: supervised contrastive (i2t, t2i), batch-hard triplet, center, ID.

Each is a pure function or a small module; numbers match CLIP-ReID's ``SupConLoss``,
BoT's ``TripletLoss`` / ``CenterLoss`` and ``CrossEntropyLabelSmooth``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


def supcon_loss(query: torch.Tensor, keys: torch.Tensor, query_labels: torch.Tensor,
                key_labels: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Supervised contrastive loss of CLIP-ReID: each query row is pulled to every key with
    its label and pushed from the rest. ``scale`` multiplies the dot products (1 / temperature).

    i2t: ``supcon_loss(image_feats, text_feats, labels, labels)``;
    t2i: ``supcon_loss(text_feats, image_feats, labels, labels)``. Returns a scalar."""
    logits = (query @ keys.t()).float() * scale
    positives = (query_labels[:, None] == key_labels[None, :]).float()
    # log_softmax subtracts the row max internally, as the reference does by hand.
    log_prob = torch.log_softmax(logits, dim=1)
    mean_log_prob_pos = (positives * log_prob).sum(1) / positives.sum(1)
    return -mean_log_prob_pos.mean()


def euclidean_dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances, clamped at 1e-12 before the sqrt as BoT does."""
    x, y = x.float(), y.float()
    xx = x.pow(2).sum(1, keepdim=True)
    yy = y.pow(2).sum(1, keepdim=True).t()
    dist = torch.addmm(xx + yy, x, y.t(), beta=1, alpha=-2)
    return dist.clamp(min=1e-12).sqrt()


def triplet_loss(feats: torch.Tensor, labels: torch.Tensor, margin: float | None = 0.3) -> torch.Tensor:
    """Batch-hard triplet loss: for each anchor the farthest positive and the closest negative,
    ``mean(relu(d_ap - d_an + margin))``, or with ``margin=None`` the soft margin
    ``mean(log(1 + exp(d_ap - d_an)))`` (BoT's SoftMarginLoss). Returns a scalar."""
    dist = euclidean_dist(feats, feats)
    same = labels[:, None] == labels[None, :]
    dist_ap = dist.masked_fill(~same, float("-inf")).amax(1)
    dist_an = dist.masked_fill(same, float("inf")).amin(1)
    if margin is None:
        return F.softplus(dist_ap - dist_an).mean()
    return F.relu(dist_ap - dist_an + margin).mean()


def id_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy on classifier (ArcFace or linear) logits; with smoothing eps the target is
    ``(1 - eps) * onehot + eps / C`` as in CrossEntropyLabelSmooth."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)


def i2t_all_classes_loss(image_feats: torch.Tensor, class_text_feats: torch.Tensor, labels: torch.Tensor,
                         scale: float | torch.Tensor = 1.0, label_smoothing: float = 0.0) -> torch.Tensor:
    """The official CLIP-ReID stage-2 image-to-text loss: cross-entropy of each image feature
    against the text features of every training identity (``class_text_feats`` in label
    order), logits ``scale * image @ text.T``. Returns a scalar."""
    return id_loss((image_feats.float() @ class_text_feats.float().t()) * scale, labels, label_smoothing)


def prompt_l2(ctx: torch.Tensor) -> torch.Tensor:
    """mean(ctx^2): the original's regulariser on the learned context vectors."""
    return ctx.float().pow(2).mean()


class CenterLoss(nn.Module):
    """Center loss (Wen et al.): mean over the batch of ||x_i - c_{y_i}||^2.

    The centers train with their own SGD. Before that optimizer steps, call
    ``rescale_grad(weight)``: the total loss multiplies this term by ``weight``, and the
    centers' learning rate is meant for the unweighted loss (BoT, CLIP-ReID)."""

    def __init__(self, num_classes: int, feat_dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim, generator=generator))

    def forward(self, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        diff = feats.float() - self.centers[labels]
        return diff.pow(2).sum(1).clamp(min=1e-12, max=1e12).mean()

    @torch.no_grad()
    def rescale_grad(self, weight: float) -> None:
        if self.centers.grad is not None and weight > 0:
            self.centers.grad.mul_(1.0 / weight)


@dataclass(frozen=True)
class LossSet:
    """Which image-stage losses are on; built by ``build_loss``."""

    id: bool
    triplet: bool
    center: bool
    i2t: bool
    t2i: bool

    @property
    def needs_text(self) -> bool:
        return self.i2t or self.t2i


def build_loss(loss_list) -> LossSet:
    """Turn the config's ``loss_list`` (canonical names, already resolved) into a LossSet."""
    names = set(loss_list)
    unknown = names - {"id", "triplet", "center", "i2t", "t2i"}
    if unknown:
        raise ValueError(f"unknown losses: {sorted(unknown)}")
    return LossSet(**{n: n in names for n in ("id", "triplet", "center", "i2t", "t2i")})
