"""The ReID head on CLIP's image features: BNNeck and the ID classifier (ArcFace, or the official
CLIP-ReID's linear layer), on the projected feature and, for the official test feature, on the
pre-projection one too. Heads are registered on the CLIP model, so its state dict holds them.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError
from .model import encode_image_parts, encode_images


class ArcFace(nn.Module):
    """Additive angular margin classifier (as CLIP-ReID's Arcface, easy_margin off):
    logits = s * cos(theta + m) for the true class and s * cos(theta) for the others."""

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0, margin: float = 0.5):
        super().__init__()
        self.scale, self.margin = scale, margin
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.cos_m, self.sin_m = math.cos(margin), math.sin(margin)
        self.th = math.cos(math.pi - margin)
        self.mm = math.sin(math.pi - margin) * margin

    def forward(self, feats: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(feats.device.type, enabled=False):  # the margin needs fp32 cosines
            return self._logits(feats.float(), labels)

    def _logits(self, feats: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        cosine = F.linear(F.normalize(feats), F.normalize(self.weight.float()))
        if labels is None:
            return cosine * self.scale
        sine = torch.sqrt((1.0 - cosine.pow(2)).clamp(0, 1))
        phi = cosine * self.cos_m - sine * self.sin_m
        phi = torch.where(cosine > self.th, phi, cosine - self.mm)
        one_hot = F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
        return (one_hot * phi + (1.0 - one_hot) * cosine) * self.scale


class LinearHead(nn.Linear):
    """The official CLIP-ReID ID classifier: a bias-free linear layer, weights ~ N(0, 0.001).
    Takes (and ignores) the labels so that it is called like ArcFace."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        nn.init.normal_(self.weight, std=0.001)

    def forward(self, feats: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(feats)


def build_bnneck(feat_dim: int) -> nn.BatchNorm1d:
    """BatchNorm1d whose bias does not train (BoT's BNNeck)."""
    bn = nn.BatchNorm1d(feat_dim)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    bn.bias.requires_grad_(False)
    return bn


@torch.no_grad()
def infer_feat_dims(clip_model: nn.Module, image_size: Sequence[int]) -> tuple[int, int]:
    """(pre-projection, projected) image feature widths, found by one dummy forward (as the
    original does for the projected one)."""
    device = next(clip_model.parameters()).device
    was_training = clip_model.training
    clip_model.eval()
    dummy = torch.zeros(1, 3, *image_size, device=device)
    try:
        pre, proj = encode_image_parts(clip_model, dummy)
        dims = int(pre.shape[-1]), int(proj.shape[-1])
    except ConfigError:
        dims = 0, int(clip_model.encode_image(dummy).shape[-1])
    clip_model.train(was_training)
    return dims


def _build_id_head(kind: str, feat_dim: int, num_classes: int, scale: float, margin: float) -> nn.Module:
    return ArcFace(feat_dim, num_classes, scale, margin) if kind == "arcface" else LinearHead(feat_dim, num_classes)


def register_bnneck_and_arcface(clip_model: nn.Module, num_classes: int, image_size: Sequence[int],
                                arcface_scale: float = 30.0, arcface_margin: float = 0.5,
                                id_head: str = "arcface", pre_proj_branch: bool = False) -> int:
    """Attach the ReID head to ``clip_model``: ``bottleneck`` (BNNeck) and the ID classifier
    (``arcface``, or ``classifier`` when ``id_head`` is linear) on the projected feature, and with
    ``pre_proj_branch`` a second pair (``bottleneck_pre``, ``arcface_pre`` / ``classifier_pre``) on
    the pre-projection feature, as the official CLIP-ReID has. Returns the projected feat_dim."""
    pre_dim, feat_dim = infer_feat_dims(clip_model, image_size)
    if pre_proj_branch and not pre_dim:
        encode_image_parts(clip_model, torch.zeros(1, 3, *image_size))  # raises the ConfigError naming why
    device = next(clip_model.parameters()).device
    name = "arcface" if id_head == "arcface" else "classifier"
    clip_model.bottleneck = build_bnneck(feat_dim).to(device)
    setattr(clip_model, name, _build_id_head(id_head, feat_dim, num_classes, arcface_scale, arcface_margin).to(device))
    if pre_proj_branch:
        clip_model.bottleneck_pre = build_bnneck(pre_dim).to(device)
        setattr(clip_model, name + "_pre",
                _build_id_head(id_head, pre_dim, num_classes, arcface_scale, arcface_margin).to(device))
    return feat_dim


def head_branches(clip_model: nn.Module) -> list[tuple[nn.BatchNorm1d, nn.Module]]:
    """(BNNeck, ID classifier) pairs registered on ``clip_model``: the projected feature's first,
    then the pre-projection feature's when that branch exists."""
    classifier = clip_model.arcface if hasattr(clip_model, "arcface") else clip_model.classifier
    branches = [(clip_model.bottleneck, classifier)]
    if hasattr(clip_model, "bottleneck_pre"):
        pre = clip_model.arcface_pre if hasattr(clip_model, "arcface_pre") else clip_model.classifier_pre
        branches.append((clip_model.bottleneck_pre, pre))
    return branches


def head_parameters(clip_model: nn.Module) -> list[nn.Parameter]:
    """What trains in the head: BNNeck weights (their bias stays frozen, as in BoT) and classifiers."""
    params = []
    for bottleneck, classifier in head_branches(clip_model):
        params += [bottleneck.weight, *classifier.parameters()]
    return params


def image_features_for_head(clip_model: nn.Module, images: torch.Tensor, pre_proj: bool,
                            normalized: bool) -> list[torch.Tensor]:
    """The image features the head branches take, in ``head_branches`` order: the projected
    feature, then (with ``pre_proj``) the pre-projection one; float32, L2-normalised when
    ``normalized`` (original design) or raw (official)."""
    if pre_proj:
        pre, proj = encode_image_parts(clip_model, images)
        feats = [proj.float(), pre.float()]
    else:
        feats = [encode_images(clip_model, images).float()]
    return [F.normalize(f, dim=1) for f in feats] if normalized else feats
