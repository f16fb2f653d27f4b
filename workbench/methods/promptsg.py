"""PromptSG (Yang et al., "A Pedestrian is Worth One Prompt", CVPR 2024): one end-to-end stage.

An inversion network maps each image's global CLIP feature to a pseudo-word token s*; the
composed prompt "A photo of a s* {aspect} hand." goes through CLIP's frozen text encoder and
gives l_p; a multimodal interaction module (cross-attention with l_p as the query over the
image's global and local tokens, then self-attention blocks) gives the ReID feature, trained
with ID and triplet losses (BNNeck), while SupCon between the global image feature and l_p
(both directions, weight lambda) teaches the inversion network. The modules are registered on
the CLIP model (``clip_model.promptsg``), so its checkpoints hold them.

The diagnostics exist to catch the failure the original research code had (fusion over one
key, contrastive weight 0: the text branch inert): ``attn_entropy`` (1 = uniform attention,
text ignored), ``prompt_sensitivity`` (cosine between composed- and simplified-prompt
features; 1 = the pseudo-token changes nothing), gradient norms per part, and the composed,
simplified and global-only metrics side by side.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..checkpoint import load_checkpoint, restore_generator, save_checkpoint
from ..config import Config, ConfigError
from ..evaluation import EvalSplit, FeatureSpec, as_percent, cosine_distance, gather_shards, reid_metrics
from ..heads import head_branches, head_parameters
from ..losses import CenterLoss, LossSet, build_loss, id_loss, supcon_loss, triplet_loss
from ..model import (check_prompt_fits, encode_image_tokens, encode_prompt_embeddings, freeze_entire_clip_model,
                     image_encoder_parameters, resolve_model_name, slot_prompt, unfreeze_clip_image_encoder)
from ..stages import (ImageStageSettings, Log, Report, Selection, StepMetrics, adam, autocast_for, build_scheduler,
                      console_on, eval_splits, logit_scale_of, match_device, param_groups)
from ..tracking import Tracker

PROMPTS = ("composed", "simplified")
# Per-epoch numbers validate_promptsg adds to rank1/5/10, mAP and mINP.
VALIDATION_KEYS = ("composed_rank1", "composed_mAP", "simplified_rank1", "simplified_mAP", "global_rank1",
                   "global_mAP", "prompt_sensitivity", "val_loss", "val_top1", "val_top5", "val_top10")
STEP_KEYS = ("pseudo_norm", "pseudo_ratio", "pos_cos", "attn_entropy", "mim_shift", "grad_visual", "grad_inversion",
             "grad_mim")


# ----------------------------------------------------------------------------- modules

class InversionNetwork(nn.Module):
    """Image feature -> pseudo-word token: Linear-ReLU-Linear-ReLU-Linear (hidden ``hidden``), then
    BatchNorm1d. The BatchNorm's scale starts at ``word_norm / sqrt(width)``, so that s* starts
    with the mean norm of CLIP's word embeddings instead of sqrt(width) times it (a token far
    off the vocabulary's scale dominates the frozen text encoder)."""

    def __init__(self, in_dim: int, width: int, hidden: int = 512, word_norm: float = 1.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, hidden),
                                 nn.ReLU(inplace=True), nn.Linear(hidden, width))
        self.norm = nn.BatchNorm1d(width)
        nn.init.constant_(self.norm.weight, word_norm / math.sqrt(width))

    global_batch = True  # under DDP, BatchNorm statistics over the global batch (ddp_global_batch)

    def forward(self, image_feats: torch.Tensor) -> torch.Tensor:
        return distributed.batch_norm_over_ranks(self.norm, self.mlp(image_feats), self.global_batch)


class MultimodalInteraction(nn.Module):
    """Cross-attention with the text feature as the only query over the image's tokens (global
    first, then local), then ``blocks`` pre-norm self-attention + feed-forward blocks.

    ``fusion`` query: the blocks run over [text query token + its cross-attention output, image
    tokens] and the output is the query token; reweight: the image tokens are scaled by the
    cross-attention map (times the number of tokens, so uniform attention leaves them as they
    are), the blocks run over them and the output is the global token. Returns (feature (B, D),
    attention (B, heads, tokens))."""

    def __init__(self, dim: int, heads: int = 8, blocks: int = 2, fusion: str = "query"):
        super().__init__()
        self.fusion = fusion
        self.norm_query, self.norm_tokens = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                                               batch_first=True, norm_first=True)
                                    for _ in range(blocks))
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, text: torch.Tensor, global_feat: torch.Tensor,
                tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = torch.cat([global_feat[:, None], tokens], dim=1).to(text.dtype)
        query = text[:, None]
        keys = self.norm_tokens(visual)
        attended, attn = self.cross(self.norm_query(query), keys, keys, need_weights=True,
                                    average_attn_weights=False)
        attn = attn[:, :, 0]  # (B, heads, tokens): the one query's attention
        if self.fusion == "query":
            x = torch.cat([query + attended, visual], dim=1)
        else:
            x = visual * (attn.mean(1) * visual.shape[1]).unsqueeze(-1).to(visual.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm_out(x[:, 0]), attn


class PromptSG(nn.Module):
    """PromptSG's parts beside CLIP: the inversion network, the interaction module, and the
    composed ("A photo of a X {body}.") and simplified ("A photo of a {body}.") prompts as
    frozen token embeddings (not saved: rebuilt from the tokenizer)."""

    def __init__(self, clip_model: nn.Module, model_name: str, body: str, embed_dim: int, hidden: int = 512,
                 heads: int = 8, blocks: int = 2, fusion: str = "query"):
        super().__init__()
        if embed_dim % heads:
            raise ConfigError(f"mim_heads: {heads} heads do not divide CLIP's embedding width {embed_dim}")
        composed = slot_prompt(clip_model, model_name, body, 1, "promptsg_template", "", "shorten promptsg_template")
        simplified = slot_prompt(clip_model, model_name, body, 0, "promptsg_template", "", "shorten promptsg_template")
        self.composed_text, self.simplified_text = composed.text, simplified.text
        words = clip_model.token_embedding.weight.detach()
        self.register_buffer("word_norm", words.float().norm(dim=1).mean().cpu(), persistent=False)
        self.register_buffer("prefix", composed.prefix, persistent=False)
        self.register_buffer("suffix", composed.suffix, persistent=False)
        self.register_buffer("simplified", torch.cat([simplified.prefix, simplified.suffix], dim=1), persistent=False)
        width = words.shape[1]
        self.inversion = InversionNetwork(embed_dim, width, hidden, float(self.word_norm))
        self.mim = MultimodalInteraction(embed_dim, heads, blocks, fusion)

    def compose(self, pseudo: torch.Tensor) -> torch.Tensor:
        """Token embeddings of the composed prompt with each row's pseudo-token in the slot: (B, L, width)."""
        batch = pseudo.shape[0]
        return torch.cat([self.prefix.expand(batch, -1, -1).to(pseudo.dtype), pseudo[:, None],
                          self.suffix.expand(batch, -1, -1).to(pseudo.dtype)], dim=1)


def check_promptsg(cfg: Config) -> None:
    """PromptSG's config mistakes that need the model's shape, found from open_clip's model
    config before a run exists: heads that do not divide the embedding width, a template longer
    than CLIP's context."""
    name = resolve_model_name(cfg.model_type)
    embed_dim = int(open_clip.get_model_config(name)["embed_dim"])
    if embed_dim % cfg.mim_heads:
        raise ConfigError(f"mim_heads: {cfg.mim_heads} heads do not divide CLIP's embedding width {embed_dim}")
    check_prompt_fits(name, cfg.promptsg_template.format(aspect=cfg.aspect).strip(), 1, None, "promptsg_template",
                      "", "shorten promptsg_template")


def register_promptsg(clip_model: nn.Module, cfg: Config, embed_dim: int) -> PromptSG:
    """Build PromptSG's modules for ``cfg`` and register them as ``clip_model.promptsg``."""
    module = PromptSG(clip_model, resolve_model_name(cfg.model_type),
                      cfg.promptsg_template.format(aspect=cfg.aspect).strip(), embed_dim, cfg.inversion_hidden,
                      cfg.mim_heads, cfg.mim_blocks, cfg.mim_fusion)
    clip_model.promptsg = module.to(clip_model.token_embedding.weight.device)
    return clip_model.promptsg


def forward_promptsg(clip_model: nn.Module, images: torch.Tensor, prompt: str = "composed",
                     text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One forward pass: ``global`` image feature, ``pseudo`` token (composed), ``text`` (l_p,
    unnormalised), the module's ``feature`` and ``attn``. ``text`` may carry the simplified
    prompt's feature, encoded once by the caller."""
    psg = clip_model.promptsg
    global_feat, tokens = encode_image_tokens(clip_model, images)
    out = {"global": global_feat}
    if prompt == "composed":
        out["pseudo"] = psg.inversion(global_feat)
        text = encode_prompt_embeddings(clip_model, psg.compose(out["pseudo"]), normalize=False)
    elif text is None:
        text = simplified_text_feature(clip_model)
    out["text"] = text.expand(global_feat.shape[0], -1)
    out["feature"], out["attn"] = psg.mim(out["text"], global_feat, tokens)
    return out


def simplified_text_feature(clip_model: nn.Module) -> torch.Tensor:
    """l_p of the simplified prompt (no pseudo-token), unnormalised: (1, embed_dim)."""
    return encode_prompt_embeddings(clip_model, clip_model.promptsg.simplified, normalize=False)


def promptsg_features(clip_model: nn.Module, images: torch.Tensor, prompt: str = "composed") -> list[torch.Tensor]:
    """The ReID feature (``FeatureSpec.encode``): the interaction module's output with ``prompt``."""
    return [forward_promptsg(clip_model, images, prompt)["feature"]]


def attention_entropy(attn: torch.Tensor) -> torch.Tensor:
    """Mean over the batch and heads of the attention's entropy over its keys, divided by
    log(number of keys): 1 for uniform attention (the query, the text, chooses nothing)."""
    p = attn.float().clamp_min(1e-12)
    return (-(p * p.log()).sum(-1) / math.log(attn.shape[-1])).mean()


# ----------------------------------------------------------------------------- settings

@dataclass(frozen=True)
class PromptSGSettings(ImageStageSettings):
    """The image stage's settings plus PromptSG's own: ``module_lr`` (the new modules; ``lr`` is
    the image encoder's), ``supcon_weight`` (lambda) and ``eval_prompt``."""

    module_lr: float = 5e-5
    supcon_weight: float = 0.5
    eval_prompt: str = "composed"

    @classmethod
    def from_config(cls, cfg: Config) -> "PromptSGSettings":
        base = ImageStageSettings.from_config(cfg)
        return cls(**{f.name: getattr(base, f.name) for f in fields(ImageStageSettings)},
                   module_lr=cfg.promptsg_module_lr, supcon_weight=cfg.promptsg_supcon_weight,
                   eval_prompt=cfg.promptsg_eval_prompt)

    @property
    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec(neck=self.eval_neck, normalized=self.train_feature == "normalized",
                           encode=functools.partial(promptsg_features, prompt=self.eval_prompt))


# ----------------------------------------------------------------------------- validation

@torch.no_grad()
def validate_promptsg(clip_model: nn.Module, split: EvalSplit, device: torch.device,
                      settings: PromptSGSettings = PromptSGSettings(epochs=1, lr=1e-5),
                      classes: dict | None = None, features: dict | None = None) -> dict:
    """PromptSG's validation on ``split``: rank-1/5/10, mAP and mINP (percent, ``reid_metrics``)
    with ``settings.eval_prompt``, plus rank-1 and mAP with the composed prompt, the simplified
    prompt and the global image feature alone (``composed_*``, ``simplified_*``, ``global_*``),
    and ``prompt_sensitivity``: the mean cosine between each image's composed- and
    simplified-prompt features (near 1: the pseudo-token changes nothing).

    With ``classes`` (training pid -> class index) and a ``val`` split whose query identities are
    training identities, also ``val_loss`` (the ID loss) and ``val_top1/5/10`` (classification
    accuracy, percent) on those query images; never on identities the classifier has not seen.
    ``features``, when given, receives the compared features (query, gallery) per prompt."""
    was_training = clip_model.training
    clip_model.eval()
    bottleneck, classifier = head_branches(clip_model)[0]
    normalized = settings.train_feature == "normalized"

    def head_input(f: torch.Tensor) -> torch.Tensor:
        f = f.float()
        f = F.normalize(f, dim=1) if normalized else f
        return bottleneck(f) if settings.eval_neck == "after" else f

    with autocast_for(device, settings.amp):
        simple = simplified_text_feature(clip_model)

    def extract(loader) -> dict[str, torch.Tensor]:
        parts: dict[str, list] = {"composed": [], "simplified": [], "global": [], "logits": []}
        for batch in loader:
            images = batch[0].to(device, non_blocking=True)
            with autocast_for(device, settings.amp):
                composed = forward_promptsg(clip_model, images, "composed")
                simplified = forward_promptsg(clip_model, images, "simplified", text=simple)
            feats = {"composed": head_input(composed["feature"]), "simplified": head_input(simplified["feature"])}
            parts["composed"].append(feats["composed"])
            parts["simplified"].append(feats["simplified"])
            parts["global"].append(F.normalize(composed["global"].float(), dim=1))
            chosen = composed if settings.eval_prompt == "composed" else simplified
            raw = chosen["feature"].float()
            parts["logits"].append(classifier(bottleneck(F.normalize(raw, dim=1) if normalized else raw)).float())
        return {k: gather_shards(v, loader, device).cpu() for k, v in parts.items()}

    query, gallery = extract(split.query), extract(split.gallery)
    clip_model.train(was_training)
    q_pids, g_pids = np.asarray(split.q_pids), np.asarray(split.g_pids)

    def rank(name: str) -> dict:
        return as_percent(reid_metrics(cosine_distance(query[name], gallery[name]), q_pids, g_pids, split.q_camids,
                                     split.g_camids, max_rank=settings.max_rank))

    ranked = {name: rank(name) for name in ("composed", "simplified", "global")}
    result = dict(ranked[settings.eval_prompt])
    for name, metrics in ranked.items():
        result[f"{name}_rank1"], result[f"{name}_mAP"] = metrics["rank1"], metrics["mAP"]
    both = [torch.cat([query[p], gallery[p]]) for p in PROMPTS]
    result["prompt_sensitivity"] = float(F.cosine_similarity(both[0], both[1], dim=1).mean())
    if classes is not None and split.name == "val":
        known = [i for i, pid in enumerate(split.q_pids) if pid in classes]
        if known:
            logits = query["logits"][known]
            labels = torch.as_tensor([classes[split.q_pids[i]] for i in known])
            result["val_loss"] = float(id_loss(logits, labels, settings.label_smoothing))
            top = logits.topk(min(10, logits.shape[1]), dim=1).indices == labels[:, None]
            for k in (1, 5, 10):
                result[f"val_top{k}"] = float(top[:, :k].any(1).float().mean()) * 100.0
    if features is not None:
        features.update({name: (query[name], gallery[name]) for name in ("composed", "simplified", "global")})
    return result


# ----------------------------------------------------------------------------- training

def _grad_norm(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _trainables(clip_model: nn.Module, log: Log) -> dict[str, list[nn.Parameter]]:
    """Freeze CLIP, then unfreeze what PromptSG trains: the image encoder (``visual``), and the
    new modules with the head (``modules``). The text encoder and token embeddings stay frozen."""
    freeze_entire_clip_model(clip_model)
    unfreeze_clip_image_encoder(clip_model, log)
    psg = clip_model.promptsg
    modules = [*head_parameters(clip_model), *psg.inversion.parameters(), *psg.mim.parameters()]
    for p in modules:
        p.requires_grad_(True)
    log(f"PromptSG modules and head: {sum(p.numel() for p in modules):,} parameters train; the text encoder is frozen")
    return {"visual": image_encoder_parameters(clip_model), "modules": modules,
            "inversion": list(psg.inversion.parameters()), "mim": list(psg.mim.parameters())}


def promptsg_loss(clip_model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: PromptSGSettings,
                  losses: LossSet, scale: float | torch.Tensor, center: CenterLoss | None = None):
    """PromptSG's training loss on one batch: ID and triplet (and center, when on) on the
    interaction module's output through the BNNeck, plus lambda x SupCon between the global
    image feature and the composed prompt's l_p in both directions (``i2t``/``t2i`` of
    ``losses``). Returns (loss, its parts, the forward pass with ``feat``, ``feat_bn``,
    ``logits`` and the L2-normalised ``image`` and ``text_unit``). Under DDP ``images`` and
    ``labels`` are this rank's share: the features are gathered into the global batch before the
    head and the losses (``pseudo`` and ``attn`` stay this rank's)."""
    bottleneck, classifier = head_branches(clip_model)[0]
    with autocast_for(images.device, settings.amp):
        out = forward_promptsg(clip_model, images, "composed")
        gather = distributed.batch_gather(len(labels), settings.global_batch)
        for key in ("feature", "global", "text"):
            out[key] = gather(out[key])
        labels = gather(labels)
        feat = out["feature"].float()
        out["feat"] = F.normalize(feat, dim=1) if settings.train_feature == "normalized" else feat
        out["feat_bn"] = bottleneck(out["feat"])
        out["logits"] = classifier(out["feat_bn"], labels)
    image = out["image"] = F.normalize(out["global"].float(), dim=1)
    text = out["text_unit"] = F.normalize(out["text"].float(), dim=1)
    zero = torch.zeros((), device=images.device)
    parts = {"id_loss": id_loss(out["logits"], labels, settings.label_smoothing) if losses.id else zero,
             "tri_loss": triplet_loss(out["feat"], labels, settings.triplet_margin) if losses.triplet else zero,
             "center_loss": center(out["feat_bn"], labels) if losses.center and center is not None else zero,
             "i2t_loss": supcon_loss(image, text, labels, labels, scale) if losses.i2t else zero,
             "t2i_loss": supcon_loss(text, image, labels, labels, scale) if losses.t2i else zero}
    weights = settings.loss_weights
    loss = (weights["id"] * parts["id_loss"] + weights["triplet"] * parts["tri_loss"]
            + settings.supcon_weight * (weights["i2t"] * parts["i2t_loss"] + weights["t2i"] * parts["t2i_loss"])
            + settings.center_loss_weight * parts["center_loss"])
    return loss, parts, out


def train_promptsg_stage(clip_model: nn.Module, loaders, settings: PromptSGSettings, device: torch.device,
                         tracker: Tracker, log: Log = print, report: Report | None = None,
                         checkpoint_path: Callable[[str], Path] | None = None, metadata: dict | None = None,
                         start_step: int = 0, resume_from: Path | None = None,
                         generator: torch.Generator | None = None) -> dict:
    """Train PromptSG end to end and validate each epoch with ``validate_promptsg`` on the
    selection split; BEST / LAST / FINAL checkpoints, resume, the run's own random ``generator``
    and the final test evaluation as the CLIP-ReID image stage (same arguments, same result keys)."""
    started = time.perf_counter()
    psg = clip_model.promptsg
    losses = build_loss(settings.loss_list)
    clip_model.visual = distributed.sync_batchnorm(clip_model.visual, device, log)
    psg.inversion.global_batch = settings.global_batch
    params = _trainables(clip_model, log)
    named = list(clip_model.named_parameters())
    visual_groups = param_groups(named, params["visual"], settings.lr, settings.weight_decay,
                                 settings.bias_lr_factor, settings.weight_decay_bias)
    optimizer = adam(visual_groups + param_groups(named, params["modules"], settings.module_lr, settings.weight_decay,
                                                  settings.bias_lr_factor, settings.weight_decay_bias), device)
    scheduler = build_scheduler(optimizer, settings.epochs, settings.warmup_epochs, settings.eta_min,
                                settings.warmup_factor, settings.lr_schedule, settings.lr_steps, settings.lr_gamma)
    center = CenterLoss(loaders.data.num_classes, clip_model.bottleneck.num_features, generator).to(device)
    optimizer_center = torch.optim.SGD(center.parameters(), lr=settings.center_lr)
    selection, test = eval_splits(loaders)
    classes = loaders.data.class_to_idx
    book = Selection("promptsg", settings.select_metric, selection, tracker, log, settings.epochs,
                     settings.val_every, settings.val_start)
    step, first_epoch = start_step, 0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model=clip_model, device=device, optimizer=optimizer,
                                scheduler=scheduler, extra_modules={"center_loss": center},
                                extra_optimizers={"center": optimizer_center}, restore_rng=generator is None,
                                log=log)
        restore_generator(generator, state)
        match_device(optimizer, device)
        first_epoch, step, start_step = book.resume(state)
        log(f"resuming PromptSG after epoch {first_epoch} (global step {step})")
    log(f"PromptSG: composed prompt '{psg.composed_text}' (X = the image's pseudo-token), simplified "
        f"'{psg.simplified_text}', fusion {psg.mim.fusion}, {len(psg.mim.blocks)} blocks, lambda "
        f"{settings.supcon_weight}, evaluated with the {settings.eval_prompt} prompt")
    if settings.supcon_weight == 0 or not (losses.i2t or losses.t2i):
        log("warning: no image-text SupCon (promptsg_supcon_weight 0 or no i2t/t2i in loss_list): the inversion "
            "network learns only through the interaction module; watch pos_cos and prompt_sensitivity")
    scale = logit_scale_of(clip_model, settings.logit_scale)
    classifier = head_branches(clip_model)[0][1]
    buffer = StepMetrics(tracker, "promptsg")
    module_group = len(visual_groups)

    def save(tag: str, epoch: int) -> None:
        path = checkpoint_path(tag)
        if path is None or not distributed.is_main():  # not kept (LAST of a run that is never resumed)
            return
        save_checkpoint(path, model=clip_model, optimizer=optimizer, scheduler=scheduler,
                        classifier=classifier, extra_modules={"center_loss": center},
                        extra_optimizers={"center": optimizer_center},
                        metadata={**(metadata or {}), "stage": "image", "progress": book.progress(step, start_step)},
                        epoch=epoch, train_loss=book.train_loss, val_metrics=book.val_metrics, tag=tag,
                        log=log if tag != "LAST" else None, generator=generator)

    run = distributed.data_parallel([clip_model, center if losses.center else None], device)
    for epoch in range(first_epoch, settings.epochs):
        loaders.sampler.set_epoch(epoch)
        clip_model.train()
        lr, lr_module = optimizer.param_groups[0]["lr"], optimizer.param_groups[module_group]["lr"]
        bar = tqdm(loaders.train, desc=f"promptsg {epoch + 1}/{settings.epochs}", unit="batch", dynamic_ncols=True,
                   leave=False, disable=not console_on())
        for images, labels, _, _ in bar:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            loss, parts, out = run(promptsg_loss, clip_model, images, labels, settings, losses, scale, center)
            optimizer.zero_grad(set_to_none=True)
            optimizer_center.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                pseudo_norm = out["pseudo"].detach().float().norm(dim=1).mean()
                image, text = out["image"], out["text_unit"]
                row = {"loss": loss.detach(), **{k: v.detach() for k, v in parts.items()},
                       "feat_norm": out["feat_bn"].detach().float().norm(dim=1).mean(),
                       "arc_conf": out["logits"].detach().float().softmax(1).amax(1).mean(),
                       "pseudo_norm": pseudo_norm, "pseudo_ratio": pseudo_norm / psg.word_norm,
                       "pos_cos": (image * text).sum(1).mean(), "attn_entropy": attention_entropy(out["attn"]),
                       "mim_shift": 1.0 - F.cosine_similarity(out["feature"].float(), out["global"].float()).mean(),
                       "grad_visual": _grad_norm(params["visual"], device),
                       "grad_inversion": _grad_norm(params["inversion"], device),
                       "grad_mim": _grad_norm(params["mim"], device), "lr": lr, "lr_module": lr_module}
            optimizer.step()
            if losses.center:
                center.rescale_grad(settings.center_loss_weight)
                optimizer_center.step()
            buffer.add(step, row)
            step += 1
            if (step - start_step) % settings.log_every == 0:
                last = buffer.flush()
                bar.set_postfix(loss=f"{last['loss']:.3f}", ent=f"{last['attn_entropy']:.3f}",
                                cos=f"{last['pos_cos']:.2f}", s=f"{last['pseudo_ratio']:.2f}")
        buffer.flush()
        scheduler.step()
        distributed.sync_buffers(clip_model)  # DDP: every rank validates with what the checkpoint holds
        if not book.due(epoch):
            book.end_epoch(epoch, lr, buffer.epoch_loss(), None, clip_model,
                           save if checkpoint_path is not None else None, report)
            continue
        metrics = validate_promptsg(clip_model, selection, device, settings, classes)
        log(f"{selection.name}: composed mAP {metrics['composed_mAP']:.2f} | simplified mAP "
            f"{metrics['simplified_mAP']:.2f} | global only mAP {metrics['global_mAP']:.2f} | prompt_sensitivity "
            f"{metrics['prompt_sensitivity']:.4f}")
        book.end_epoch(epoch, lr, buffer.epoch_loss(), metrics, clip_model,
                       save if checkpoint_path is not None else None, report,
                       extra={k: metrics[k] for k in VALIDATION_KEYS if k in metrics})
    if checkpoint_path is not None:
        save("FINAL", settings.epochs)
    tested: list[dict] = []

    def test_once() -> dict:
        tested.append(validate_promptsg(clip_model, test, device, settings))
        return tested[-1]

    result = book.finish(clip_model, test_once, checkpoint_path("BEST") if checkpoint_path is not None else None,
                         device, time.perf_counter() - started, step - start_step)
    diagnostics = ("composed_mAP", "simplified_mAP", "global_mAP", "prompt_sensitivity")
    result.update({f"final_test_{k}": tested[0][k] for k in diagnostics})
    result.update({f"test_{k}": tested[-1][k] for k in diagnostics})
    return result
