import numpy as np
import pytest
import torch

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
