"""Pictures read at a glance: a run's metric curves, the CMC curve of every split and their mean,
and ranked lists (a query, then its closest gallery images framed green when right and red when
wrong, with the distance under each)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

RIGHT, WRONG = "#1a9641", "#d7191c"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int) -> Path:
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    _pyplot().close(fig)
    return path


def save_curves(history: dict[str, list[tuple[int, float]]], path: str | Path, keys: list[str],
                title: str) -> Path | None:
    """One PNG with a panel per metric in ``keys`` that has values; None when none has."""
    plt = _pyplot()
    keys = [k for k in keys if history.get(k)]
    if not keys:
        return None
    height = 2.2 * len(keys)
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, height), sharex=False, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        steps, values = zip(*history[key])
        ax.plot(steps, values, lw=1.2)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title, fontsize=9, y=1 - 0.15 / height)
    # Fixed margins in inches: tight_layout measured every label and cost a second per picture,
    # a few percent of a tuning trial.
    fig.subplots_adjust(left=1.0 / 7, right=1 - 0.2 / 7, top=1 - 0.55 / height, bottom=0.5 / height,
                        hspace=0.45)
    return _save(fig, path, dpi=90)


def plot_cmc(curves: dict[str, np.ndarray], path: str | Path, title: str) -> Path:
    """One line per split (thin) and their mean (thick); ``curves`` maps a label to CMC values
    in percent for ranks 1..N."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    stacked = np.stack([np.asarray(c, dtype=np.float64) for c in curves.values()])
    ranks = np.arange(1, stacked.shape[1] + 1)
    for label, curve in curves.items():
        ax.plot(ranks, curve, lw=0.8, alpha=0.45, label=label if len(curves) <= 10 else None)
    if len(curves) > 1:
        mean = stacked.mean(0)
        ax.plot(ranks, mean, lw=2.4, color="black", label=f"mean of {len(curves)} (rank-1 {mean[0]:.1f})")
    ax.set_xlabel("rank")
    ax.set_ylabel("matching rate (%)")
    ax.set_xlim(1, ranks[-1])
    ax.set_ylim(min(100.0, float(stacked.min())) - 2, 100.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path, dpi=110)


def pick_queries(ap: np.ndarray, worst: int = 6, random: int = 4, seed: int = 0) -> list[int]:
    """The ``worst`` evaluable queries (lowest AP) and ``random`` others drawn with ``seed``."""
    valid = np.flatnonzero(~np.isnan(ap))
    chosen = [int(i) for i in valid[np.argsort(ap[valid], kind="stable")][:worst]]
    rest = np.setdiff1d(valid, chosen)
    if len(rest) and random:
        chosen += [int(i) for i in np.random.default_rng(seed).choice(rest, size=min(random, len(rest)),
                                                                     replace=False)]
    return chosen


def _thumbnail(path: str, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB").resize((size[1], size[0])))


def plot_ranked_lists(queries: Sequence, gallery: Sequence, ranked: list[dict], ap: np.ndarray, rows: list[int],
                      path: str | Path, title: str, size: tuple[int, int] = (128, 64)) -> Path:
    """One row per chosen query: the query image (its identity and AP), then its ranked gallery
    images with a green (right identity) or red (wrong) frame and the distance under each.
    ``queries``/``gallery`` are records with ``path`` and ``pid``; ``ranked`` comes from
    ``evaluation.top_matches``."""
    plt = _pyplot()
    top = max(len(r["index"]) for r in ranked)
    fig, axes = plt.subplots(len(rows), top + 1, figsize=(1.05 * (top + 1), 2.1 * len(rows)), squeeze=False)
    for row, q in zip(axes, rows):
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].imshow(_thumbnail(queries[q].path, size))
        row[0].set_title(f"query {queries[q].pid}\nAP {ap[q]:.0f}%", fontsize=7)
        for spine in row[0].spines.values():
            spine.set_edgecolor("black")
            spine.set_linewidth(2)
        hits = ranked[q]
        for ax, g, distance, match in zip(row[1:], hits["index"], hits["distance"], hits["match"]):
            ax.imshow(_thumbnail(gallery[g].path, size))
            for spine in ax.spines.values():
                spine.set_edgecolor(RIGHT if match else WRONG)
                spine.set_linewidth(3)
            ax.set_xlabel(f"{distance:.3f}", fontsize=7, color=RIGHT if match else WRONG)
            ax.set_title(gallery[g].pid, fontsize=6)
        for ax in row[1 + len(hits["index"]):]:
            ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))  # room for the title
    return _save(fig, path, dpi=100)
