"""GPU checks in one process (issue 10, goal 4; BENCHMARKS.md, "GPU: the prepared run"): does the
image stage, with its data pipeline and its validation, run near the bare training step's rate?
In this order, so that a run stopped by a time limit loses the least important:

1. ``bare_step``: the stage-2 step of ``bench/train_step.py`` (workbench's, all five losses, bf16
   autocast on CUDA) on synthetic tensors already on the device: the rate the hardware allows.
2. ``image_stage_amp_true``: a complete ``workbench run`` (``train_joint``) of the same model,
   input size and batch on a synthetic dataset written as PNG files (at half the input size): the
   decoded-image cache, the loader's workers, pinned memory, the per-epoch validation and the step
   together. Its rate is taken between the first and the last validation (the first epoch holds
   the warm-up), so the prompt stage, the cache fill and the final test are not in it.
3. ``data_and_validation_share``: (2) / (1); goal 4 asks for at least 0.8.
4. ``quickstart``: the quickstart on the device under bf16 autocast (its numbers, a sanity check).
5. ``image_stage_amp_false``: (2) in fp32, for bf16's speed-up and memory.

The memory of (1) is the timed steps' peak, that of (2) and (5) the whole run's (prompt stage and
test included): compare (2) with (5), not with (1).

Defaults are the GPU check (ViT-B/16 at 256x128, batch 64, 192 + 32 identities x 16 images, num_workers auto). Prints one JSON line per
check; ``--out`` holds them all as one JSON list, rewritten after each check.

    python bench/gpu_check.py --out bench/results/gpu_check.json
    python bench/gpu_check.py --device cpu --model wb-tiny --image-size 64 32 --batch 16 --identities 8 \\
        --epochs 2 --workers 0 --no-quickstart --no-fp32     # a dry run of the code on the CPU
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402  (bench/train_step.py: the bare step)

from workbench import config  # noqa: E402
from workbench.data import build_loaders, loader_workers, synthesize_dataset  # noqa: E402
from workbench.model import resolve_model_name  # noqa: E402
from workbench.runner import load_data, train_joint  # noqa: E402
from workbench.tracking import NullTracker  # noqa: E402

QUICKSTART = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.yaml"


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def quickstart(args, tmp: Path, device: torch.device) -> dict:
    cfg = config.load(QUICKSTART, [f"data_root={tmp / 'hands'}", f"output_dir={tmp / 'runs'}", f"device={args.device}",
                                   "amp=true", "save_checkpoints=false"])
    result = train_joint(cfg, NullTracker(), quiet=True)
    return {"check": "quickstart", "amp": True, **{k: result[k] for k in (
        "best_rank1", "best_mAP", "test_rank1", "test_mAP", "prompt_stage_seconds", "image_stage_seconds",
        "total_seconds")}}


def bare_step(args, device: torch.device) -> dict:
    """bench/train_step.py's workbench stage-2 step (bf16 autocast on CUDA), same shapes as the run."""
    step_args = argparse.Namespace(model=args.model, image_size=tuple(args.image_size), batch=args.batch,
                                   classes=args.identities, n_ctx=args.n_ctx, steps=args.steps, warmup=args.warmup,
                                   log_every=20, compile=False)
    result = train_step.stage2(step_args, device, fast=True)
    return {"check": "bare_step", "images_per_second": result["images_per_s"], "steps": args.steps,
            "step_max_memory_gib": result["peak_gib"]}  # the timed steps' (bench/train_step.py resets it)


def run_config(args, tmp: Path, amp: bool) -> config.Config:
    return config.load(QUICKSTART, [
        f"data_root={tmp / 'synthetic'}", "synthesize_if_missing=false", f"output_dir={tmp / 'runs'}",
        f"device={args.device}", f"amp={str(amp).lower()}",
        f"model_type={args.model}", f"image_size=[{args.image_size[0]}, {args.image_size[1]}]",
        f"batch_size={args.batch}", "num_instances=4", f"n_ctx={args.n_ctx}", f"num_workers={args.workers}",
        f"val_identities={args.val_identities}", "epochs_prompt=1", f"epochs_image={args.epochs}", "warmup_epochs=0",
        "lr=5e-6", "pad=10", "random_erasing=0.5", "save_checkpoints=false", "val_every=1", "val_start=1",
        "select_metric=rank1"])


def image_stage(args, tmp: Path, device: torch.device, amp: bool) -> dict:
    """A whole run; the image stage's rate from the first validation to the last."""
    cfg = run_config(args, tmp, amp)
    seen: list[float] = []

    def report(epoch: int, metrics: dict) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seen.append(time.perf_counter())

    reset_peak(device)
    result = train_joint(cfg, NullTracker(), report=report, quiet=True)
    data = load_data(cfg)  # the same records the run trained on: its images per epoch
    loaders = build_loaders(data, image_size=cfg.image_size, batch_size=cfg.batch_size,
                            num_instances=cfg.num_instances, test_batch_size=cfg.test_batch_size, num_workers=0,
                            seed=cfg.seed, cache_images=False)
    per_epoch = len(loaders.train) * cfg.batch_size
    timed_epochs = len(seen) - 1
    seconds = seen[-1] - seen[0]
    return {"check": f"image_stage_amp_{str(amp).lower()}", "train_images": len(data.train), "images_per_epoch":
            per_epoch, "validation_images": len(data.val_query) + len(data.val_gallery), "timed_epochs": timed_epochs,
            "seconds": seconds, "images_per_second": per_epoch * timed_epochs / seconds,
            "image_stage_seconds": result["image_stage_seconds"], "best_rank1": result["best_rank1"],
            "run_max_memory_gib": peak_gib(device)}  # the whole run's: prompt stage, training, validation, test


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--image-size", type=int, nargs=2, default=[256, 128], metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=64, help="images per step (batch / 4 identities x 4)")
    parser.add_argument("--identities", type=int, default=192, help="training identities of the synthetic dataset")
    parser.add_argument("--val-identities", type=int, default=32, help="held-out identities validated each epoch")
    parser.add_argument("--images", type=int, default=16, help="images per identity")
    parser.add_argument("--n-ctx", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=5, help="image-stage epochs of each run (the first is warm-up)")
    parser.add_argument("--workers", default="auto", help="the loader's worker processes (num_workers; auto: from the cores)")
    parser.add_argument("--steps", type=int, default=50, help="timed bare steps")
    parser.add_argument("--warmup", type=int, default=5, help="bare steps before timing")
    parser.add_argument("--no-quickstart", dest="quickstart", action="store_false")
    parser.add_argument("--no-fp32", dest="fp32", action="store_false", help="skip the run without autocast")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.model = resolve_model_name(args.model)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first is warm-up)")
    device = torch.device(args.device)
    results: list[dict] = []

    def emit(result: dict) -> None:  # written at once: a run stopped by its time limit keeps what it had
        results.append(result)
        print(json.dumps(result), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")

    emit({"check": "machine", "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
          "torch": torch.__version__, "cuda": torch.version.cuda, "model": args.model,
          "image_size": list(args.image_size), "batch": args.batch, "workers": args.workers,
          "worker_processes": loader_workers(args.workers if args.workers == "auto" else int(args.workers),
                                             on_gpu=device.type == "cuda")})
    with tempfile.TemporaryDirectory() as tmp:  # the goal first, then the sanity checks
        tmp = Path(tmp)
        emit(bare_step(args, device))
        bare = results[-1]["images_per_second"]
        # PNG files at half the input size (written 4x faster; the run decodes and resizes them once)
        synthesize_dataset(tmp / "synthetic", args.identities + args.val_identities, args.images, seed=0,
                           size=(args.image_size[0] // 2, args.image_size[1] // 2), test_identities=8)
        emit(image_stage(args, tmp, device, amp=True))
        emit({"check": "data_and_validation_share", "ratio": results[-1]["images_per_second"] / bare, "goal": 0.8})
        if args.quickstart:
            emit(quickstart(args, tmp, device))
        if args.fp32:
            emit(image_stage(args, tmp, device, amp=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
