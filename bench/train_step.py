"""Training step rates of both CLIP-ReID stages: workbench's step against a baseline step written
the way the original design describes it, timed in one process on the same model and data.

Baseline: the text features of every batch through CLIP's full 77-token path, a ``.item()``
host synchronisation per loss part per step, fp32 (CPU) or fp16 autocast with a GradScaler
(CUDA), PyTorch's default Adam. workbench: class text features encoded once when nothing on the
text side trains (stage 2), the text path stopped at the end-of-text token (stage 1), numbers
kept on the device and read once per ``--log-every`` steps, bf16 autocast and fused Adam on CUDA,
``--compile`` optional. Synthetic tensors stand in for images (bench/pipeline.py measures data).

    python bench/train_step.py                                   # CPU, the tiny CLIP
    python bench/train_step.py --device cuda --model ViT-B-16 --image-size 256 128 --batch 64 --compile
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch
import torch.nn.functional as F

from workbench.heads import head_branches, register_bnneck_and_arcface
from workbench.losses import CenterLoss, id_loss, prompt_l2, supcon_loss, triplet_loss
from workbench.model import (PromptLearner, all_text_features, compile_encoders, encode_images,
                             freeze_entire_clip_model, load_clip_with_patch, resolve_model_name, text_features,
                             unfreeze_clip_image_encoder)
from workbench.stages import adam, autocast_for


def full_text_path(clip_model, prompt_learner: PromptLearner, labels: torch.Tensor) -> torch.Tensor:
    """The baseline's text features: the learned context spliced into all 77 token positions, the
    whole causal transformer, the feature at the end-of-text token."""
    with torch.no_grad():
        embedded = clip_model.token_embedding(prompt_learner.tokens)  # (1, 77, width)
    start = prompt_learner.token_prefix.shape[1]
    rest = embedded[:, start + prompt_learner.n_ctx:]
    ctx = prompt_learner.ctx[labels]
    x = torch.cat([prompt_learner.token_prefix.expand(len(labels), -1, -1), ctx, rest.expand(len(labels), -1, -1)], 1)
    x = x + clip_model.positional_embedding.to(x.dtype)
    x = clip_model.transformer(x, attn_mask=clip_model.attn_mask)
    x = clip_model.ln_final(x[:, prompt_learner.eot_index])
    return F.normalize(x @ clip_model.text_projection, dim=-1)


def timed(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def baseline_precision(device: torch.device):
    """fp16 autocast with a GradScaler on CUDA (the original design), fp32 on the CPU."""
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    autocast = (lambda: torch.autocast("cuda", dtype=torch.float16)) if cuda else contextlib.nullcontext
    return autocast, scaler


def backward_step(loss, optimizer, scaler) -> None:
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()


class DeviceLog:
    """workbench's way of logging: each step's numbers stay on the device; one host transfer per
    ``every`` steps."""

    def __init__(self, every: int):
        self.every, self.rows = every, []

    def add(self, *values: torch.Tensor) -> None:
        self.rows.append(torch.stack([v.detach().float() for v in values]))
        if len(self.rows) == self.every:
            torch.stack(self.rows).cpu()
            self.rows.clear()


def stage1(args, device: torch.device, fast: bool) -> dict:
    torch.manual_seed(0)
    model = load_clip_with_patch(args.model, device, pretrained=None, image_size=args.image_size)
    learner = PromptLearner([str(i) for i in range(args.classes)], model, args.n_ctx, model_name=args.model)
    freeze_entire_clip_model(model)
    if fast and args.compile:
        compile_encoders(model)
    feats = F.normalize(torch.randn(args.classes * 8, model.text_projection.shape[1], device=device), dim=1)
    labels = torch.arange(args.classes, device=device).repeat_interleave(8)
    optimizer = adam(learner.parameters(), device, lr=1e-3) if fast else torch.optim.Adam(learner.parameters(), lr=1e-3)
    autocast, scaler = baseline_precision(device)
    scale = model.logit_scale.detach().exp()
    device_log = DeviceLog(args.log_every)

    def step():
        idx = torch.randint(0, len(labels), (args.prompt_batch,), device=device)
        img, lab = feats[idx], labels[idx]
        with (autocast_for(device, True) if fast else autocast()):
            text = (text_features(model, learner, lab) if fast else full_text_path(model, learner, lab)).float()
        i2t, t2i = supcon_loss(img, text, lab, lab, scale), supcon_loss(text, img, lab, lab, scale)
        loss = i2t + t2i + 1e-3 * prompt_l2(learner.ctx)
        optimizer.zero_grad(set_to_none=True)
        if fast:
            loss.backward()
            optimizer.step()
            device_log.add(loss, i2t, t2i, learner.ctx.norm())
        else:
            backward_step(loss, optimizer, scaler)
            [x.item() for x in (loss, i2t, t2i, learner.ctx.norm())]  # the per-step logging

    seconds = timed(step, args.steps, args.warmup, device)
    return {"prompts_per_s": args.steps * args.prompt_batch / seconds, "seconds": seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def stage2_step(args, device: torch.device, fast: bool):
    """The stage-2 step (workbench's when ``fast``, else the baseline's) on the model and tensors it
    builds, as a function of no arguments."""
    torch.manual_seed(0)
    model = load_clip_with_patch(args.model, device, pretrained=None, image_size=args.image_size)
    learner = PromptLearner([str(i) for i in range(args.classes)], model, args.n_ctx, model_name=args.model)
    register_bnneck_and_arcface(model, args.classes, args.image_size)
    freeze_entire_clip_model(model)
    unfreeze_clip_image_encoder(model)
    (bottleneck, classifier), = head_branches(model)
    for p in [bottleneck.weight, *classifier.parameters()]:
        p.requires_grad_(True)
    learner.requires_grad_(False)
    if fast and args.compile:
        compile_encoders(model)
    if fast and device.type == "cuda" and hasattr(model.visual, "layer1"):
        model.visual.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adam(params, device, lr=1e-5) if fast else torch.optim.Adam(params, lr=1e-5)
    center = CenterLoss(args.classes, bottleneck.num_features).to(device)
    center_opt = torch.optim.SGD(center.parameters(), lr=0.5)
    images = torch.randn(args.batch, 3, *args.image_size, device=device)
    labels = torch.arange(args.batch // 4, device=device).repeat_interleave(4) % args.classes
    autocast, scaler = baseline_precision(device)
    scale = model.logit_scale.detach().exp()
    with torch.no_grad(), autocast_for(device, True):
        cached = all_text_features(model, learner).float()  # workbench: once per stage
    device_log = DeviceLog(args.log_every)

    def step():
        with (autocast_for(device, True) if fast else autocast()):
            feats = F.normalize(encode_images(model, images).float(), dim=1)
            feats_bn = bottleneck(feats)
            logits = classifier(feats_bn, labels)
            if fast:
                text = cached[labels]
            else:
                with torch.no_grad():
                    text = full_text_path(model, learner, labels).float()
        parts = [id_loss(logits, labels), triplet_loss(feats, labels), center(feats_bn, labels),
                 supcon_loss(feats, text, labels, labels, scale), supcon_loss(text, feats, labels, labels, scale)]
        loss = parts[0] + parts[1] + 3e-4 * parts[2] + parts[3] + parts[4]
        optimizer.zero_grad(set_to_none=True)
        center_opt.zero_grad(set_to_none=True)
        if fast:
            loss.backward()
            optimizer.step()
            center_opt.step()
            device_log.add(loss, *parts, feats_bn.norm(dim=1).mean(), logits.softmax(1).amax(1).mean())
        else:
            backward_step(loss, optimizer, scaler)
            center_opt.step()
            [x.item() for x in (loss, *parts, feats_bn.norm(dim=1).mean(), logits.softmax(1).amax(1).mean())]

    return step


def stage2(args, device: torch.device, fast: bool) -> dict:
    seconds = timed(stage2_step(args, device, fast), args.steps, args.warmup, device)
    return {"images_per_s": args.steps * args.batch / seconds, "seconds": seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="wb-tiny")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, help="H W (default 64 32 for wb-tiny, "
                                                                                "else 256 128)")
    parser.add_argument("--batch", type=int, default=32, help="stage-2 images per step (P x 4)")
    parser.add_argument("--prompt-batch", type=int, default=64, help="stage-1 prompts per step")
    parser.add_argument("--classes", type=int, default=60)
    parser.add_argument("--n-ctx", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="workbench's step with compile: true")
    parser.add_argument("--out", help="write the numbers as JSON here too (after each stage)")
    parser.add_argument("--baseline-from", metavar="JSON", help="take the baseline's rates from an earlier --out of "
                        "the same shapes instead of timing them again (e.g. a --compile run after an eager one)")
    args = parser.parse_args(argv)
    args.model = resolve_model_name(args.model)
    args.image_size = tuple(args.image_size or ((64, 32) if args.model.startswith("wb-tiny") else (256, 128)))
    device = torch.device(args.device)
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "torch": torch.__version__, "model": args.model, "image_size": list(args.image_size),
               "threads": torch.get_num_threads(), "compile": args.compile}
    shapes = {k: results[k] for k in ("device", "model", "image_size")} | {
        "batch": args.batch, "prompt_batch": args.prompt_batch, "classes": args.classes, "n_ctx": args.n_ctx}
    results["shapes"] = shapes
    earlier = None
    if args.baseline_from:
        with open(args.baseline_from) as f:
            earlier = json.load(f)
        if earlier.get("shapes") != shapes:
            parser.error(f"--baseline-from {args.baseline_from}: measured {earlier.get('shapes')}, not {shapes}")
    for name, run in (("stage1", stage1), ("stage2", stage2)):
        base = earlier[name]["baseline"] if earlier else run(args, device, fast=False)
        ours = run(args, device, fast=True)
        key = "prompts_per_s" if name == "stage1" else "images_per_s"
        results[name] = {"baseline": base, "workbench": ours, "ratio": ours[key] / base[key]}
        unit = key.replace("_per_s", "/s")
        memory = (f"; peak {base['peak_gib']:.2f} vs {ours['peak_gib']:.2f} GiB" if base["peak_gib"] is not None
                  else "")
        print(f"{name}: baseline {base[key]:9.1f} {unit}{' (from ' + args.baseline_from + ')' if earlier else ''}, "
              f"workbench {ours[key]:9.1f} {unit}, ratio {results[name]['ratio']:.2f}x{memory}", flush=True)
        if args.out:  # after each stage: a run stopped by a time limit keeps what it had
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
