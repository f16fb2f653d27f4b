"""reid_metrics against the classic per-query evaluator, timed in one process on one synthetic
problem, with the same numbers checked; optionally the peak working memory of reid_metrics on a
large memory-mapped matrix.

The classic evaluator is written here as torchreid's ``eval_market1501`` and CLIP-ReID's
``eval_func`` work: one argsort of the whole distance matrix, then a numpy pass per query. The
default problem has Market-1501's test sizes (3368 queries, 15913 gallery items of which 2793
are distractors, 751 identities, 6 cameras); features are identity centres plus a camera offset
plus noise, so true matches are closer on average, and distances are cosine distances in float32
as the workbench computes them.

    python bench/eval_speed.py                           # Market-1501-sized, 3 repeats
    python bench/eval_speed.py --noise 2.0 --repeats 1   # a weak model: true matches far down
    python bench/eval_speed.py --memory 20000x100000     # peak memory on a 20k x 100k float32 memmap
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from workbench.evaluation import reid_metrics


def classic_evaluator(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50, kind="quicksort"):
    """The per-query evaluator: rank the whole matrix, then walk each query's ranking."""
    num_q, num_g = distmat.shape
    max_rank = min(max_rank, num_g)
    ranking = np.argsort(distmat, axis=1, kind=kind)
    cmcs, aps, inps = [], [], []
    for i in range(num_q):
        order = ranking[i]
        same_pid = g_pids[order] == q_pids[i]
        kept = ~(same_pid & (g_camids[order] == q_camids[i]))
        hits = same_pid[kept].astype(np.int32)
        if not hits.any():
            continue  # no true match left for this query
        found = hits.cumsum()
        last = np.flatnonzero(hits)[-1]
        inps.append(found[last] / (last + 1.0))
        cmc = np.minimum(found, 1)
        cmcs.append(np.concatenate([cmc[:max_rank], np.repeat(cmc[-1:], max(0, max_rank - len(cmc)))]))
        precision = found / np.arange(1, len(hits) + 1.0)
        aps.append((precision * hits).sum() / hits.sum())
    if not cmcs:
        raise RuntimeError("no query has a true match in the gallery")
    return {"cmc": np.asarray(cmcs, np.float32).mean(0), "mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)),
            "num_valid_q": len(cmcs)}


def synthetic_problem(queries, gallery, ids, cams, distractors, dim, noise, seed):
    """Query and gallery features and labels: identity centre + camera offset + noise, unit length."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((ids, dim)).astype(np.float32)
    camera = 0.5 * rng.standard_normal((cams, dim)).astype(np.float32)
    q_pids = rng.integers(0, ids, queries)
    g_pids = np.concatenate([rng.integers(0, ids, gallery - distractors), np.full(distractors, -1)])
    q_cams, g_cams = rng.integers(0, cams, queries), rng.integers(0, cams, gallery)

    def features(pids, cam_ids):
        own = rng.standard_normal((len(pids), dim)).astype(np.float32)  # a distractor's own look
        base = np.where(pids[:, None] >= 0, centres[np.maximum(pids, 0)], own)
        f = base + camera[cam_ids] + noise * rng.standard_normal((len(pids), dim)).astype(np.float32)
        return f / np.linalg.norm(f, axis=1, keepdims=True)

    return features(q_pids, q_cams), features(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


def best_time(fn, repeats):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def traced_peak(fn) -> int:
    """Peak bytes allocated (numpy buffers included) while ``fn`` runs, above what was live before."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def machine() -> str:
    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, Python {platform.python_version()}, numpy {np.__version__}"


def speed(args) -> int:
    qf, gf, q_pids, g_pids, q_cams, g_cams = synthetic_problem(args.queries, args.gallery, args.ids, args.cams,
                                                               args.distractors, args.dim, args.noise, args.seed)
    dist = (1.0 - qf @ gf.T).astype(args.dtype)
    print(f"machine: {machine()}")
    print(f"problem: {args.queries} queries x {args.gallery} gallery ({args.distractors} distractors), {args.ids} ids, "
          f"{args.cams} cameras, {args.dtype} distances, noise {args.noise}, seed {args.seed}; "
          f"best of {args.repeats}")
    kind = "stable" if args.stable_baseline else "quicksort"
    t_wb, wb = best_time(lambda: reid_metrics(dist, q_pids, g_pids, q_cams, g_cams, args.max_rank, args.chunk),
                         args.repeats)
    t_cl, cl = best_time(lambda: classic_evaluator(dist, q_pids, g_pids, q_cams, g_cams, args.max_rank, kind),
                         args.repeats)
    # the same numbers: against the classic evaluator with a stable argsort (the tie order both follow); the
    # quicksort one may order float32 ties between a match and a non-match either way
    stable = cl if kind == "stable" else classic_evaluator(dist, q_pids, g_pids, q_cams, g_cams, args.max_rank,
                                                           "stable")
    print(f"metrics: rank1 {wb['cmc'][0]:.4f}  rank5 {wb['cmc'][4]:.4f}  mAP {wb['mAP']:.6f}  mINP {wb['mINP']:.6f}  "
          f"({wb['num_valid_q']} valid queries)")
    same = True
    for name, other in [("stable", stable)] + ([("quicksort", cl)] if kind == "quicksort" else []):
        diff = {"cmc": float(np.abs(wb["cmc"] - other["cmc"]).max()), "mAP": abs(wb["mAP"] - other["mAP"]),
                "mINP": abs(wb["mINP"] - other["mINP"])}
        ok = max(diff.values()) <= 1e-6 and wb["num_valid_q"] == other["num_valid_q"]
        same = same and (ok or name == "quicksort")
        print(f"largest difference from the classic evaluator ({name} argsort): "
              + "  ".join(f"{k} {v:.1e}" for k, v in diff.items()) + ("  -> same to 1e-6" if ok else "  -> DIFFERENT"))
    print(f"classic evaluator ({kind} argsort + loop): {t_cl:.3f} s")
    print(f"workbench reid_metrics (chunk {args.chunk}):   {t_wb:.3f} s")
    print(f"speed ratio workbench / classic: {t_cl / t_wb:.1f}x")
    if args.peak:
        p_wb = traced_peak(lambda: reid_metrics(dist, q_pids, g_pids, q_cams, g_cams, args.max_rank, args.chunk))
        p_cl = traced_peak(lambda: classic_evaluator(dist, q_pids, g_pids, q_cams, g_cams, args.max_rank, kind))
        print(f"peak traced memory: workbench {p_wb / 2**20:.1f} MiB, classic {p_cl / 2**20:.1f} MiB "
              f"(the matrix itself: {dist.nbytes / 2**20:.1f} MiB, not counted)")
    return 0 if same else 1


def memory(args) -> int:
    queries, gallery = (int(x) for x in args.memory.lower().split("x"))
    ids = args.ids if args.memory_ids is None else args.memory_ids
    distractors = round(args.distractors * gallery / 15913)
    qf, gf, q_pids, g_pids, q_cams, g_cams = synthetic_problem(queries, gallery, ids, args.cams, distractors,
                                                               args.dim, args.noise, args.seed)
    print(f"machine: {machine()}")
    folder = Path(args.memmap_dir)
    with tempfile.NamedTemporaryFile(dir=folder, prefix="eval_speed_", suffix=".f32") as tmp:
        dist = np.memmap(tmp.name, dtype=np.float32, mode="w+", shape=(queries, gallery))
        start = time.perf_counter()
        for row in range(0, queries, 1024):  # written block by block: the matrix never sits in memory whole
            dist[row:row + 1024] = 1.0 - qf[row:row + 1024] @ gf.T
        dist.flush()
        print(f"problem: {queries} x {gallery} float32 distances ({dist.nbytes / 2**30:.2f} GiB) in a np.memmap in "
              f"{folder}, {ids} ids, {args.cams} cameras, {distractors} distractors; written in "
              f"{time.perf_counter() - start:.1f} s")
        tracemalloc.start()
        start = time.perf_counter()
        out = reid_metrics(dist, q_pids, g_pids, q_cams, g_cams, args.max_rank, args.chunk)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del dist
    print(f"reid_metrics (chunk {args.chunk}): {elapsed:.1f} s, rank1 {out['cmc'][0]:.4f}, mAP {out['mAP']:.4f}, "
          f"{out['num_valid_q']} valid queries")
    print(f"peak traced memory (tracemalloc: allocations, numpy buffers included; not the memmap's file pages, "
          f"which the kernel maps in and drops): {peak / 2**20:.1f} MiB")
    print(f"for scale: a float64 copy or an int64 argsort of the whole matrix would take "
          f"{queries * gallery * 8 / 2**30:.1f} GiB each")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=3368)
    parser.add_argument("--gallery", type=int, default=15913)
    parser.add_argument("--distractors", type=int, default=2793, help="gallery items of no query's identity")
    parser.add_argument("--ids", type=int, default=751)
    parser.add_argument("--cams", type=int, default=6)
    parser.add_argument("--dim", type=int, default=128, help="feature size")
    parser.add_argument("--noise", type=float, default=1.1,
                        help="feature noise: larger = a weaker model, true matches farther down the ranking")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs of each evaluator")
    parser.add_argument("--max-rank", type=int, default=50)
    parser.add_argument("--chunk", type=int, default=512, help="reid_metrics' chunk (queries per block, at most)")
    parser.add_argument("--stable-baseline", action="store_true",
                        help="the classic evaluator with a stable argsort (the tie order reid_metrics uses; slower)")
    parser.add_argument("--no-peak", dest="peak", action="store_false",
                        help="skip the tracemalloc peak of both evaluators")
    parser.add_argument("--memory", metavar="QxG",
                        help="instead: reid_metrics' peak memory on a QxG float32 matrix in a memmap, e.g. 20000x100000")
    parser.add_argument("--memory-ids", type=int, default=None,
                        help="identities of the --memory problem (default: --ids scaled with the gallery size)")
    parser.add_argument("--memmap-dir", default=tempfile.gettempdir(), help="where the --memory matrix is written")
    args = parser.parse_args()
    if args.memory and args.memory_ids is None:
        args.memory_ids = max(1, round(args.ids * int(args.memory.lower().split("x")[1]) / 15913))
    return memory(args) if args.memory else speed(args)


if __name__ == "__main__":
    sys.exit(main())
