"""Does the data pipeline keep the model fed? One epoch of the image stage's training batches:
the loader alone, the training step alone (on batches already in memory), and both together,
with the decoded-image cache on and off, in one process. Prints the data share of the step time.

    python bench/pipeline.py [--config experiments/quickstart.yaml] [--set num_workers=2] [--epochs 2]
    python bench/pipeline.py --config experiments/vitb16_11k_dorsal_r.yaml --set device=cuda   # on a GPU
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from workbench import config
from workbench.heads import head_branches
from workbench.losses import id_loss, triplet_loss
from workbench.model import encode_images, freeze_entire_clip_model, unfreeze_clip_image_encoder
from workbench.runner import build_model_and_loaders, ensure_dataset, load_data, seed_everything, select_device
from workbench.stages import adam, autocast_for


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(cfg: config.Config, epochs: int) -> dict:
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    ensure_dataset(cfg, print)
    data = load_data(cfg)
    started = time.perf_counter()
    loaders, model, _, _ = build_model_and_loaders(cfg, data, device)
    setup = time.perf_counter() - started
    freeze_entire_clip_model(model)
    unfreeze_clip_image_encoder(model)
    (bottleneck, classifier), = head_branches(model)
    for p in [bottleneck.weight, *classifier.parameters()]:
        p.requires_grad_(True)
    optimizer = adam([p for p in model.parameters() if p.requires_grad], device, lr=1e-5)
    model.train()

    def step(images, labels):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast_for(device, cfg.amp):
            feats = F.normalize(encode_images(model, images).float(), dim=1)
            loss = id_loss(classifier(bottleneck(feats), labels), labels) + triplet_loss(feats, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for batch in loaders.train:  # warm-up: first calls, allocator, loader start
        step(batch[0], batch[1])
    sync(device)
    times = {"data": 0.0, "step": 0.0, "both": 0.0}
    images = 0
    for epoch in range(1, epochs + 1):
        loaders.sampler.set_epoch(epoch)
        started = time.perf_counter()
        batches = [(b[0], b[1]) for b in loaders.train]
        times["data"] += time.perf_counter() - started
        images += sum(len(b[0]) for b in batches)
        sync(device)
        started = time.perf_counter()
        for batch in batches:
            step(*batch)
        sync(device)
        times["step"] += time.perf_counter() - started
        loaders.sampler.set_epoch(epoch)
        started = time.perf_counter()
        for batch in loaders.train:
            step(batch[0], batch[1])
        sync(device)
        times["both"] += time.perf_counter() - started
    return {"setup": setup, "images": images, **times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/quickstart.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up epoch)")
    args = parser.parse_args(argv)
    print(f"config {args.config} {' '.join(args.set)}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    for cache in (False, True):
        cfg = config.load(args.config, [*args.set, f"cache_images={str(cache).lower()}"])
        r = measure(cfg, args.epochs)
        print(f"cache_images {str(cache).lower():5s}: setup {r['setup']:.2f} s | {r['images']} images: data alone "
              f"{r['data']:.2f} s ({r['images'] / r['data']:.0f} img/s), step alone {r['step']:.2f} s "
              f"({r['images'] / r['step']:.0f} img/s), both {r['both']:.2f} s | data / step "
              f"{100 * r['data'] / r['step']:.1f}%, both / step {r['both'] / r['step']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
