"""ReID evaluation: feature extraction, CMC rank-k and mAP exactly as torchreid computes them.

``reid_metrics`` is vectorised over queries (processed in chunks to bound memory) and is
checked against a slow per-query reference in the tests.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .model import all_text_features, encode_images


class EvaluationError(ValueError):
    """No query can be evaluated (no query has a positive in the gallery)."""


def _to_numpy(x) -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def reid_metrics(distmat, q_pids, g_pids, q_camids=None, g_camids=None, max_rank: int = 50,
                 chunk: int = 512) -> dict:
    """CMC, mAP and mINP of a query x gallery distance matrix (smaller = closer).

    As torchreid's ``evaluate_rank``: for each query, gallery items with the same pid *and* the
    same camera are removed (only when cameras are given); ties keep the lower gallery index
    first; queries without any positive left are skipped. Returns a dict with ``cmc`` (float
    array of length min(max_rank, gallery size)), ``mAP`` and ``mINP`` (fractions),
    ``num_valid_q`` and ``num_skipped_q``. pids may be ints or strings; they are compared by
    value. Raises EvaluationError when no query is valid."""
    dist = _to_numpy(distmat).astype(np.float64, copy=False)
    q_pids, g_pids = _to_numpy(q_pids), _to_numpy(g_pids)
    num_q, num_g = dist.shape
    if len(q_pids) != num_q or len(g_pids) != num_g:
        raise ValueError(f"distmat is {num_q}x{num_g} but there are {len(q_pids)} query and {len(g_pids)} gallery pids")
    with_cams = q_camids is not None and g_camids is not None
    if with_cams:
        q_camids, g_camids = _to_numpy(q_camids), _to_numpy(g_camids)
    max_rank = min(max_rank, num_g)

    cmc_sum = np.zeros(max_rank)
    ap_sum = inp_sum = 0.0
    num_valid = 0
    ranks = np.arange(1, num_g + 1)
    for start in range(0, num_q, chunk):  # chunks of queries bound memory, not a per-query loop
        rows = slice(start, min(start + chunk, num_q))
        order = np.argsort(dist[rows], axis=1, kind="stable")
        matches = g_pids[order] == q_pids[rows, None]
        keep = np.ones_like(matches)
        if with_cams:
            keep = ~(matches & (g_camids[order] == q_camids[rows, None]))
        hits = matches & keep
        num_rel = hits.sum(1)
        valid = num_rel > 0
        if not valid.any():
            continue
        hits, keep, num_rel = hits[valid], keep[valid], num_rel[valid]
        # rank of each gallery item among those kept for its query (1-based)
        kept_rank = np.cumsum(keep, axis=1)
        first_hit = np.where(hits, kept_rank, num_g + 1).min(1)
        last_hit = np.where(hits, kept_rank, 0).max(1)
        cmc_sum += (first_hit[:, None] <= np.arange(1, max_rank + 1)[None, :]).sum(0)
        precision = np.cumsum(hits, axis=1) / np.where(keep, kept_rank, ranks)
        ap_sum += ((precision * hits).sum(1) / num_rel).sum()
        inp_sum += (num_rel / last_hit).sum()
        num_valid += int(valid.sum())
    if num_valid == 0:
        raise EvaluationError("no query has a matching identity in the gallery (after removing same-camera "
                              "matches); check that query and gallery share identity folder names")
    return {"cmc": (cmc_sum / num_valid).astype(np.float32), "mAP": ap_sum / num_valid,
            "mINP": inp_sum / num_valid, "num_valid_q": num_valid, "num_skipped_q": num_q - num_valid}


def cosine_distance(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity between L2-normalised rows."""
    return 1.0 - F.normalize(query.float(), dim=1) @ F.normalize(gallery.float(), dim=1).t()


@torch.no_grad()
def extract_features(clip_model: nn.Module, loader, device: torch.device, neck: str = "before",
                     amp: bool = False) -> torch.Tensor:
    """Image features of every item of ``loader`` in order: L2-normalised CLIP image features
    (``neck='before'``) or BNNeck outputs (``'after'``). Returns a float32 CPU tensor."""
    was_training = clip_model.training
    clip_model.eval()
    feats = []
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")
    for batch in loader:
        images = batch[0].to(device, non_blocking=True)
        with autocast:
            f = F.normalize(encode_images(clip_model, images).float(), dim=1)
            if neck == "after":
                f = clip_model.bottleneck(f)
        feats.append(f.float())
    clip_model.train(was_training)
    return torch.cat(feats).cpu()


def _percent(metrics: dict) -> dict:
    cmc = metrics["cmc"]

    def rank(k: int) -> float:
        return float(cmc[min(k, len(cmc)) - 1]) * 100.0

    return {"rank1": rank(1), "rank5": rank(5), "rank10": rank(10), "mAP": float(metrics["mAP"]) * 100.0,
            "mINP": float(metrics["mINP"]) * 100.0, "num_valid_q": metrics["num_valid_q"]}


def validate(clip_model: nn.Module, query_loader, gallery_loader, device: torch.device,
             q_pids: Sequence, g_pids: Sequence, q_camids=None, g_camids=None,
             log: Callable[[str], None] | None = None, neck: str = "before", max_rank: int = 50,
             amp: bool = False) -> dict:
    """ReID validation: query and gallery features, cosine distance, torchreid metrics.
    Returns ``{"rank1", "rank5", "rank10", "mAP", "mINP"}`` in percent, plus ``num_valid_q``."""
    qf = extract_features(clip_model, query_loader, device, neck, amp)
    gf = extract_features(clip_model, gallery_loader, device, neck, amp)
    result = _percent(reid_metrics(cosine_distance(qf, gf), np.asarray(q_pids), np.asarray(g_pids),
                                   q_camids, g_camids, max_rank=max_rank))
    if log is not None:
        log("validation: rank1 {rank1:.2f}  rank5 {rank5:.2f}  rank10 {rank10:.2f}  mAP {mAP:.2f}  "
            "({num_valid_q} queries)".format(**result))
    return result


@torch.no_grad()
def validate_stage1_prompts(clip_model: nn.Module, prompt_learner, image_feats: torch.Tensor,
                            labels: torch.Tensor, log: Callable[[str], None] | None = None,
                            max_rank: int = 50) -> dict:
    """Image-to-prompt retrieval: every image (its frozen CLIP feature) ranks the learned
    prompts of all classes; the right class is the only positive. Returns rank1/5/10 and mAP
    in percent. Run on images of the training identities, the only ones with prompts."""
    was_training = prompt_learner.training
    prompt_learner.eval()
    text = all_text_features(clip_model, prompt_learner).float()
    prompt_learner.train(was_training)
    image = image_feats.to(text.device).float()
    dist = cosine_distance(image, text)
    result = _percent(reid_metrics(dist, labels.cpu().numpy(), np.arange(text.shape[0]), max_rank=max_rank))
    if log is not None:
        log("prompt retrieval: rank1 {rank1:.2f}  mAP {mAP:.2f}".format(**result))
    return result
