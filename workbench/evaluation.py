"""ReID evaluation: feature extraction, CMC rank-k and mAP exactly as torchreid computes them.

``reid_metrics`` is vectorised over queries (processed in chunks to bound memory) and is
checked against a slow per-query reference in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .heads import head_branches, image_features_for_head
from .model import all_text_features
from .errors import EvaluationError


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
    ``num_valid_q``, ``num_skipped_q`` and ``ap`` (each query's average precision, NaN for a
    skipped one). pids may be ints or strings; they are compared by value. Raises
    EvaluationError when no query is valid."""
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
    ap_all = np.full(num_q, np.nan)
    inp_sum = 0.0
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
        ap_all[np.arange(rows.start, rows.stop)[valid]] = (precision * hits).sum(1) / num_rel
        inp_sum += (num_rel / last_hit).sum()
        num_valid += int(valid.sum())
    if num_valid == 0:
        raise EvaluationError("no query has a matching identity in the gallery (after removing same-camera "
                              "matches); check that query and gallery share identity folder names")
    return {"cmc": (cmc_sum / num_valid).astype(np.float32), "mAP": float(np.nansum(ap_all)) / num_valid,
            "mINP": inp_sum / num_valid, "num_valid_q": num_valid, "num_skipped_q": num_q - num_valid,
            "ap": ap_all}


def cosine_distance(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity between L2-normalised rows."""
    return 1.0 - F.normalize(query.float(), dim=1) @ F.normalize(gallery.float(), dim=1).t()


@dataclass(frozen=True)
class FeatureSpec:
    """Which image feature is compared at test time.

    ``neck``: before (the features the head takes, concatenated and L2-normalised) or after (the
    BNNeck outputs); ``normalized``: the head takes L2-normalised features (original design) or
    raw ones (official); ``pre_proj``: the pre-projection feature is concatenated to the
    projected one (official test feature); ``encode``: a method's own feature function
    ``encode(clip_model, images) -> [feature]`` (PromptSG's interaction module), in place of
    CLIP's image features, still normalised and put through the BNNeck as the spec says."""

    neck: str = "before"
    normalized: bool = True
    pre_proj: bool = False
    encode: Callable | None = field(default=None, compare=False)


@torch.no_grad()
def extract_features(clip_model: nn.Module, loader, device: torch.device, spec: FeatureSpec = FeatureSpec(),
                     amp: bool = False, normalize: bool = True, flip: bool = False) -> torch.Tensor:
    """Image features of every item of ``loader`` in order, as ``spec`` says, L2-normalised
    unless ``normalize`` is off (the prompt stage's raw features); with ``flip``, the mean of the
    features of each image and its mirror image. Returns a float32 CPU tensor."""
    was_training = clip_model.training
    clip_model.eval()
    feats = []
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")

    def features(images: torch.Tensor) -> torch.Tensor:
        with autocast:
            if spec.encode is None:
                parts = image_features_for_head(clip_model, images, spec.pre_proj, spec.normalized)
            else:
                parts = [f.float() for f in spec.encode(clip_model, images)]
                parts = [F.normalize(f, dim=1) for f in parts] if spec.normalized else parts
            if spec.neck == "after":
                parts = [bottleneck(f) for (bottleneck, _), f in zip(head_branches(clip_model), parts)]
            return torch.cat([p.float() for p in parts], dim=1)

    for batch in loader:
        images = batch[0].to(device, non_blocking=True)
        f = features(images)
        if flip:
            f = (f + features(torch.flip(images, dims=[3]))) / 2
        feats.append(F.normalize(f, dim=1) if normalize else f)
    clip_model.train(was_training)
    return torch.cat(feats).cpu()


@dataclass
class EvalSplit:
    """A query / gallery pair to rank: ``name`` is val (the hold-out that selection reads) or
    test. Cameras are None when unknown (then nothing is removed from a ranking)."""

    name: str
    query: object  # DataLoader
    gallery: object
    q_pids: list
    g_pids: list
    q_camids: list | None = None
    g_camids: list | None = None


def as_percent(metrics: dict) -> dict:
    cmc = metrics["cmc"]

    def rank(k: int) -> float:
        return float(cmc[min(k, len(cmc)) - 1]) * 100.0

    return {"rank1": rank(1), "rank5": rank(5), "rank10": rank(10), "mAP": float(metrics["mAP"]) * 100.0,
            "mINP": float(metrics["mINP"]) * 100.0, "num_valid_q": metrics["num_valid_q"]}


def validate(clip_model: nn.Module, split: EvalSplit, device: torch.device, spec: FeatureSpec = FeatureSpec(),
             log: Callable[[str], None] | None = None, max_rank: int = 50, amp: bool = False) -> dict:
    """ReID validation on ``split``: query and gallery features, cosine distance, torchreid
    metrics. Returns ``{"rank1", "rank5", "rank10", "mAP", "mINP"}`` in percent, plus
    ``num_valid_q``."""
    qf = extract_features(clip_model, split.query, device, spec, amp)
    gf = extract_features(clip_model, split.gallery, device, spec, amp)
    result = as_percent(reid_metrics(cosine_distance(qf, gf), np.asarray(split.q_pids), np.asarray(split.g_pids),
                                   split.q_camids, split.g_camids, max_rank=max_rank))
    if log is not None:
        log(f"{split.name}: " + "rank1 {rank1:.2f}  rank5 {rank5:.2f}  rank10 {rank10:.2f}  mAP {mAP:.2f}  "
            "mINP {mINP:.2f}  ({num_valid_q} queries)".format(**result))
    return result


@torch.no_grad()
def validate_stage1_prompts(clip_model: nn.Module, prompt_learner, image_feats: torch.Tensor,
                            labels: torch.Tensor, log: Callable[[str], None] | None = None,
                            max_rank: int = 50, raw_dot: bool = False) -> dict:
    """Image-to-prompt retrieval: every image (its frozen CLIP feature) ranks the learned
    prompts of all classes (by cosine, or by the raw dot product the prompts were trained with
    when ``raw_dot``); the right class is the only positive. Returns rank1/5/10 and mAP in
    percent. Run on images of the training identities, the only ones with prompts."""
    was_training = prompt_learner.training
    prompt_learner.eval()
    text = all_text_features(clip_model, prompt_learner, normalize=not raw_dot).float()
    prompt_learner.train(was_training)
    image = image_feats.to(text.device).float()
    dist = -(image @ text.t()) if raw_dot else cosine_distance(image, text)
    result = as_percent(reid_metrics(dist, labels.cpu().numpy(), np.arange(text.shape[0]), max_rank=max_rank))
    if log is not None:
        log("prompt retrieval: rank1 {rank1:.2f}  mAP {mAP:.2f}".format(**result))
    return result


def _image_key(record) -> tuple:
    """The same image in two splits of a prepared tree (a link or copy under query<i>/gallery<j>):
    same identity, file name and size."""
    path = Path(record.path)
    return record.pid, path.name, path.stat().st_size


@torch.no_grad()
def evaluate_splits(clip_model: nn.Module, splits: dict[int, tuple[list, list]], loader_for: Callable,
                    device: torch.device, spec: FeatureSpec = FeatureSpec(), amp: bool = False, flip: bool = False,
                    max_rank: int = 50, ranked_split: int | None = None, top: int = 10) -> dict[int, dict]:
    """ReID metrics of several test splits (query and gallery records), each image's features
    extracted once however many splits hold it. ``loader_for(records)`` gives a test loader.

    Returns {split: metrics in percent (rank1/5/10, mAP, mINP, num_valid_q) plus ``cmc`` (percent,
    ranks 1..max_rank) and ``ap`` (per query, percent)}; for ``ranked_split`` also ``ranked``:
    each query's top ``top`` gallery items (indices, distances, whether each is a true match),
    with same-identity same-camera items removed as the metrics remove them."""
    index: dict[tuple, int] = {}
    images = []
    for query, gallery in splits.values():
        for record in [*query, *gallery]:
            key = _image_key(record)
            if key not in index:
                index[key] = len(images)
                images.append(record)
    feats = extract_features(clip_model, loader_for(images), device, spec, amp, flip=flip)
    results = {}
    for split, (query, gallery) in splits.items():
        qf = feats[[index[_image_key(r)] for r in query]]
        gf = feats[[index[_image_key(r)] for r in gallery]]
        dist = cosine_distance(qf, gf).numpy()
        q_pids, g_pids = np.asarray([r.pid for r in query]), np.asarray([r.pid for r in gallery])
        cams = all(r.camid >= 0 for r in [*query, *gallery])
        q_cams = np.asarray([r.camid for r in query]) if cams else None
        g_cams = np.asarray([r.camid for r in gallery]) if cams else None
        metrics = reid_metrics(dist, q_pids, g_pids, q_cams, g_cams, max_rank=max_rank)
        results[split] = as_percent(metrics) | {"cmc": metrics["cmc"] * 100.0, "ap": metrics["ap"] * 100.0}
        if split == ranked_split:
            results[split]["ranked"] = top_matches(dist, q_pids, g_pids, q_cams, g_cams, top)
    return results


def top_matches(dist: np.ndarray, q_pids, g_pids, q_camids=None, g_camids=None, top: int = 10) -> list[dict]:
    """Per query: the ``top`` closest gallery items (``index``, ``distance``, ``match``) after
    removing same-identity same-camera items, as the metrics do."""
    ranked = []
    for i in range(dist.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        if q_camids is not None:
            order = order[~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))]
        order = order[:top]
        ranked.append({"index": order, "distance": dist[i, order], "match": g_pids[order] == q_pids[i]})
    return ranked


def mean_and_std(results: dict[int, dict], keys: Sequence[str] = ("rank1", "rank5", "rank10", "mAP", "mINP")) -> dict:
    """``mean_<key>`` and ``std_<key>`` over splits (sample standard deviation, ddof=1; 0 for one split)."""
    summary = {}
    for key in keys:
        values = np.asarray([r[key] for r in results.values()], dtype=np.float64)
        summary[f"mean_{key}"] = float(values.mean())
        summary[f"std_{key}"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return summary
