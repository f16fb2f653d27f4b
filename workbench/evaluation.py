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

from .distributed import ShardSampler, gather_rows
from .heads import head_branches, image_features_for_head
from .model import all_text_features
from .errors import EvaluationError


def _to_numpy(x) -> np.ndarray | None:
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


_BLOCK_ELEMENTS = 1 << 22  # distances looked at in one block (queries x gallery), whatever ``chunk`` says
_DENSE_FRACTION = 0.2  # above this share of a block's items near enough to matter, sort its rows instead
_REFINE_ELEMENTS = 1 << 22  # comparisons per batch when float32 keys of float64 distances collide
_SIGN = np.uint32(0x80000000)


def _pid_codes(q_pids: np.ndarray, g_pids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Integer codes of the pids: a gallery pid's index among the gallery's distinct pids; the
    same for a query pid equal (by ``==``) to one of them, else the number of distinct pids."""
    g_unique, g_code = np.unique(g_pids.ravel(), return_inverse=True)
    q_code = np.full(len(q_pids), len(g_unique))
    if len(g_unique):
        at = np.minimum(np.searchsorted(g_unique, q_pids.ravel()), len(g_unique) - 1)
        found = g_unique[at] == q_pids.ravel()
        q_code[found] = at[found]
    return q_code, g_code.ravel(), len(g_unique)


def _order_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys ordered as the values rounded to float32, with -0.0 equal to 0.0 and every NaN
    equal to every other and after +inf (the order of ``np.sort``). Exact for float32 values."""
    with np.errstate(over="ignore"):
        v = values.astype(np.float32, copy=False) + np.float32(0)  # a copy; -0.0 + 0.0 is +0.0
    nan = np.isnan(v)
    if nan.any():
        v[nan] = np.nan  # one NaN bit pattern, with the sign bit clear
    bits = v.view(np.uint32)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def _refine_positions(keys: np.ndarray, pos: np.ndarray, hit_keys: np.ndarray, hit_rows: np.ndarray,
                      hit_cols: np.ndarray, hit_vals: np.ndarray, block: np.ndarray, col_bits: int) -> None:
    """Corrects ``pos`` (each hit's index in the sorted ``keys``) where float32 keys of different
    float64 distances collide: within a run of keys of the same row and float32 value, items
    are placed by their exact distance, then gallery index (NaN last, NaNs equal)."""
    col_mask = np.uint64((1 << col_bits) - 1)
    lo = np.searchsorted(keys, hit_keys & ~col_mask)
    hi = np.searchsorted(keys, hit_keys | col_mask, side="right")
    shared = np.flatnonzero(hi - lo > 1)
    sizes = (hi - lo)[shared]
    ends = np.cumsum(sizes)
    i = 0
    while i < shared.size:  # batches of hits whose runs hold at most _REFINE_ELEMENTS items together
        j = max(i + 1, int(np.searchsorted(ends, ends[i] - sizes[i] + _REFINE_ELEMENTS, side="right")))
        h, n = shared[i:j], sizes[i:j]
        owner = np.repeat(np.arange(h.size), n)
        member = np.arange(n.sum()) + np.repeat(lo[h] - (np.cumsum(n) - n), n)
        cols = (keys[member] & col_mask).astype(np.intp)
        vals, v, c = block[hit_rows[h][owner], cols], hit_vals[h][owner], hit_cols[h][owner]
        same = (vals == v) | (np.isnan(vals) & np.isnan(v))
        before = (vals < v) | (same & (cols < c))
        pos[h] = lo[h] + np.bincount(owner, weights=before, minlength=h.size).astype(pos.dtype)
        i = j


def _ranks_by_keys(block: np.ndarray, near: np.ndarray, hit_rows: np.ndarray, hit_cols: np.ndarray,
                   hit_vals: np.ndarray, exact32: bool) -> np.ndarray:
    """Each hit's 1-based rank among the kept items of its row, ``near`` holding every kept item
    that can come before a hit: those get one integer key (row | float32 order of the distance |
    gallery index), sorted at once, and a hit's rank is its position among its row's keys."""
    n, num_g = block.shape
    col_bits = max(1, (num_g - 1).bit_length())
    row_shift = np.uint64(32 + col_bits)
    flat = np.flatnonzero(near)
    near_vals = np.take(block, flat)
    keys = (flat // num_g).view(np.uint64)  # the row, in place
    flat -= keys.view(np.intp) * num_g
    keys <<= row_shift
    keys |= flat.view(np.uint64)
    del flat
    keys |= _order_keys(near_vals).astype(np.uint64) << np.uint64(col_bits)
    keys.sort()
    hit_keys = ((hit_rows.astype(np.uint64) << row_shift) | hit_cols.astype(np.uint64)
                | (_order_keys(hit_vals).astype(np.uint64) << np.uint64(col_bits)))
    pos = np.searchsorted(keys, hit_keys)
    if not exact32 and not np.array_equal(near_vals.astype(np.float32), near_vals, equal_nan=True):
        _refine_positions(keys, pos, hit_keys, hit_rows, hit_cols, hit_vals, block, col_bits)
    return pos - np.searchsorted(keys, hit_rows.astype(np.uint64) << row_shift) + 1


def _count_before(sorted_rows: np.ndarray, rows: np.ndarray, values: np.ndarray, inclusive: bool) -> np.ndarray:
    """Per (row, value): how many items of the (ascending, NaN last) sorted row are smaller than
    the value, or no larger when ``inclusive``; NaN is larger than any number and equal to NaN."""
    num_g = sorted_rows.shape[1]
    lo, hi = np.zeros(len(rows), np.intp), np.full(len(rows), num_g)
    nan = np.isnan(values)
    while True:  # a binary search in every row at once
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        x = sorted_rows[rows, np.minimum(mid, num_g - 1)]
        right = ((x <= values) | nan) if inclusive else ((x < values) | (nan & ~np.isnan(x)))
        lo = np.where(active & right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)


def _ranks_by_sorted_rows(block: np.ndarray, row: np.ndarray, col: np.ndarray,
                          removed: np.ndarray) -> np.ndarray | None:
    """Each hit's (same-pid pair not ``removed``) 1-based rank among the kept items of its row,
    from the block's rows sorted by value: the items smaller than the hit, the equal ones of a
    lower gallery index, less the removed items among them. None when too many hits tie with
    other items for that to be cheap."""
    n, num_g = block.shape
    vals = block[row, col]
    hit = ~removed
    hit_rows, hit_cols, hit_vals = row[hit], col[hit], vals[hit]
    sorted_rows = np.sort(block, axis=1)
    less = _count_before(sorted_rows, hit_rows, hit_vals, inclusive=False)
    tied = np.flatnonzero(_count_before(sorted_rows, hit_rows, hit_vals, inclusive=True) - less > 1)
    del sorted_rows
    if tied.size > n:
        return None
    for part in np.array_split(tied, max(1, -(-tied.size * num_g // _BLOCK_ELEMENTS))):
        v, c = hit_vals[part, None], hit_cols[part, None]
        same = block[hit_rows[part]]
        same = (same == v) | (np.isnan(same) & np.isnan(v))
        less[part] += np.count_nonzero(same & (np.arange(num_g) < c), axis=1)
    # the removed items before each hit: the same-pid pairs of each row in (value, gallery index) order
    order = np.lexsort((col, vals, row))
    removed_before = np.cumsum(removed[order]) - removed[order]
    removed_before -= removed_before[np.searchsorted(row[order], row[order])]
    before = np.empty(row.size, np.intp)
    before[order] = removed_before
    return less - before[hit] + 1


def reid_metrics(distmat, q_pids, g_pids, q_camids=None, g_camids=None, max_rank: int = 50,
                 chunk: int = 512) -> dict:
    """CMC, mAP and mINP of a query x gallery distance matrix (smaller = closer).

    As torchreid's ``evaluate_rank``: for each query, gallery items with the same pid *and* the
    same camera are removed (only when cameras are given); ties keep the lower gallery index
    first (NaN distances rank last); queries without any positive left are skipped. Returns a
    dict with ``cmc`` (float32 array of length min(max_rank, gallery size); ranks beyond the
    items left repeat the last value), ``mAP`` and ``mINP`` (fractions), ``num_valid_q``,
    ``num_skipped_q`` and ``ap`` (each query's average precision, NaN for a skipped one). pids
    may be ints or strings; they are compared by value. Raises EvaluationError when no query
    is valid.

    Only the ranks of the true matches are computed, without ranking the whole gallery: an item
    farther than a query's farthest kept match cannot come before any of its matches. Queries
    go in blocks (at most ``chunk`` of them, fewer when the gallery is large: a block holds at
    most about 4M distances). When few items of a block are that near (a good model), those
    get integer keys (query, distance, gallery index), sorted at once, and a match's rank is
    its position among its query's keys; otherwise the block's rows are sorted by value and
    each match's rank is counted in its row by binary search. float32 and float16 distances
    are ranked in float32, others in float64, both exactly. Working memory is bounded by the
    block, not by the matrix: no whole-matrix copy or sort (a np.memmap is read block by
    block)."""
    dist = _to_numpy(distmat)
    q_pids, g_pids = _to_numpy(q_pids), _to_numpy(g_pids)
    num_q, num_g = dist.shape
    if len(q_pids) != num_q or len(g_pids) != num_g:
        raise ValueError(f"distmat is {num_q}x{num_g} but there are {len(q_pids)} query and {len(g_pids)} gallery pids")
    with_cams = q_camids is not None and g_camids is not None
    if with_cams:
        q_camids, g_camids = _to_numpy(q_camids), _to_numpy(g_camids)
    max_rank = min(max_rank, num_g)
    exact32 = dist.dtype in (np.float32, np.float16)
    dtype = np.float32 if exact32 else np.float64

    # the gallery items of each query's pid, in gallery order
    q_code, g_code, num_pids = _pid_codes(q_pids, g_pids)
    by_pid = np.argsort(g_code, kind="stable")
    pid_count = np.bincount(g_code, minlength=num_pids + 1)  # the last code: a pid not in the gallery
    pid_first = np.cumsum(pid_count) - pid_count
    rows_per_block = max(1, min(chunk, _BLOCK_ELEMENTS // max(num_g, 1)))

    cmc_sum = np.zeros(max_rank)
    ap_all = np.full(num_q, np.nan)
    inp_sum = 0.0
    num_valid = 0
    for start in range(0, num_q, rows_per_block):
        stop = min(start + rows_per_block, num_q)
        n = stop - start
        codes = q_code[start:stop]
        n_same_pid = pid_count[codes]
        row = np.repeat(np.arange(n), n_same_pid)  # (query, gallery item) pairs of the same pid
        pair_start = np.cumsum(n_same_pid) - n_same_pid
        col = by_pid[np.arange(row.size) + np.repeat(pid_first[codes] - pair_start, n_same_pid)]
        removed = g_camids[col] == q_camids[start + row] if with_cams else np.zeros(row.size, bool)
        hit_rows, hit_cols = row[~removed], col[~removed]
        num_hits = np.bincount(hit_rows, minlength=n)
        valid = num_hits > 0
        if not valid.any():
            continue
        block = np.asarray(dist[start:stop], dtype=dtype)  # a view when no conversion is needed
        hit_vals = block[hit_rows, hit_cols]
        farthest = np.full(n, -np.inf, dtype)  # stays -inf for a query without a kept match
        with np.errstate(invalid="ignore"):  # NaN when a match is NaN: then the whole row counts
            np.maximum.at(farthest, hit_rows, hit_vals)
        # the items that can come before a match: kept, and no farther than the query's farthest match
        near = block <= farthest[:, None]
        nan_rows = np.isnan(farthest)
        if nan_rows.any():
            near[nan_rows] = True
        near[row[removed], col[removed]] = False
        rank = None  # of each match among its query's kept items, 1-based
        if np.count_nonzero(near) > _DENSE_FRACTION * near.size:
            rank = _ranks_by_sorted_rows(block, row, col, removed)
        if rank is None:
            rank = _ranks_by_keys(block, near, hit_rows, hit_cols, hit_vals, exact32)
        del near

        order = np.argsort(hit_rows * (num_g + 1) + rank)  # matches of each query, nearest first
        hit_rows, rank = hit_rows[order], rank[order]
        first_hit = np.cumsum(num_hits) - num_hits
        nth = np.arange(rank.size) - first_hit[hit_rows] + 1  # the match is the nth of its query
        num_rel = num_hits[valid]
        ap_all[start + np.flatnonzero(valid)] = np.bincount(hit_rows, weights=nth / rank, minlength=n)[valid] / num_rel
        best = rank[first_hit[valid]]
        worst = rank[first_hit[valid] + num_rel - 1]
        cmc_sum += np.cumsum(np.bincount(np.minimum(best, max_rank + 1) - 1, minlength=max_rank + 1)[:max_rank])
        inp_sum += (num_rel / worst).sum()
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
    features of each image and its mirror image. Returns a float32 CPU tensor. A loader that
    reads one rank's share (``distributed.ShardSampler``) gives every rank the features of all."""
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
    return gather_shards(feats, loader, device).cpu()


def gather_shards(batches: list[torch.Tensor], loader, device: torch.device) -> torch.Tensor:
    """The rows of ``batches`` (what ``loader`` gave, in order) joined; when the loader reads one
    DDP rank's share (``distributed.ShardSampler``), every rank's, in the loader's full order."""
    local = torch.cat(batches) if batches else torch.zeros((0, 0), device=device)
    if isinstance(getattr(loader, "sampler", None), ShardSampler):
        local = gather_rows(local)
    return local


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
