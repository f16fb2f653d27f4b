"""What the study-wide feature cache saves per trial: extracting the prompt stage's frozen
training features vs loading them from the cache, for the quickstart's wb-tiny and for ViT-B/16
(random weights) on the same images. Prints one line per model with the ratio.

    python bench/feature_cache.py [--data data/synthetic_hands] [--device cpu]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from workbench import config
from workbench.data import load_reid_dataset, synthesize_dataset
from workbench.runner import FeatureCache, build_model_and_loaders
from workbench.stages import cache_image_features


def measure(model_type: str, image_size: list[int], data_root: Path, device: str, folder: Path) -> dict:
    cfg = config.load("experiments/quickstart.yaml", [f"model_type={model_type}", f"image_size={image_size}",
                                                      f"data_root={data_root}", f"device={device}"])
    dev = torch.device(device)
    data = load_reid_dataset(data_root)
    loaders, model, _, _ = build_model_and_loaders(cfg, data, dev)
    cache = FeatureCache(folder / model_type.replace("/", "-"))
    start = time.perf_counter()
    cache.get(cfg, lambda: cache_image_features(model, loaders.train_eval, dev, cfg.amp), dev)
    extract = time.perf_counter() - start
    fresh = FeatureCache(cache.folder)  # a later trial, or another worker process
    start = time.perf_counter()
    fresh.get(cfg, lambda: (_ for _ in ()).throw(AssertionError("cache miss")), dev)
    load = time.perf_counter() - start
    return {"model": model_type, "images": len(data.train), "extract_s": extract, "cached_s": load,
            "ratio": extract / load}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=None, help="ReID dataset root (default: a fresh synthetic one)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = Path(args.data) if args.data else synthesize_dataset(tmp / "hands", 60, 8, seed=0, size=(64, 32))
        for model_type, size in (("wb-tiny", [64, 32]), ("ViT-B/16", [224, 224])):
            r = measure(model_type, size, root, args.device, tmp)
            print(f"{r['model']:9s} {r['images']} images: extract {r['extract_s']:.2f}s, from cache "
                  f"{r['cached_s']:.3f}s, {r['ratio']:.0f}x less per trial")


if __name__ == "__main__":
    main()
