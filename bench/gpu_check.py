"""GPU check: the quickstart on CUDA (bf16 autocast) and ViT-B/16 image-stage throughput with
autocast on vs off, measured in the same process. Prints one JSON line per measurement.

    python bench/gpu_check.py [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from workbench import config
from workbench.data import build_loaders, load_reid_dataset, synthesize_dataset
from workbench.heads import register_bnneck_and_arcface
from workbench.model import PromptLearner, load_clip_with_patch
from workbench.runner import train_joint
from workbench.stages import ImageStageSettings, train_clipreid_image_stage
from workbench.tracking import NullTracker


def quickstart(tmp: Path) -> dict:
    cfg = config.load("experiments/quickstart.yaml", [f"data_root={tmp / 'hands'}", f"output_dir={tmp / 'runs'}",
                                                      "device=cuda", "amp=true", "save_checkpoints=false"])
    result = train_joint(cfg, NullTracker())
    return {"check": "quickstart_cuda_bf16", **{k: result[k] for k in (
        "best_rank1", "best_mAP", "final_rank1", "final_mAP", "prompt_stage_seconds", "image_stage_seconds",
        "total_seconds")}}


def vit_throughput(tmp: Path, amp: bool, root: Path) -> dict:
    torch.manual_seed(0)
    data = load_reid_dataset(root)
    loaders = build_loaders(data, image_size=(256, 128), batch_size=64, num_instances=4, test_batch_size=256,
                            num_workers=8, seed=0, pin_memory=True)
    device = torch.device("cuda")
    model = load_clip_with_patch("ViT-B/16", device, pretrained=None, image_size=(256, 128))
    prompt = PromptLearner(data.classnames, model, 12, "{aspect} hand of a person", "dorsal right", "ViT-B-16")
    register_bnneck_and_arcface(model, data.num_classes, (256, 128))
    settings = ImageStageSettings(epochs=2, lr=5e-6, amp=amp, log_every=50)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = train_clipreid_image_stage(model, prompt, loaders, settings, device, NullTracker(), log=lambda _: None)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"check": f"vitb16_image_stage_amp_{amp}", "steps": out["steps"], "seconds": seconds,
            "images_per_second": out["steps"] * 64 / seconds, "final_rank1": out["final_rank1"],
            "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    results = [{"device": torch.cuda.get_device_name(0), "torch": torch.__version__}]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        results.append(quickstart(tmp))
        print(json.dumps(results[-1]), flush=True)
        root = synthesize_dataset(tmp / "vit", identities=32, images_per_identity=16, seed=0, size=(128, 64))
        for amp in (False, True):
            torch.cuda.reset_peak_memory_stats()
            results.append(vit_throughput(tmp, amp, root))
            print(json.dumps(results[-1]), flush=True)
    results.append({"check": "bf16_speedup", "ratio": results[-1]["images_per_second"] / results[-2]["images_per_second"]})
    print(json.dumps(results[-1]))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
