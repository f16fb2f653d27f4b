import tracemalloc
import warnings

import numpy as np
import pytest
import torch

from workbench import evaluation
from workbench.evaluation import EvaluationError, reid_metrics


def slow_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank):
    """torchreid's eval_market1501 loop, with a stable sort and last-value padding."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(num_q):
        order = np.argsort(distmat[i], kind="stable")
        if q_camids is None:
            keep = np.ones(num_g, bool)
        else:
            keep = ~((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i]))
        raw = (g_pids[order] == q_pids[i])[keep].astype(int)
        if not raw.any():
            continue
        cmc = raw.cumsum()
        last = np.max(np.where(raw == 1))
        all_inp.append(cmc[last] / (last + 1.0))
        cmc[cmc > 1] = 1
        cmc = list(cmc[:max_rank]) + [cmc[-1]] * max(0, max_rank - len(cmc))
        all_cmc.append(cmc)
        tmp = raw.cumsum() / (np.arange(len(raw)) + 1.0) * raw
        all_ap.append(tmp.sum() / raw.sum())
    return np.mean(all_cmc, 0), np.mean(all_ap), np.mean(all_inp), len(all_cmc)


def test_hand_computed_3x4():
    dist = np.array([[0.1, 0.5, 0.2, 0.9],
                     [0.4, 0.3, 0.8, 0.1],
                     [0.7, 0.2, 0.6, 0.3]])
    q = np.array([1, 2, 3])
    g = np.array([1, 2, 1, 3])
    out = reid_metrics(dist, q, g, max_rank=4)
    # q0: order 0,2,1,3 -> hits at ranks 1,2 -> AP 1 ; q1: order 3,1,0,2 -> hit rank 2 -> AP 1/2
    # q2: order 1,3,2,0 -> hit rank 2 -> AP 1/2
    np.testing.assert_allclose(out["cmc"], [1 / 3, 1, 1, 1])
    assert out["mAP"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert out["num_valid_q"] == 3


def test_same_camera_items_are_removed():
    dist = np.array([[0.1, 0.2, 0.3]])
    q, g = np.array([5]), np.array([5, 7, 5])
    out = reid_metrics(dist, q, g, np.array([1]), np.array([1, 2, 2]))
    # the gallery item of the same pid and camera is deleted: ranks 7 (miss) then 5 (hit);
    # rank 3 is beyond the two items left and repeats the last value
    np.testing.assert_allclose(out["cmc"], [0, 1, 1])
    assert out["mAP"] == pytest.approx(0.5)


def test_ties_keep_lower_gallery_index_and_query_order_is_irrelevant():
    dist = np.zeros((1, 3))
    out = reid_metrics(dist, np.array([2]), np.array([1, 2, 2]))
    np.testing.assert_allclose(out["cmc"], [0, 1, 1])
    rng = np.random.default_rng(0)
    d = rng.random((20, 30))
    q, g = rng.integers(0, 5, 20), rng.integers(0, 5, 30)
    a = reid_metrics(d, q, g)
    perm = rng.permutation(20)
    b = reid_metrics(d[perm], q[perm], g)
    np.testing.assert_allclose(a["cmc"], b["cmc"])
    assert a["mAP"] == pytest.approx(b["mAP"])


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("cameras", [False, True])
def test_matches_slow_reference(seed, cameras):
    rng = np.random.default_rng(seed)
    nq, ng = rng.integers(5, 40), rng.integers(5, 60)
    dist = rng.random((nq, ng)).round(2)  # rounding makes ties
    q, g = rng.integers(0, 8, nq), rng.integers(0, 8, ng)
    qc, gc = (rng.integers(0, 3, nq), rng.integers(0, 3, ng)) if cameras else (None, None)
    cmc, mAP, mINP, valid = slow_reference(dist, q, g, qc, gc, 10)
    out = reid_metrics(torch.tensor(dist) if seed % 2 else dist, q, g, qc, gc, max_rank=10, chunk=7)
    np.testing.assert_allclose(out["cmc"], cmc, rtol=1e-6)
    assert out["mAP"] == pytest.approx(mAP)
    assert out["mINP"] == pytest.approx(mINP)
    assert out["num_valid_q"] == valid
    assert out["num_skipped_q"] == nq - valid


def test_string_pids_and_no_valid_query():
    out = reid_metrics(np.array([[0.2, 0.1]]), np.array(["0001"]), np.array(["0001", "0002"]))
    np.testing.assert_allclose(out["cmc"], [0, 1])
    with pytest.raises(EvaluationError):
        reid_metrics(np.array([[0.2, 0.1]]), np.array(["0003"]), np.array(["0001", "0002"]))


# --- the fast path against the slow reference: ties, cameras, dtypes, chunking, memory ---

@pytest.fixture(params=["keys", "sorted rows"])
def path(request, monkeypatch):
    """Each block ranked by sorting the keys of its near items, or by sorting its rows (the path
    for blocks where most items are near; it falls back to the keys when many matches tie)."""
    monkeypatch.setattr(evaluation, "_DENSE_FRACTION", 2.0 if request.param == "keys" else 0.0)
    return request.param


def _reference(dist, q, g, qc, gc, max_rank):
    """slow_reference on the matrix and on each query alone (its AP, or NaN when it is skipped)."""
    dist = np.asarray(dist, dtype=np.float64)  # float32 and float16 convert exactly
    ap = np.full(len(q), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the mean of a skipped query's empty list
        for i in range(len(q)):
            one = slow_reference(dist[i:i + 1], q[i:i + 1], g, None if qc is None else qc[i:i + 1], gc, max_rank)
            if one[3]:
                ap[i] = one[1]
        return slow_reference(dist, q, g, qc, gc, max_rank), ap


def assert_as_reference(dist, q, g, qc=None, gc=None, max_rank=50, chunk=512):
    (cmc, mAP, mINP, valid), ap = _reference(dist, q, g, qc, gc, max_rank)
    out = reid_metrics(dist, q, g, qc, gc, max_rank=max_rank, chunk=chunk)
    assert set(out) == {"cmc", "mAP", "mINP", "num_valid_q", "num_skipped_q", "ap"}
    assert out["cmc"].dtype == np.float32 and out["cmc"].shape == (min(max_rank, len(g)),)
    np.testing.assert_allclose(out["cmc"], cmc, rtol=0, atol=1e-6)
    assert isinstance(out["mAP"], float) and abs(out["mAP"] - mAP) <= 1e-6
    assert abs(out["mINP"] - mINP) <= 1e-6
    assert out["num_valid_q"] == valid and out["num_skipped_q"] == len(q) - valid
    assert out["ap"].dtype == np.float64
    np.testing.assert_array_equal(np.isnan(out["ap"]), np.isnan(ap))  # NaN exactly for skipped queries
    np.testing.assert_allclose(out["ap"], ap, rtol=0, atol=1e-9)
    return out


def _identities(rng, nq, ng, ids, cams):
    return rng.integers(0, ids, nq), rng.integers(0, ids, ng), rng.integers(0, cams, nq), rng.integers(0, cams, ng)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("chunk", [1, 7, 512])
def test_tie_heavy_integer_distances(dtype, chunk, path):
    rng = np.random.default_rng(chunk)
    q, g, qc, gc = _identities(rng, 23, 90, 6, 3)
    for levels in (2, 3, 10):  # a few distinct values: every match ties with many items
        dist = rng.integers(0, levels, (23, 90)).astype(dtype)
        assert_as_reference(dist, q, g, qc, gc, max_rank=20, chunk=chunk)
        assert_as_reference(dist, q, g, max_rank=20, chunk=chunk)


@pytest.mark.parametrize("value", [0.0, 0.5, -1.0])
def test_all_equal_rows_rank_by_gallery_index(value, path):
    rng = np.random.default_rng(1)
    q, g, qc, gc = _identities(rng, 17, 40, 4, 2)
    dist = np.full((17, 40), value)
    dist[::3] = rng.integers(0, 2, (6, 40))  # some rows all equal, some two-valued
    for d in (dist, dist.astype(np.float32)):
        assert_as_reference(d, q, g, qc, gc, max_rank=10, chunk=7)


def test_float64_distances_that_share_a_float32_value(path):
    # distinct float64 distances that round to the same float32, with exact ties among them
    rng = np.random.default_rng(2)
    q, g, qc, gc = _identities(rng, 30, 200, 5, 3)
    dist = 1.0 + rng.integers(0, 40, (30, 200)) * 1e-12
    assert_as_reference(dist, q, g, qc, gc, chunk=7)
    assert_as_reference(dist, q, g, max_rank=300, chunk=30)


def test_float64_collisions_checked_in_small_batches(monkeypatch, path):
    monkeypatch.setattr(evaluation, "_REFINE_ELEMENTS", 5)
    rng = np.random.default_rng(3)
    q, g, qc, gc = _identities(rng, 12, 60, 3, 2)
    assert_as_reference(0.5 + rng.integers(0, 5, (12, 60)) * 1e-13, q, g, qc, gc, chunk=5)


def test_camera_heavy_removal_and_queries_with_nothing_left(path):
    rng = np.random.default_rng(4)
    q, g, qc, gc = _identities(rng, 40, 120, 8, 2)
    gc[g % 2 == 0] = 0  # even identities: every gallery item in camera 0
    qc[q % 2 == 0] = 0  # ... and their queries too: nothing left, skipped
    dist = rng.random((40, 120)).round(2)
    out = assert_as_reference(dist, q, g, qc, gc, max_rank=30, chunk=7)
    assert out["num_skipped_q"] >= (q % 2 == 0).sum()
    assert np.isnan(out["ap"][q % 2 == 0]).all()
    one_cam = assert_as_reference(dist, q, g, np.zeros(40, int), np.r_[np.zeros(119, int), 1], chunk=3)
    assert one_cam["num_valid_q"] == (q == g[-1]).sum()  # only the one item in another camera is left


def test_string_pids_as_integer_pids(path):
    rng = np.random.default_rng(5)
    q, g, qc, gc = _identities(rng, 25, 70, 9, 3)
    dist = rng.integers(0, 4, (25, 70)).astype(np.float32)
    s_q, s_g = np.char.zfill(q.astype(str), 4), np.char.zfill(g.astype(str), 4)
    a = assert_as_reference(dist, s_q, s_g, qc, gc, max_rank=15, chunk=7)
    b = reid_metrics(dist, q, g, qc, gc, max_rank=15)
    np.testing.assert_array_equal(a["cmc"], b["cmc"])
    np.testing.assert_array_equal(a["ap"], b["ap"])
    assert reid_metrics(dist, list(s_q), list(s_g))["mAP"] == reid_metrics(dist, q, g)["mAP"]


def test_max_rank_beyond_the_gallery_repeats_the_last_value(path):
    rng = np.random.default_rng(6)
    q, g, qc, gc = _identities(rng, 9, 5, 3, 2)
    dist = rng.random((9, 5))
    out = assert_as_reference(dist, q, g, qc, gc, max_rank=100, chunk=4)
    assert out["cmc"].shape == (5,) and out["cmc"][-1] == 1.0
    assert_as_reference(dist, q, g, max_rank=1, chunk=1)


def test_float32_float16_tensor_and_memmap_inputs(tmp_path, path):
    rng = np.random.default_rng(7)
    q, g, qc, gc = _identities(rng, 31, 80, 6, 3)
    dist = rng.random((31, 80)).astype(np.float32)
    dist[:, ::4] = dist[:, 1::4]  # exact float32 ties
    base = assert_as_reference(dist, q, g, qc, gc, chunk=7)
    for other in (torch.from_numpy(dist), dist.astype(np.float64), np.asfortranarray(dist)):
        out = reid_metrics(other, q, g, qc, gc, chunk=7)
        np.testing.assert_array_equal(out["ap"], base["ap"])
        np.testing.assert_array_equal(out["cmc"], base["cmc"])
    half = dist.astype(np.float16)
    assert_as_reference(half, q, g, qc, gc, chunk=7)
    mm = np.memmap(tmp_path / "dist.f32", dtype=np.float32, mode="w+", shape=dist.shape)
    mm[:] = dist
    np.testing.assert_array_equal(reid_metrics(mm, q, g, qc, gc)["ap"], base["ap"])


def test_nan_inf_and_signed_zero_distances(path):
    rng = np.random.default_rng(8)
    q, g, qc, gc = _identities(rng, 20, 50, 4, 3)
    dist = rng.integers(0, 3, (20, 50)).astype(np.float64)
    dist[rng.random(dist.shape) < 0.1] = np.nan  # ranked last, in gallery order, whatever the sign bit
    dist[rng.random(dist.shape) < 0.05] = np.copysign(np.nan, -1)
    dist[rng.random(dist.shape) < 0.1] = np.inf
    dist[rng.random(dist.shape) < 0.2] = -0.0  # equal to 0.0
    for d in (dist, dist.astype(np.float32), dist + 1e-12 * rng.random(dist.shape)):
        assert_as_reference(d, q, g, qc, gc, max_rank=10, chunk=6)


@pytest.mark.parametrize("seed", range(3))
def test_random_structured_cases_with_small_blocks(seed, monkeypatch, path):
    rng = np.random.default_rng(100 + seed)
    nq, ng, ids, dim = 150, 1500, 60, 16
    centers = rng.standard_normal((ids, dim))
    q, g, qc, gc = _identities(rng, nq, ng, ids, 6)
    qf = centers[q] + rng.uniform(0.5, 3.0) * rng.standard_normal((nq, dim))
    gf = centers[g] + rng.uniform(0.5, 3.0) * rng.standard_normal((ng, dim))
    dist = 1 - (qf / np.linalg.norm(qf, axis=1, keepdims=True)) @ (gf / np.linalg.norm(gf, axis=1, keepdims=True)).T
    dist = dist.astype(np.float32) if seed % 2 else dist
    assert_as_reference(dist, q, g, qc, gc, max_rank=50, chunk=64)
    monkeypatch.setattr(evaluation, "_BLOCK_ELEMENTS", 10_000)  # blocks of 6 queries, whatever chunk says
    assert_as_reference(dist, q, g, qc, gc, max_rank=50, chunk=64)


def test_working_memory_is_bounded_by_the_block(path):
    # no float64 copy or argsort of the whole matrix: peak allocations stay far below its size
    rng = np.random.default_rng(9)
    nq, ng, ids = 256, 20_000, 500
    q, g, qc, gc = _identities(rng, nq, ng, ids, 6)
    dist = rng.random((nq, ng), dtype=np.float32)
    dist[g[None, :] == q[:, None]] *= 0.01  # matches are closer
    tracemalloc.start()
    try:
        reid_metrics(dist, q, g, qc, gc, chunk=16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < dist.nbytes / 4
