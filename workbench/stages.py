"""The two training stages of CLIP-ReID, one plain function each.

Stage 1 (``train_clipreid_prompt_stage``) learns the class prompts against a frozen CLIP from
cached image features. Stage 2 (``train_clipreid_image_stage``) fine-tunes the image encoder
with BNNeck, ArcFace, ID, triplet, center and the image-text contrastive losses, validating
every epoch. Per-step numbers stay on the device and reach the host once per ``log_every``
steps (one synchronisation), where they are checked for NaN and sent to the tracker.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config
from .evaluation import extract_features, validate, validate_stage1_prompts
from .losses import CenterLoss, build_loss, id_loss, prompt_l2, supcon_loss, triplet_loss
from .model import (all_text_features, encode_images, freeze_entire_clip_model, freeze_prompt_learner,
                    text_features, unfreeze_clip_image_encoder, unfreeze_clip_text_encoder)
from .tracking import Tracker

Log = Callable[[str], None]
Report = Callable[[int, dict], None]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def cosine_factor(epoch: int, epochs: int, warmup_epochs: int, base_lr: float, eta_min: float) -> float:
    """Multiplier of base_lr at ``epoch``: linear warm-up, then cosine from base_lr to eta_min."""
    if epoch < warmup_epochs:
        return (epoch + 1) / (warmup_epochs + 1)
    span = max(1, epochs - warmup_epochs)
    progress = min(1.0, (epoch - warmup_epochs) / span)
    floor = min(1.0, eta_min / base_lr)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer, epochs: int, warmup_epochs: int, eta_min: float):
    """Per-epoch cosine schedule (with warm-up) as a LambdaLR, so its state checkpoints."""
    base = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: cosine_factor(e, epochs, warmup_epochs, base, eta_min))


def autocast_for(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when amp is on; a no-op elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


class StepMetrics:
    """Per-step numbers kept as device tensors until ``flush``, which moves them to the host in
    one transfer, raises NonFiniteLossError on a non-finite loss, and logs each step."""

    def __init__(self, tracker: Tracker, stage: str):
        self.tracker, self.stage = tracker, stage
        self.rows: list[tuple[int, dict]] = []

    def add(self, step: int, values: dict) -> None:
        self.rows.append((step, values))

    def flush(self) -> dict[str, float]:
        if not self.rows:
            return {}
        keys = [k for k, v in self.rows[0][1].items() if isinstance(v, torch.Tensor)]
        stacked = torch.stack([torch.stack([row[k].detach().float() for k in keys]) for _, row in self.rows])
        host = stacked.cpu().tolist()  # the one synchronisation of this interval
        last: dict[str, float] = {}
        for (step, row), values in zip(self.rows, host):
            metrics = {k: v for k, v in row.items() if not isinstance(v, torch.Tensor)}
            metrics.update(zip(keys, values))
            for key in ("loss", "prompt_loss"):
                if key in metrics and not math.isfinite(metrics[key]):
                    raise NonFiniteLossError(f"{self.stage} stage: {key} became {metrics[key]} at step {step}; "
                                             f"lower the learning rate or check the data")
            self.tracker.log_metrics(metrics, step)
            last = metrics
        self.rows.clear()
        return last


@dataclass(frozen=True)
class PromptStageSettings:
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    eta_min: float = 1e-6
    reg_weight: float = 0.001
    logit_scale: float | None = None  # None: CLIP's learned logit_scale
    amp: bool = True
    log_every: int = 20

    @classmethod
    def from_config(cls, cfg: Config) -> "PromptStageSettings":
        return cls(epochs=cfg.epochs_prompt, lr=cfg.prompt_lr, batch_size=cfg.batch_size,
                   weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs, eta_min=cfg.eta_min,
                   reg_weight=cfg.prompt_reg_weight, logit_scale=cfg.contrastive_logit_scale, amp=cfg.amp,
                   log_every=cfg.log_every)


@dataclass(frozen=True)
class ImageStageSettings:
    epochs: int
    lr: float
    loss_list: tuple = ("id", "triplet", "center", "i2t", "t2i")
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    eta_min: float = 1e-6
    center_lr: float = 0.5
    center_loss_weight: float = 0.0003
    triplet_margin: float = 0.3
    label_smoothing: float = 0.0
    freeze_prompt: bool = True
    train_text_encoder: bool = False
    logit_scale: float | None = None
    amp: bool = True
    log_every: int = 20
    eval_neck: str = "before"
    max_rank: int = 50

    @classmethod
    def from_config(cls, cfg: Config) -> "ImageStageSettings":
        return cls(epochs=cfg.epochs_image, lr=cfg.lr, loss_list=cfg.losses, weight_decay=cfg.weight_decay,
                   warmup_epochs=cfg.warmup_epochs, eta_min=cfg.eta_min, center_lr=cfg.center_lr,
                   center_loss_weight=cfg.center_loss_weight, triplet_margin=cfg.triplet_margin,
                   label_smoothing=cfg.label_smoothing, freeze_prompt=cfg.freeze_prompt,
                   train_text_encoder=cfg.train_text_encoder, logit_scale=cfg.contrastive_logit_scale,
                   amp=cfg.amp, log_every=cfg.log_every, eval_neck=cfg.eval_neck_feat, max_rank=cfg.max_rank)


def _logit_scale(clip_model: nn.Module, fixed: float | None) -> torch.Tensor | float:
    return fixed if fixed is not None else clip_model.logit_scale.detach().exp()


def cache_image_features(clip_model: nn.Module, loader, device: torch.device, amp: bool = True):
    """Frozen, L2-normalised CLIP features of every image of ``loader`` (test transforms) and
    their labels, on ``device``: the prompt stage never runs the image encoder again."""
    feats = extract_features(clip_model, loader, device, neck="before", amp=amp)
    labels = torch.as_tensor(loader.dataset.labels, dtype=torch.long)
    return feats.to(device), labels.to(device)


def train_clipreid_prompt_stage(clip_model: nn.Module, prompt_learner: nn.Module, train_loader,
                                settings: PromptStageSettings, device: torch.device, tracker: Tracker,
                                log: Log = print, cached_features=None, checkpoint_path: Path | None = None,
                                metadata: dict | None = None, start_step: int = 0) -> dict:
    """Learn the class prompts against frozen CLIP. ``train_loader`` yields every training
    image once (test transforms); ``cached_features`` = (feats, labels) skips extracting them.
    Writes the ``_FINAL`` prompt checkpoint to ``checkpoint_path`` when given. Returns
    ``{"prompt_loss", "prompt_rank1", "prompt_mAP", "steps", "seconds", "image_feats", "labels"}``."""
    started = time.perf_counter()
    freeze_entire_clip_model(clip_model, log)
    for p in prompt_learner.parameters():
        p.requires_grad_(True)
    if cached_features is None:
        log("caching frozen image features of the training set")
        cached_features = cache_image_features(clip_model, train_loader, device, settings.amp)
    image_feats, labels = cached_features
    clip_model.eval()
    prompt_learner.train()
    optimizer = torch.optim.Adam(prompt_learner.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = build_scheduler(optimizer, settings.epochs, settings.warmup_epochs, settings.eta_min)
    scale = _logit_scale(clip_model, settings.logit_scale)
    buffer = StepMetrics(tracker, "prompt")
    n = image_feats.shape[0]
    batches = max(1, n // settings.batch_size)
    step = start_step
    epoch_loss = torch.zeros((), device=device)
    retrieval: dict = {}
    last: dict = {}
    bar = tqdm(range(settings.epochs), desc="prompt stage", unit="epoch", dynamic_ncols=True)
    for epoch in bar:
        lr = optimizer.param_groups[0]["lr"]
        perm = torch.randperm(n, device=device)
        epoch_loss.zero_()
        for b in range(batches):
            idx = perm[b * settings.batch_size:(b + 1) * settings.batch_size]
            img, lab = image_feats[idx], labels[idx]
            with autocast_for(device, settings.amp):
                text = text_features(clip_model, prompt_learner, lab).float()
            loss_i2t = supcon_loss(img, text, lab, lab, scale)
            loss_t2i = supcon_loss(text, img, lab, lab, scale)
            loss = loss_i2t + loss_t2i + settings.reg_weight * prompt_l2(prompt_learner.ctx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad = prompt_learner.ctx.grad
            optimizer.step()
            with torch.no_grad():
                ctx = prompt_learner.ctx.detach()
                buffer.add(step, {
                    "prompt_loss": loss.detach(), "i2t_loss": loss_i2t.detach(), "t2i_loss": loss_t2i.detach(),
                    "prompt_norm": ctx.norm(dim=-1).mean(), "prompt_var": ctx.var(),
                    "prompt_grad": grad.norm() if grad is not None else torch.zeros((), device=device),
                    "logits_std": (img @ text.t() * scale).std(), "lr": lr})
            epoch_loss += loss.detach()
            step += 1
            if (step - start_step) % settings.log_every == 0:
                last = buffer.flush() or last
        last = buffer.flush() or last
        scheduler.step()
        retrieval = validate_stage1_prompts(clip_model, prompt_learner, image_feats, labels)
        tracker.log_metrics({"prompt_rank1": retrieval["rank1"], "prompt_mAP": retrieval["mAP"],
                             "prompt_epoch_loss": float(epoch_loss) / batches}, step=epoch + 1)
        bar.set_postfix(loss=f"{float(epoch_loss) / batches:.3f}", r1=f"{retrieval['rank1']:.1f}",
                        norm=f"{last.get('prompt_norm', float('nan')):.3f}")
    final_loss = float(epoch_loss) / batches
    log(f"prompt stage: {settings.epochs} epochs, loss {final_loss:.4f}, image-to-prompt rank1 "
        f"{retrieval.get('rank1', float('nan')):.2f} mAP {retrieval.get('mAP', float('nan')):.2f}")
    if checkpoint_path is not None:
        save_checkpoint(checkpoint_path, model=prompt_learner, optimizer=optimizer, scheduler=scheduler,
                        metadata={**(metadata or {}), "progress": {"global_step": step}},
                        epoch=settings.epochs, train_loss=final_loss,
                        val_metrics={"prompt_rank1": retrieval["rank1"], "prompt_mAP": retrieval["mAP"]},
                        tag="FINAL", log=log)
    return {"prompt_loss": final_loss, "prompt_rank1": retrieval["rank1"], "prompt_mAP": retrieval["mAP"],
            "steps": step - start_step, "seconds": time.perf_counter() - started,
            "image_feats": image_feats, "labels": labels}


def _image_stage_trainables(clip_model: nn.Module, prompt_learner: nn.Module | None,
                            settings: ImageStageSettings, log: Log) -> list[nn.Parameter]:
    """Set which parameters train in the image stage and return them: the image encoder, BNNeck
    (its bias stays frozen, as in BoT) and ArcFace; the text encoder and the prompt when asked."""
    freeze_entire_clip_model(clip_model)
    unfreeze_clip_image_encoder(clip_model, log)
    clip_model.bottleneck.weight.requires_grad_(True)
    for p in clip_model.arcface.parameters():
        p.requires_grad_(True)
    if settings.train_text_encoder:
        unfreeze_clip_text_encoder(clip_model, log)
    if prompt_learner is not None:
        if settings.freeze_prompt:
            freeze_prompt_learner(prompt_learner, log)
        else:
            for p in prompt_learner.parameters():
                p.requires_grad_(True)
    params = [p for p in clip_model.parameters() if p.requires_grad]
    if prompt_learner is not None:
        params += [p for p in prompt_learner.parameters() if p.requires_grad]
    return params


def train_clipreid_image_stage(clip_model: nn.Module, prompt_learner: nn.Module | None, loaders,
                               settings: ImageStageSettings, device: torch.device, tracker: Tracker,
                               log: Log = print, report: Report | None = None,
                               checkpoint_path: Callable[[str], Path] | None = None,
                               metadata: dict | None = None, start_step: int = 0,
                               resume_from: Path | None = None) -> dict:
    """Fine-tune the image encoder (+ BNNeck, ArcFace; the text encoder when asked) and validate
    each epoch. ``loaders`` is ``data.Loaders``; ``prompt_learner`` may be None when no loss
    needs text. ``checkpoint_path(tag)`` names the ``BEST`` / ``FINAL`` files;
    ``report(epoch, metrics)`` gets every validation (pruning hooks in here). A ``LAST``
    checkpoint is written after every epoch; ``resume_from`` (such a file) restores the whole
    training state and goes on from the epoch after it. Returns the best and final metrics,
    ``best_epoch``, ``steps`` and ``seconds``."""
    started = time.perf_counter()
    losses = build_loss(settings.loss_list)
    use_text = losses.needs_text and prompt_learner is not None
    params = _image_stage_trainables(clip_model, prompt_learner, settings, log)
    text_trains = use_text and (settings.train_text_encoder or not settings.freeze_prompt)
    optimizer = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = build_scheduler(optimizer, settings.epochs, settings.warmup_epochs, settings.eta_min)
    center = CenterLoss(loaders.data.num_classes, clip_model.bottleneck.num_features).to(device)
    optimizer_center = torch.optim.SGD(center.parameters(), lr=settings.center_lr)
    best = {"rank1": -1.0, "mAP": 0.0, "rank5": 0.0, "rank10": 0.0}
    best_epoch, step, metrics, first_epoch, train_loss = 0, start_step, {}, 0, float("nan")
    if resume_from is not None:
        state = load_checkpoint(resume_from, model=clip_model, device=device, optimizer=optimizer,
                                scheduler=scheduler, prompt_learner=prompt_learner,
                                extra_modules={"center_loss": center}, extra_optimizers={"center": optimizer_center},
                                log=log)
        progress = state["metadata"]["progress"]
        first_epoch, step, best_epoch = state["epoch"], progress["global_step"], progress["best_epoch"]
        best, metrics, train_loss = dict(progress["best"]), dict(state["val_metrics"]), state["train_loss"]
        start_step = step - progress["stage_steps"]
        log(f"resuming the image stage after epoch {first_epoch} (global step {step})")
    scale = _logit_scale(clip_model, settings.logit_scale)

    cached_text = None
    if use_text and not text_trains:
        # Nothing on the text side trains: encode every class once, not every batch.
        with torch.no_grad(), autocast_for(device, settings.amp):
            cached_text = all_text_features(clip_model, prompt_learner).float()

    data = loaders.data
    q_pids = [r.pid for r in data.query]
    g_pids = [r.pid for r in data.gallery]
    q_cams = [r.camid for r in data.query] if data.has_cameras else None
    g_cams = [r.camid for r in data.gallery] if data.has_cameras else None
    buffer = StepMetrics(tracker, "image")
    zero = torch.zeros((), device=device)

    def save(tag: str, epoch: int) -> None:
        progress = {"global_step": step, "stage_steps": step - start_step, "best": best, "best_epoch": best_epoch}
        save_checkpoint(checkpoint_path(tag), model=clip_model, optimizer=optimizer, scheduler=scheduler,
                        classifier=clip_model.arcface, prompt_learner=prompt_learner,
                        extra_modules={"center_loss": center}, extra_optimizers={"center": optimizer_center},
                        metadata={**(metadata or {}), "progress": progress}, epoch=epoch, train_loss=train_loss,
                        val_metrics={k: v for k, v in metrics.items() if k != "num_valid_q"}, tag=tag,
                        log=log if tag != "LAST" else None, prompt_file=tag != "LAST")

    for epoch in range(first_epoch, settings.epochs):
        loaders.sampler.set_epoch(epoch)
        clip_model.train()
        if prompt_learner is not None:
            prompt_learner.train()
        lr = optimizer.param_groups[0]["lr"]
        epoch_loss = torch.zeros((), device=device)
        bar = tqdm(loaders.train, desc=f"image stage {epoch + 1}/{settings.epochs}", unit="batch",
                   dynamic_ncols=True, leave=False)
        for images, labels, _, _ in bar:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast_for(device, settings.amp):
                image_feats = F.normalize(encode_images(clip_model, images).float(), dim=1)
                feats_bn = clip_model.bottleneck(image_feats)
                arc_logits = clip_model.arcface(feats_bn, labels)
                if use_text:
                    text = cached_text[labels] if cached_text is not None else \
                        text_features(clip_model, prompt_learner, labels).float()
            parts = {
                "id_loss": id_loss(arc_logits, labels, settings.label_smoothing) if losses.id else zero,
                "tri_loss": triplet_loss(image_feats, labels, settings.triplet_margin) if losses.triplet else zero,
                "center_loss": center(feats_bn, labels) if losses.center else zero,
                "i2t_loss": supcon_loss(image_feats, text, labels, labels, scale) if losses.i2t and use_text else zero,
                "t2i_loss": supcon_loss(text, image_feats, labels, labels, scale) if losses.t2i and use_text else zero,
            }
            loss = (parts["id_loss"] + parts["tri_loss"] + parts["i2t_loss"] + parts["t2i_loss"]
                    + settings.center_loss_weight * parts["center_loss"])
            optimizer.zero_grad(set_to_none=True)
            optimizer_center.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if losses.center:
                center.rescale_grad(settings.center_loss_weight)
                optimizer_center.step()
            with torch.no_grad():
                row = {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()},
                       "feat_norm": feats_bn.detach().float().norm(dim=1).mean(),
                       "arc_conf": arc_logits.detach().float().softmax(1).amax(1).mean(), "lr": lr}
            buffer.add(step, row)
            epoch_loss += loss.detach()
            step += 1
            if (step - start_step) % settings.log_every == 0:
                last = buffer.flush()
                bar.set_postfix(loss=f"{last['loss']:.3f}", id=f"{last['id_loss']:.3f}",
                                tri=f"{last['tri_loss']:.3f}", cen=f"{last['center_loss']:.1f}",
                                feat_n=f"{last['feat_norm']:.2f}", arc_c=f"{last['arc_conf']:.2f}")
        buffer.flush()
        train_loss = float(epoch_loss) / max(1, len(loaders.train))
        scheduler.step()
        metrics = validate(clip_model, loaders.query, loaders.gallery, device, q_pids, g_pids, q_cams, g_cams,
                           neck=settings.eval_neck, max_rank=settings.max_rank, amp=settings.amp)
        tracker.log_metrics({k: metrics[k] for k in ("rank1", "rank5", "rank10", "mAP", "mINP")} |
                            {"epoch_loss": train_loss}, step=epoch + 1)
        improved = metrics["rank1"] > best["rank1"]
        log(f"image epoch {epoch + 1}/{settings.epochs}: loss {train_loss:.4f} lr {lr:.2e} | rank1 "
            f"{metrics['rank1']:.2f} rank5 {metrics['rank5']:.2f} rank10 {metrics['rank10']:.2f} "
            f"mAP {metrics['mAP']:.2f}" + ("  (best)" if improved else ""))
        if improved:
            best, best_epoch = {k: float(v) for k, v in metrics.items()}, epoch + 1
            if checkpoint_path is not None:
                save("BEST", epoch + 1)
        if checkpoint_path is not None:
            save("LAST", epoch + 1)  # what a resumed run starts from
        if report is not None:
            report(epoch + 1, metrics)
    if checkpoint_path is not None:
        save("FINAL", settings.epochs)
    return {"best_rank1": best["rank1"], "best_mAP": best["mAP"], "best_rank5": best["rank5"],
            "best_rank10": best["rank10"], "best_epoch": best_epoch,
            **{f"final_{k}": metrics[k] for k in ("rank1", "rank5", "rank10", "mAP")},
            "steps": step - start_step, "seconds": time.perf_counter() - started}
