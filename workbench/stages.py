"""The two training stages of CLIP-ReID, one plain function each.

Stage 1 (``train_clipreid_prompt_stage``) learns the class prompts against a frozen CLIP from
cached image features. Stage 2 (``train_clipreid_image_stage``) fine-tunes the image encoder
with BNNeck, ArcFace, ID, triplet, center and the image-text contrastive losses, validating
every epoch. Per-step numbers stay on the device and reach the host once per ``log_every``
steps (one synchronisation), where they are checked for NaN and sent to the tracker.
"""
from __future__ import annotations

import bisect
import contextlib
import gc
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import load_checkpoint, restore_generator, save_checkpoint
from .config import Config
from .evaluation import EvalSplit, FeatureSpec, extract_features, validate, validate_stage1_prompts
from .losses import (CenterLoss, build_loss, i2t_all_classes_loss, id_loss, prompt_l2, supcon_loss,
                     triplet_loss)
from .heads import head_branches, head_parameters, image_features_for_head
from .model import (all_text_features, freeze_entire_clip_model, freeze_prompt_learner, text_features,
                    unfreeze_clip_image_encoder, unfreeze_clip_text_encoder)
from .tracking import Tracker
from .errors import NonFiniteLossError

Log = Callable[[str], None]
Report = Callable[[int, dict], None]

_console = threading.local()


@contextlib.contextmanager
def quiet_console():
    """Runs in this thread print nothing to the console (their log files keep every line): the
    trials of a study running side by side, whose progress bars would interleave."""
    before = getattr(_console, "quiet", False)
    _console.quiet = True
    try:
        yield
    finally:
        _console.quiet = before


def console_on() -> bool:
    """Whether this run prints progress and log lines: DDP rank 0, outside ``quiet_console``."""
    return distributed.is_main() and not getattr(_console, "quiet", False)


def lr_factor(epoch: int, epochs: int, warmup_epochs: int, base_lr: float, eta_min: float,
              warmup_factor: float | None = None, schedule: str = "cosine", steps: tuple = (),
              gamma: float = 0.1) -> float:
    """Multiplier of base_lr at (0-based) ``epoch``.

    Warm-up: linear from ``warmup_factor`` (default 1 / (warmup_epochs + 1)) at the first epoch
    to 1. Then ``cosine`` from base_lr to eta_min over the remaining epochs, or ``multistep``:
    x gamma at each of ``steps`` (1-based epochs, as the official WarmupMultiStepLR counts:
    steps [30, 50] lower the rate from the 30th and the 50th epoch on)."""
    warm = 1.0
    if epoch < warmup_epochs:
        start = 1.0 / (warmup_epochs + 1) if warmup_factor is None else warmup_factor
        warm = start + (1.0 - start) * epoch / warmup_epochs
    if schedule == "multistep":  # as the official WarmupMultiStepLR: a decay inside the warm-up applies too
        return warm * gamma ** bisect.bisect_right(list(steps), epoch + 1)
    if epoch < warmup_epochs:
        return warm
    span = max(1, epochs - warmup_epochs)
    progress = min(1.0, (epoch - warmup_epochs) / span)
    floor = min(1.0, eta_min / base_lr)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_factor(epoch: int, epochs: int, warmup_epochs: int, base_lr: float, eta_min: float) -> float:
    """``lr_factor`` of the cosine schedule with the default warm-up."""
    return lr_factor(epoch, epochs, warmup_epochs, base_lr, eta_min)


def build_scheduler(optimizer, epochs: int, warmup_epochs: int, eta_min: float, warmup_factor: float | None = None,
                    schedule: str = "cosine", steps: tuple = (), gamma: float = 0.1):
    """Per-epoch schedule (``lr_factor``) as a LambdaLR, one lambda per parameter group (each
    group's cosine ends at eta_min), so its state checkpoints."""
    def factor_for(base: float):
        return lambda e: lr_factor(e, epochs, warmup_epochs, base, eta_min, warmup_factor, schedule, steps, gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor_for(g["lr"]) for g in optimizer.param_groups])


def adam(params, device: torch.device, **defaults) -> torch.optim.Adam:
    """Adam over ``params`` (tensors or groups); on CUDA the fused implementation (one kernel
    for every parameter instead of a loop of small ones), elsewhere PyTorch's default."""
    return torch.optim.Adam(params, fused=True if device.type == "cuda" else None, **defaults)


def match_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """After loading a checkpoint: an optimizer state saved on another kind of device keeps
    this device's implementation (fused on CUDA only)."""
    for group in optimizer.param_groups:
        if "fused" in group:
            group["fused"] = True if device.type == "cuda" else None


def autocast_for(device: torch.device, amp: bool):
    """bf16 autocast on CUDA when amp is on; a no-op elsewhere."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


class StepMetrics:
    """Per-step numbers kept as device tensors until ``flush``, which moves them to the host in
    one transfer, raises NonFiniteLossError on a non-finite loss, and logs each step."""

    SEND_SECONDS = 5.0

    def __init__(self, tracker: Tracker, stage: str):
        self.tracker, self.stage = tracker, stage
        self.rows: list[tuple[int, dict]] = []
        self._epoch_sum: torch.Tensor | None = None
        self._epoch_steps = 0

    def add(self, step: int, values: dict) -> None:
        """Keep one step's numbers; its ``loss`` also counts toward ``epoch_loss``."""
        self.rows.append((step, values))
        loss = values.get("loss")
        if isinstance(loss, torch.Tensor):
            loss = loss.detach()
            self._epoch_sum = loss if self._epoch_sum is None else self._epoch_sum + loss
            self._epoch_steps += 1

    def epoch_loss(self) -> float:
        """Mean ``loss`` of the steps added since the last call (NaN for none); starts a new epoch."""
        value = float(self._epoch_sum) / self._epoch_steps if self._epoch_steps else float("nan")
        self._epoch_sum, self._epoch_steps = None, 0
        return value

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
        # to the store every few seconds: the UI shows the run as it goes, a kill loses little, and
        # a short log_every does not turn into one database write per few steps
        self.tracker.flush(min_interval=self.SEND_SECONDS)
        return last


@dataclass(frozen=True)
class PromptStageSettings:
    epochs: int
    lr: float
    batch_size: int
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    warmup_factor: float | None = None
    eta_min: float = 1e-6
    reg_weight: float = 0.001
    logit_scale: float | None = None  # None: CLIP's learned logit_scale
    logit_mode: str = "cosine_scaled"  # or raw_dot: unnormalised features, temperature 1 (official)
    amp: bool = True
    log_every: int = 20

    @classmethod
    def from_config(cls, cfg: Config) -> "PromptStageSettings":
        warmup = cfg.warmup_epochs if cfg.warmup_epochs_prompt is None else cfg.warmup_epochs_prompt
        factor = cfg.warmup_factor if cfg.warmup_factor_prompt is None else cfg.warmup_factor_prompt
        return cls(epochs=cfg.epochs_prompt, lr=cfg.prompt_lr, batch_size=cfg.batch_size,
                   weight_decay=cfg.weight_decay, warmup_epochs=warmup, warmup_factor=factor, eta_min=cfg.eta_min,
                   reg_weight=cfg.prompt_reg_weight, logit_scale=cfg.contrastive_logit_scale,
                   logit_mode=cfg.prompt_logit_mode, amp=cfg.amp, log_every=cfg.log_every)


@dataclass(frozen=True)
class ImageStageSettings:
    epochs: int
    lr: float
    loss_list: tuple = ("id", "triplet", "center", "i2t", "t2i")
    weight_decay: float = 1e-4
    weight_decay_bias: float | None = None  # None: weight_decay
    bias_lr_factor: float = 1.0
    warmup_epochs: int = 0
    warmup_factor: float | None = None
    lr_schedule: str = "cosine"
    lr_steps: tuple = ()
    lr_gamma: float = 0.1
    eta_min: float = 1e-6
    center_lr: float = 0.5
    center_loss_weight: float = 0.0003
    triplet_margin: float | None = 0.3
    label_smoothing: float = 0.0
    loss_weights: dict = field(default_factory=lambda: {"id": 1.0, "triplet": 1.0, "i2t": 1.0, "t2i": 1.0})
    i2t_mode: str = "batch_supcon"
    i2t_label_smoothing: float = 0.0
    i2t_logit_mode: str = "cosine_scaled"
    freeze_prompt: bool = True
    train_text_encoder: bool = False
    logit_scale: float | None = None
    train_feature: str = "normalized"
    pre_proj: bool = False  # the pre-projection branch (official test_feature proj_and_pre_proj)
    eval_neck: str = "before"
    select_metric: str = "rank1"
    amp: bool = True
    log_every: int = 20
    max_rank: int = 50
    val_every: int = 1
    val_start: int = 1
    global_batch: bool = True  # under DDP: losses on the gathered global batch (False: each rank's share)

    @classmethod
    def from_config(cls, cfg: Config) -> "ImageStageSettings":
        return cls(epochs=cfg.epochs_image, lr=cfg.lr, loss_list=cfg.losses, weight_decay=cfg.weight_decay,
                   weight_decay_bias=cfg.weight_decay_bias, bias_lr_factor=cfg.bias_lr_factor,
                   warmup_epochs=cfg.warmup_epochs, warmup_factor=cfg.warmup_factor, lr_schedule=cfg.lr_schedule,
                   lr_steps=tuple(cfg.lr_steps), lr_gamma=cfg.lr_gamma, eta_min=cfg.eta_min,
                   center_lr=cfg.center_lr, center_loss_weight=cfg.center_loss_weight,
                   triplet_margin=cfg.triplet_margin, label_smoothing=cfg.label_smoothing,
                   loss_weights={"id": cfg.id_loss_weight, "triplet": cfg.triplet_loss_weight,
                                 "i2t": cfg.i2t_loss_weight, "t2i": cfg.t2i_loss_weight},
                   i2t_mode=cfg.i2t_mode, i2t_label_smoothing=cfg.i2t_label_smoothing,
                   i2t_logit_mode=cfg.i2t_logit_mode, freeze_prompt=cfg.freeze_prompt,
                   train_text_encoder=cfg.train_text_encoder, logit_scale=cfg.contrastive_logit_scale,
                   train_feature=cfg.train_feature, pre_proj=cfg.test_feature == "proj_and_pre_proj",
                   eval_neck=cfg.eval_neck_feat, select_metric=cfg.select_metric, amp=cfg.amp,
                   log_every=cfg.log_every, max_rank=cfg.max_rank, val_every=cfg.val_every,
                   val_start=cfg.val_start or 1,
                   global_batch=cfg.ddp_global_batch)

    @property
    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(neck=self.eval_neck, normalized=self.train_feature == "normalized", pre_proj=self.pre_proj)


def logit_scale_of(clip_model: nn.Module, fixed: float | None) -> torch.Tensor | float:
    return fixed if fixed is not None else clip_model.logit_scale.detach().exp()


def cache_image_features(clip_model: nn.Module, loader, device: torch.device, amp: bool = True):
    """Frozen, unnormalised CLIP image features (projected) of every image of ``loader`` (test
    transforms) and their labels, on ``device``: the prompt stage never runs the image encoder
    again, and normalises them itself when its logits are cosines."""
    feats = extract_features(clip_model, loader, device, FeatureSpec(normalized=False), amp=amp, normalize=False)
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
    raw_dot = settings.logit_mode == "raw_dot"
    if not raw_dot:
        image_feats = F.normalize(image_feats.float(), dim=1)
    clip_model.eval()
    prompt_learner.train()
    optimizer = adam(prompt_learner.parameters(), device, lr=settings.lr, weight_decay=settings.weight_decay)
    scheduler = build_scheduler(optimizer, settings.epochs, settings.warmup_epochs, settings.eta_min,
                                settings.warmup_factor)
    scale = 1.0 if raw_dot else logit_scale_of(clip_model, settings.logit_scale)
    buffer = StepMetrics(tracker, "prompt")
    run = distributed.data_parallel([prompt_learner], device)

    def encode(lab: torch.Tensor) -> torch.Tensor:
        """The text features of the batch's classes; under DDP each rank encodes its share of
        the classes and every rank gets the whole batch's."""
        start, end = distributed.shard_bounds(len(lab))
        with autocast_for(device, settings.amp):
            text = text_features(clip_model, prompt_learner, lab[start:end], normalize=not raw_dot).float()
        return distributed.gather_rows(text, distributed.shard_sizes(len(lab)))

    n = image_feats.shape[0]
    batches = math.ceil(n / settings.batch_size)  # the last, partial batch too (as the official code)
    step = start_step
    epoch_loss = torch.zeros((), device=device)
    retrieval: dict = {}
    last: dict = {}
    bar = tqdm(range(settings.epochs), desc="prompt stage", unit="epoch", dynamic_ncols=True,
               disable=not console_on())
    for epoch in bar:
        lr = optimizer.param_groups[0]["lr"]
        perm = distributed.broadcast(torch.randperm(n, device=device))  # one batch order for every rank
        epoch_loss.zero_()
        for b in range(batches):
            idx = perm[b * settings.batch_size:(b + 1) * settings.batch_size]
            img, lab = image_feats[idx], labels[idx]
            text = run(encode, lab)
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
                    "prompt_class_var": ctx.var(dim=0).mean() if ctx.shape[0] > 1 else torch.zeros((), device=device),
                    "prompt_grad": grad.norm() if grad is not None else torch.zeros((), device=device),
                    "logits_std": (img @ text.t() * scale).std(correction=0), "lr": lr})
            epoch_loss += loss.detach()
            step += 1
            if (step - start_step) % settings.log_every == 0:
                last = buffer.flush() or last
        last = buffer.flush() or last
        scheduler.step()
        retrieval = validate_stage1_prompts(clip_model, prompt_learner, image_feats, labels, raw_dot=raw_dot)
        tracker.log_metrics({"prompt_rank1": retrieval["rank1"], "prompt_mAP": retrieval["mAP"],
                             "prompt_epoch_loss": float(epoch_loss) / batches}, step=epoch + 1)
        tracker.flush()
        bar.set_postfix(loss=f"{float(epoch_loss) / batches:.3f}", r1=f"{retrieval['rank1']:.1f}",
                        norm=f"{last.get('prompt_norm', float('nan')):.3f}")
    final_loss = float(epoch_loss) / batches
    log(f"prompt stage: {settings.epochs} epochs, loss {final_loss:.4f}, image-to-prompt rank1 "
        f"{retrieval.get('rank1', float('nan')):.2f} mAP {retrieval.get('mAP', float('nan')):.2f}")
    if checkpoint_path is not None and distributed.is_main():
        save_checkpoint(checkpoint_path, model=prompt_learner, optimizer=optimizer, scheduler=scheduler,
                        metadata={**(metadata or {}), "stage": "prompt", "progress": {"global_step": step}},
                        epoch=settings.epochs, train_loss=final_loss,
                        val_metrics={"prompt_rank1": retrieval["rank1"], "prompt_mAP": retrieval["mAP"]},
                        tag="FINAL", log=log)
    del run
    if distributed.active():
        gc.collect()  # this stage's DDP (and its gradient hooks on the prompt) is gone before the next one starts
    return {"prompt_loss": final_loss, "prompt_rank1": retrieval["rank1"], "prompt_mAP": retrieval["mAP"],
            "steps": step - start_step, "seconds": time.perf_counter() - started,
            "image_feats": image_feats, "labels": labels}


def _image_stage_trainables(clip_model: nn.Module, prompt_learner: nn.Module | None,
                            settings: ImageStageSettings, log: Log) -> list[nn.Parameter]:
    """Set which parameters train in the image stage and return them: the image encoder, the
    head (BNNeck weights, their bias stays frozen as in BoT, and ID classifiers); the text
    encoder and the prompt when asked."""
    freeze_entire_clip_model(clip_model)
    unfreeze_clip_image_encoder(clip_model, log)
    for p in head_parameters(clip_model):
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


def param_groups(named: list[tuple[str, nn.Parameter]], params: list[nn.Parameter], lr: float, weight_decay: float,
                 bias_lr_factor: float = 1.0, weight_decay_bias: float | None = None) -> list[dict]:
    """Adam parameter groups of ``params`` (named by ``named``): biases get lr x bias_lr_factor and
    weight_decay_bias (the official make_optimizer_2stage); everything else lr and weight_decay."""
    wanted = {id(p) for p in params}
    bias = [p for n, p in named if id(p) in wanted and "bias" in n]
    bias_ids = {id(p) for p in bias}
    rest = [p for p in params if id(p) not in bias_ids]
    groups = [{"params": rest, "lr": lr, "weight_decay": weight_decay}]
    if bias:
        decay = weight_decay if weight_decay_bias is None else weight_decay_bias
        groups.append({"params": bias, "lr": lr * bias_lr_factor, "weight_decay": decay})
    return groups


def _param_groups(clip_model: nn.Module, prompt_learner: nn.Module | None, params: list[nn.Parameter],
                  settings: ImageStageSettings) -> list[dict]:
    """The image stage's Adam groups (``param_groups`` over CLIP and the prompt learner)."""
    named = list(clip_model.named_parameters())
    if prompt_learner is not None:
        named += [(f"prompt_learner.{n}", p) for n, p in prompt_learner.named_parameters()]
    return param_groups(named, params, settings.lr, settings.weight_decay, settings.bias_lr_factor,
                        settings.weight_decay_bias)


def eval_splits(loaders) -> tuple[EvalSplit, EvalSplit]:
    """(selection split, test split) of ``data.Loaders``: selection reads the validation hold-out
    when there is one, else the test query/gallery."""
    data = loaders.data
    test = EvalSplit("test", loaders.query, loaders.gallery, [r.pid for r in data.query],
                     [r.pid for r in data.gallery], *(([r.camid for r in data.query], [r.camid for r in data.gallery])
                                                      if data.has_cameras else (None, None)))
    if getattr(loaders, "val_query", None) is None:
        return test, test
    cams = (([r.camid for r in data.val_query], [r.camid for r in data.val_gallery])
            if data.val_has_cameras else (None, None))
    val = EvalSplit("val", loaders.val_query, loaders.val_gallery, [r.pid for r in data.val_query],
                    [r.pid for r in data.val_gallery], *cams)
    return val, test


METRIC_KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")


class Selection:
    """The per-epoch bookkeeping every ReID training stage shares: validation numbers to the
    tracker, BEST chosen on the selection split's ``select_metric``, BEST and LAST checkpoints,
    pruning reports, and at the end the one evaluation of BEST and FINAL on the test split.

    ``save(tag, epoch)`` writes a checkpoint (None: nothing is saved); ``progress(step,
    start_step)`` is what a checkpoint's metadata records so that a resumed stage goes on
    exactly (``resume``)."""

    def __init__(self, name: str, select: str, split: EvalSplit, tracker: Tracker, log: Log, epochs: int,
                 every: int = 1, start: int = 1):
        self.name, self.select, self.split, self.tracker, self.log = name, select, split, tracker, log
        self.epochs, self.every, self.start = epochs, every, start
        self._counted = False
        self.best = {k: (-1.0 if k == select else 0.0) for k in METRIC_KEYS}
        self.best_state: dict | None = None
        self.best_epoch = 0
        self.metrics: dict = {}
        self.train_loss = float("nan")

    def resume(self, state: dict) -> tuple[int, int, int]:
        """Take a LAST checkpoint's bookkeeping; return (first epoch, global step, stage start step)."""
        progress = state["metadata"]["progress"]
        self.best_epoch, self.best = progress["best_epoch"], dict(progress["best"])
        self.metrics, self.train_loss = dict(state["val_metrics"]), state["train_loss"]
        step = progress["global_step"]
        return state["epoch"], step, step - progress["stage_steps"]

    def progress(self, step: int, start_step: int) -> dict:
        return {"global_step": step, "stage_steps": step - start_step, "best": self.best,
                "best_epoch": self.best_epoch}

    @property
    def val_metrics(self) -> dict:
        return {k: v for k, v in self.metrics.items() if k != "num_valid_q"}

    def due(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) is validated: every ``every``-th epoch from epoch
        ``start`` (1-based) on, and the last."""
        return epoch + 1 == self.epochs or (epoch + 1 >= self.start and (epoch + 1) % self.every == 0)

    def end_epoch(self, epoch: int, lr: float, train_loss: float, metrics: dict | None, model: nn.Module,
                  save: Callable[[str, int], None] | None, report: Report | None, extra: dict | None = None) -> None:
        """Log epoch ``epoch`` (0-based): its ``train_loss`` and, when it was validated, its
        ``metrics`` (plus ``extra`` numbers); keep BEST, write BEST and LAST, report to the pruner.
        An epoch without validation (``metrics`` None) only logs its loss and writes LAST."""
        self.train_loss = train_loss
        if metrics is None:
            self.tracker.log_metrics({"epoch_loss": train_loss}, step=epoch + 1)
            self.tracker.flush()
            first = min(self.epochs, -(-self.start // self.every) * self.every)  # the first multiple from start
            when = (f"first validation at epoch {first}" if epoch + 1 < self.start
                    else f"validated every {self.every} epochs")
            self.log(f"{self.name} epoch {epoch + 1}/{self.epochs}: loss {train_loss:.4f} lr {lr:.2e} ({when})")
            if save is not None:
                save("LAST", epoch + 1)
            return
        self.metrics = metrics
        self.tracker.log_metrics({k: metrics[k] for k in METRIC_KEYS} | {"epoch_loss": train_loss} | (extra or {}),
                                 step=epoch + 1)
        self.tracker.flush()
        split = self.split
        if not self._counted:
            self._counted = True
            self.tracker.log_metrics({"num_valid_selection_query": metrics["num_valid_q"]}, step=0)
            if metrics["num_valid_q"] < len(split.q_pids):
                self.log(f"{split.name}: {metrics['num_valid_q']} of {len(split.q_pids)} queries have a match left "
                         f"once same-identity same-camera gallery images are removed; the others are skipped")
        improved = metrics[self.select] > self.best[self.select]
        self.log(f"{self.name} epoch {epoch + 1}/{self.epochs}: loss {train_loss:.4f} lr {lr:.2e} | {split.name} rank1 "
                 f"{metrics['rank1']:.2f} rank5 {metrics['rank5']:.2f} rank10 {metrics['rank10']:.2f} "
                 f"mAP {metrics['mAP']:.2f}" + ("  (best)" if improved else ""))
        if improved:
            self.best, self.best_epoch = {k: float(v) for k, v in metrics.items()}, epoch + 1
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            if save is not None:
                save("BEST", epoch + 1)
        if save is not None:
            save("LAST", epoch + 1)  # what a resumed run starts from
        if report is not None:
            report(epoch + 1, metrics)

    def finish(self, model: nn.Module, test: Callable[[], dict], best_path: Path | None, device: torch.device,
               seconds: float, steps: int) -> dict:
        """Evaluate FINAL (the model as it is) and BEST on the test split once (``test()`` ranks
        it with the model's current weights); return the stage's result."""
        final_test = test()
        if self.best_state is None and self.best_epoch and best_path is not None:  # resumed: BEST is on disk
            self.best_state = load_checkpoint(best_path, model=model, device=device,
                                              restore_rng=False)["model_state_dict"]
        if self.best_state is not None and self.best_epoch != self.epochs:
            model.load_state_dict(self.best_state)
            best_test = test()
        else:
            best_test = final_test
        best, metrics = self.best, self.metrics
        self.log(f"test split: BEST (epoch {self.best_epoch}, selected on {self.split.name} {self.select}) rank1 "
                 f"{best_test['rank1']:.2f} mAP {best_test['mAP']:.2f} mINP {best_test['mINP']:.2f} | FINAL rank1 "
                 f"{final_test['rank1']:.2f} mAP {final_test['mAP']:.2f} mINP {final_test['mINP']:.2f}")
        return {"best_rank1": best["rank1"], "best_mAP": best["mAP"], "best_rank5": best["rank5"],
                "best_rank10": best["rank10"], "best_mINP": best.get("mINP", 0.0), "best_epoch": self.best_epoch,
                **{f"final_{k}": metrics[k] for k in METRIC_KEYS},
                **{f"test_{k}": best_test[k] for k in METRIC_KEYS},
                **{f"final_test_{k}": final_test[k] for k in METRIC_KEYS},
                "selection": self.split.name, "steps": steps, "seconds": seconds}


def train_clipreid_image_stage(clip_model: nn.Module, prompt_learner: nn.Module | None, loaders,
                               settings: ImageStageSettings, device: torch.device, tracker: Tracker,
                               log: Log = print, report: Report | None = None,
                               checkpoint_path: Callable[[str], Path] | None = None,
                               metadata: dict | None = None, start_step: int = 0,
                               resume_from: Path | None = None, generator: torch.Generator | None = None) -> dict:
    """Fine-tune the image encoder (+ the head; the text encoder when asked) and validate each
    epoch on the selection split (``eval_splits``: the validation hold-out, else the test split).
    ``loaders`` is ``data.Loaders``; ``prompt_learner`` may be None when no loss needs text.
    ``checkpoint_path(tag)`` names the ``BEST`` / ``FINAL`` files; BEST is the epoch with the
    highest ``select_metric``; ``report(epoch, metrics)`` gets every validation (pruning hooks in
    here). A ``LAST`` checkpoint is written after every epoch (unless ``checkpoint_path("LAST")``
    is None); ``resume_from`` (such a file)
    restores the whole training state and goes on from the epoch after it. ``generator`` (the
    run's own, ``checkpoint.own_generator``; None: the global one) gives every random number the
    stage draws: the centers' initial values (the augmentation is seeded per image,
    ``data.SeededBatches``). At the end the BEST
    and FINAL models are evaluated once on the test split. Returns ``best_*`` and ``final_*``
    (selection split), ``test_*`` (BEST on test), ``final_test_*`` (FINAL on test), ``best_epoch``,
    ``selection``, ``steps`` and ``seconds``."""
    started = time.perf_counter()
    losses = build_loss(settings.loss_list)
    use_text = losses.needs_text and prompt_learner is not None
    clip_model.visual = distributed.sync_batchnorm(clip_model.visual, device, log)
    params = _image_stage_trainables(clip_model, prompt_learner, settings, log)
    text_trains = use_text and (settings.train_text_encoder or not settings.freeze_prompt)
    optimizer = adam(_param_groups(clip_model, prompt_learner, params, settings), device)
    scheduler = build_scheduler(optimizer, settings.epochs, settings.warmup_epochs, settings.eta_min,
                                settings.warmup_factor, settings.lr_schedule, settings.lr_steps, settings.lr_gamma)
    center = CenterLoss(loaders.data.num_classes, clip_model.bottleneck.num_features, generator).to(device)
    optimizer_center = torch.optim.SGD(center.parameters(), lr=settings.center_lr)
    selection, test = eval_splits(loaders)
    book = Selection("image", settings.select_metric, selection, tracker, log, settings.epochs, settings.val_every,
                     settings.val_start)
    step, first_epoch = start_step, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model=clip_model, device=device, optimizer=optimizer,
                                scheduler=scheduler, prompt_learner=prompt_learner,
                                extra_modules={"center_loss": center}, extra_optimizers={"center": optimizer_center},
                                restore_rng=generator is None, log=log)
        restore_generator(generator, state)
        match_device(optimizer, device)
        first_epoch, step, start_step = book.resume(state)
        log(f"resuming the image stage after epoch {first_epoch} (global step {step})")
    raw_dot = settings.i2t_logit_mode == "raw_dot"
    scale = 1.0 if raw_dot else logit_scale_of(clip_model, settings.logit_scale)
    normalized = settings.train_feature == "normalized"
    all_classes = settings.i2t_mode == "all_classes"
    weights = settings.loss_weights

    cached_text = None
    if use_text and (not text_trains or all_classes):
        # Nothing on the text side trains (config refuses all_classes with a training text side):
        # encode every class once, not every batch, as the official stage 2 does.
        with torch.no_grad(), autocast_for(device, settings.amp):
            cached_text = all_text_features(clip_model, prompt_learner, normalize=not raw_dot).float()

    buffer = StepMetrics(tracker, "image")
    zero = torch.zeros((), device=device)
    branches = head_branches(clip_model)
    spec = settings.feature_spec

    def save(tag: str, epoch: int) -> None:
        path = checkpoint_path(tag)
        if path is None or not distributed.is_main():  # not kept (LAST of a run that is never resumed)
            return
        save_checkpoint(path, model=clip_model, optimizer=optimizer, scheduler=scheduler,
                        classifier=branches[0][1], prompt_learner=prompt_learner,
                        extra_modules={"center_loss": center}, extra_optimizers={"center": optimizer_center},
                        metadata={**(metadata or {}), "stage": "image", "progress": book.progress(step, start_step)},
                        epoch=epoch, train_loss=book.train_loss, val_metrics=book.val_metrics, tag=tag,
                        log=log if tag != "LAST" else None, prompt_file=tag != "LAST", generator=generator)

    run = distributed.data_parallel([clip_model, prompt_learner, center if losses.center else None], device)

    def forward(images: torch.Tensor, labels: torch.Tensor):
        """The losses of one batch: (loss, its parts, BNNeck features, logits). Under DDP
        ``images`` and ``labels`` are this rank's share; the features are gathered into the
        global batch before the head, so every loss sees the whole batch."""
        gather = distributed.batch_gather(len(labels), settings.global_batch)
        with autocast_for(device, settings.amp):
            raw = [gather(f) for f in image_features_for_head(clip_model, images, settings.pre_proj, normalized=False)]
            if use_text and cached_text is None:
                text = gather(text_features(clip_model, prompt_learner, labels, normalize=not raw_dot).float())
            labels = gather(labels)
            feats = [F.normalize(f, dim=1) for f in raw] if normalized else raw
            feats_bn = [bottleneck(f) for (bottleneck, _), f in zip(branches, feats)]
            logits = [classifier(f, labels) for (_, classifier), f in zip(branches, feats_bn)]
            if use_text and cached_text is not None:
                text = cached_text if all_classes else cached_text[labels]
        image_text = raw[0] if raw_dot else feats[0] if normalized else F.normalize(raw[0], dim=1)
        parts = {
            "id_loss": sum(id_loss(l, labels, settings.label_smoothing) for l in logits) if losses.id else zero,
            "tri_loss": sum(triplet_loss(f, labels, settings.triplet_margin) for f in feats)
            if losses.triplet else zero,
            "center_loss": center(feats_bn[0], labels) if losses.center else zero,
            "i2t_loss": zero, "t2i_loss": zero,
        }
        if use_text:
            if losses.i2t:
                parts["i2t_loss"] = (i2t_all_classes_loss(image_text, text, labels, scale,
                                                          settings.i2t_label_smoothing) if all_classes
                                     else supcon_loss(image_text, text, labels, labels, scale))
            if losses.t2i:
                parts["t2i_loss"] = supcon_loss(text, image_text, labels, labels, scale)
        loss = (weights["id"] * parts["id_loss"] + weights["triplet"] * parts["tri_loss"]
                + weights["i2t"] * parts["i2t_loss"] + weights["t2i"] * parts["t2i_loss"]
                + settings.center_loss_weight * parts["center_loss"])
        return loss, parts, feats_bn, logits

    for epoch in range(first_epoch, settings.epochs):
        loaders.sampler.set_epoch(epoch)
        clip_model.train()
        if prompt_learner is not None:
            prompt_learner.train()
        lr = optimizer.param_groups[0]["lr"]
        bar = tqdm(loaders.train, desc=f"image stage {epoch + 1}/{settings.epochs}", unit="batch",
                   dynamic_ncols=True, leave=False, disable=not console_on())
        for images, labels, _, _ in bar:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            loss, parts, feats_bn, logits = run(forward, images, labels)
            optimizer.zero_grad(set_to_none=True)
            optimizer_center.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if losses.center:
                center.rescale_grad(settings.center_loss_weight)
                optimizer_center.step()
            with torch.no_grad():
                row = {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()},
                       "feat_norm": feats_bn[0].detach().float().norm(dim=1).mean(),
                       "arc_conf": logits[0].detach().float().softmax(1).amax(1).mean(), "lr": lr}
            buffer.add(step, row)
            step += 1
            if (step - start_step) % settings.log_every == 0:
                last = buffer.flush()
                bar.set_postfix(loss=f"{last['loss']:.3f}", id=f"{last['id_loss']:.3f}",
                                tri=f"{last['tri_loss']:.3f}", cen=f"{last['center_loss']:.1f}",
                                feat_n=f"{last['feat_norm']:.2f}", arc_c=f"{last['arc_conf']:.2f}")
        buffer.flush()
        scheduler.step()
        distributed.sync_buffers(clip_model)  # DDP: every rank validates with what the checkpoint holds
        metrics = (validate(clip_model, selection, device, spec, max_rank=settings.max_rank, amp=settings.amp)
                   if book.due(epoch) else None)
        book.end_epoch(epoch, lr, buffer.epoch_loss(), metrics, clip_model, save if checkpoint_path is not None else None,
                       report)
    if checkpoint_path is not None:
        save("FINAL", settings.epochs)
    return book.finish(clip_model, lambda: validate(clip_model, test, device, spec, max_rank=settings.max_rank,
                                                    amp=settings.amp),
                       checkpoint_path("BEST") if checkpoint_path is not None else None, device,
                       time.perf_counter() - started, step - start_step)
