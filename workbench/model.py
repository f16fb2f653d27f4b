"""CLIP backbone (open_clip) and its weights, the prompt learner with CLIP's full text path.

The model knows nothing about training: freezing helpers say which parameters train, the
stages decide when.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError
from .errors import ModelError

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_MODEL = "wb-tiny"
PROMPT_PREFIX = "A photo of a"
_registered = False


def register_model_configs() -> None:
    """Make the package's own open_clip configs (``wb-tiny``: a CPU-sized CLIP) known to open_clip."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def resolve_model_name(model_type: str) -> str:
    """``ViT-B/16``, ``vitb16``, ``ViT-B-16`` -> open_clip's ``ViT-B-16``; ``rn50`` -> ``RN50``."""
    register_model_configs()
    known = open_clip.list_models()
    if model_type in known:
        return model_type
    by_key = {_key(n): n for n in known}
    if _key(model_type) in by_key:
        return by_key[_key(model_type)]
    import difflib
    close = difflib.get_close_matches(model_type.replace("/", "-"), known, n=3)
    raise ConfigError(f"model_type: unknown CLIP model {model_type!r}"
                      + (f"; did you mean {', '.join(close)}?" if close else ""))


NO_WEIGHTS = (None, "", "none", "None", "null")
OPENAI_ONLY_KEYS = ("input_resolution", "context_length", "vocab_size")


def _activation(quick_gelu: bool) -> str:
    return "QuickGELU" if quick_gelu else "GELU"


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_torchscript_archive(path: str) -> bool:
    """A TorchScript zip holds ``<name>/constants.pkl`` and ``<name>/code/``; a torch.save zip holds neither."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.split("/")[1:2] in (["constants.pkl"], ["code"]) for n in archive.namelist())


def _read_weights_file(path: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """Return (state dict in open_clip's layout, why it is an OpenAI checkpoint, or None).

    Nothing pickled runs: a TorchScript archive goes through torch.jit.load, anything else
    through torch.load(weights_only=True) or safetensors."""
    if _is_torchscript_archive(path):
        with warnings.catch_warnings():  # torch.jit.load is deprecated in favour of torch.export
            warnings.simplefilter("ignore", FutureWarning)
            state_dict = dict(torch.jit.load(path, map_location="cpu").state_dict())
        openai = "local OpenAI TorchScript archive"
    else:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            checkpoint = load_file(path, device="cpu")
        else:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
            checkpoint = checkpoint["state_dict"]
        if not isinstance(checkpoint, dict) or not checkpoint:
            raise ValueError(f"expected a state dict, found {type(checkpoint).__name__}")
        state_dict = checkpoint
        if next(iter(state_dict)).startswith("module."):
            state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
        openai = None
        if any(key in state_dict for key in OPENAI_ONLY_KEYS):
            openai = "state dict in OpenAI's layout (input_resolution/context_length/vocab_size keys)"
    for key in OPENAI_ONLY_KEYS:
        state_dict.pop(key, None)
    return state_dict, openai


def _activation_by_name(name: str) -> tuple[bool, str]:
    if open_clip.get_model_config(name).get("quick_gelu", False):
        return True, f"model config {name} sets quick_gelu"
    if "openai" in open_clip.list_pretrained_tags_by_model(name):
        return True, (f"model name {name} is an OpenAI architecture; set quick_gelu: false for GELU-trained "
                      "weights (e.g. LAION)")
    return False, f"model name {name} has no OpenAI weights"


def resolve_weights(name: str, pretrained: str | None, quick_gelu: bool | None = None,
                    log: Callable[[str], None] | None = None) -> tuple[str | dict | None, bool, str]:
    """Return (weights for open_clip, quick_gelu, why that activation).

    The weights are None (random), an open_clip tag, or the state dict read from a local file
    (read here once, since telling OpenAI's checkpoints apart needs its keys). ``quick_gelu`` is
    the user's key: None detects; True/False wins, with a warning line via ``log`` when it
    contradicts a certain detection (an OpenAI checkpoint, or a tag's own setting)."""
    if pretrained in NO_WEIGHTS:
        weights, certain = None, False
        detected = bool(open_clip.get_model_config(name).get("quick_gelu", False))
        why = f"random weights; model config {name} sets quick_gelu" if detected else "random weights"
    elif os.path.isfile(os.path.expanduser(pretrained)):
        try:
            weights, why = _read_weights_file(os.path.expanduser(pretrained))
        except Exception as err:  # a corrupt or foreign file can fail in many ways inside torch/zipfile
            why = _first_line(err)
            if "weights_only" in str(err) or isinstance(err, (EOFError, zipfile.BadZipFile)) or \
                    type(err).__name__ == "UnpicklingError":
                # torch's advice to retry without weights_only would run the file's pickled code
                why = "not a PyTorch state dict, TorchScript archive or safetensors file"
            raise ModelError(f"cannot load {name} with pretrained={pretrained!r}: {why}") from None
        certain = detected = why is not None
        if not certain:
            detected, why = _activation_by_name(name)
    else:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ConfigError(f"pretrained: {pretrained!r} is neither an existing file nor an open_clip tag for "
                              f"{name} (tags: {', '.join(tags) or 'none'})")
        weights, certain, why = pretrained, True, f"open_clip tag {pretrained}"
        detected = bool(open_clip.get_pretrained_cfg(name, pretrained).get("quick_gelu", False))
    if quick_gelu is None:
        return weights, detected, why
    if certain and bool(quick_gelu) != detected:
        _say(log, f"warning: quick_gelu: {str(bool(quick_gelu)).lower()} builds {_activation(quick_gelu)}, but the "
                  f"weights were trained with {_activation(detected)} ({why}); features will be off")
    return weights, bool(quick_gelu), "quick_gelu key"


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _quiet_random_init_warning(active: bool):
    """open_clip warns 'No pretrained weights loaded ... initialized randomly' when it builds a model
    whose weights workbench loads itself from a file right after, or one meant to start from random
    weights (the log's activation line says so); drop that line then."""
    if not active:
        yield
        return
    root, drop = logging.getLogger(), _DropRandomInitWarning()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def _load_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load strictly, fitting positional embeddings first, as open_clip's ``factory.load_checkpoint`` does."""
    if "logit_scale" in state_dict and model.logit_scale.ndim != state_dict["logit_scale"].ndim:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
    open_clip.model.resize_pos_embed(state_dict, model)
    open_clip.model.resize_text_pos_embed(state_dict, model)
    model.load_state_dict(state_dict, strict=True)


def _is_modified_resnet(visual: nn.Module) -> bool:
    return hasattr(visual, "attnpool") and hasattr(visual.attnpool, "positional_embedding")


@torch.no_grad()
def resize_attnpool_pos_embed(visual: nn.Module, image_size: Sequence[int]) -> None:
    """Fit a ModifiedResNet's attention-pool positional embedding to a (H, W) input.

    open_clip builds it for a square image only; like CLIP-ReID, the spatial part is
    interpolated (bicubic) from its square grid to H/32 x W/32, keeping pretrained weights."""
    pool = visual.attnpool
    old = pool.positional_embedding.data
    cls_tok, grid = old[:1], old[1:]
    side = int(math.sqrt(grid.shape[0]))
    new_hw = (image_size[0] // 32, image_size[1] // 32)
    if new_hw == (side, side):
        return
    grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_hw, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_hw[0] * new_hw[1], -1).to(old.dtype)
    pool.positional_embedding = nn.Parameter(torch.cat([cls_tok, grid]), requires_grad=pool.positional_embedding.requires_grad)
    visual.image_size = tuple(image_size)


def load_clip_with_patch(model_type: str, device: torch.device | str = "cpu", freeze_all: bool = True,
                         pretrained: str | None = None, image_size: Sequence[int] = (256, 128),
                         quick_gelu: bool | None = None, log: Callable[[str], None] | None = None) -> nn.Module:
    """Build an open_clip CLIP for ReID-shaped (non-square) inputs and return it on ``device``.

    ``pretrained`` is an open_clip tag (downloaded by open_clip), a local weights file (open_clip
    state dict, OpenAI state dict or OpenAI TorchScript archive), or None (random weights).
    ``quick_gelu`` None detects the activation the weights were trained with (see
    ``resolve_weights``); True/False forces it. ViT positional embeddings are interpolated to
    H x W; a ModifiedResNet (RN50, ...) is built square, loaded, then its attention pool is patched."""
    name = resolve_model_name(model_type)
    image_size = tuple(int(s) for s in image_size)
    config = open_clip.get_model_config(name)
    resnet = isinstance(config["vision_cfg"].get("layers"), (list, tuple))
    if resnet and any(s % 32 for s in image_size):
        raise ConfigError(f"image_size: {list(image_size)} must be multiples of 32 for {name}")
    if not resnet:
        patch = config["vision_cfg"].get("patch_size") or 1
        if any(s % patch for s in image_size):
            raise ConfigError(f"image_size: {list(image_size)} must be multiples of the patch size {patch} for {name}")
    weights, quick_gelu, why = resolve_weights(name, pretrained, quick_gelu, log)
    _say(log, f"activation: {_activation(quick_gelu)} ({why})")
    try:
        # Only the quick_gelu model kwarg can turn a -quickgelu config back to GELU;
        # force_quick_gelu keeps open_clip's own tag-mismatch warning in step with it.
        with _quiet_random_init_warning(weights is None or isinstance(weights, dict)):  # random, or loaded next
            model = open_clip.create_model(
                name, pretrained=weights if isinstance(weights, str) else None,
                force_quick_gelu=quick_gelu, quick_gelu=quick_gelu,
                force_image_size=None if resnet else image_size, device="cpu")
        if isinstance(weights, dict):
            _load_state_dict(model, weights)
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        raise ModelError(f"cannot load {name} with pretrained={pretrained!r}: {_first_line(err)}") from None
    if resnet:
        resize_attnpool_pos_embed(model.visual, image_size)
    model.to(device)
    if resnet and torch.device(device).type == "cuda":  # cuDNN's convolutions run fastest on NHWC
        model.visual.to(memory_format=torch.channels_last)
    if freeze_all:
        freeze_entire_clip_model(model)
    return model


# ----------------------------------------------------------------------------- freezing

def _say(log: Callable[[str], None] | None, text: str) -> None:
    if log is not None:
        log(text)


def _count(params) -> int:
    return sum(p.numel() for p in params)


def freeze_entire_clip_model(clip_model: nn.Module, log: Callable[[str], None] | None = None) -> None:
    """Every parameter of CLIP (and of any head registered on it) stops training."""
    for p in clip_model.parameters():
        p.requires_grad_(False)
    _say(log, f"froze all {_count(clip_model.parameters()):,} CLIP parameters")


def image_encoder_parameters(clip_model: nn.Module) -> list[nn.Parameter]:
    return list(clip_model.visual.parameters())


def text_encoder_parameters(clip_model: nn.Module) -> list[nn.Parameter]:
    """The text tower: token and positional embeddings, transformer, ln_final, projection."""
    params = [*clip_model.token_embedding.parameters(), clip_model.positional_embedding,
              *clip_model.transformer.parameters(), *clip_model.ln_final.parameters()]
    if isinstance(clip_model.text_projection, nn.Parameter):
        params.append(clip_model.text_projection)
    elif clip_model.text_projection is not None:
        params += list(clip_model.text_projection.parameters())
    return params


def unfreeze_clip_image_encoder(clip_model: nn.Module, log: Callable[[str], None] | None = None) -> None:
    params = image_encoder_parameters(clip_model)
    for p in params:
        p.requires_grad_(True)
    _say(log, f"unfroze the image encoder ({_count(params):,} parameters)")


def unfreeze_clip_text_encoder(clip_model: nn.Module, log: Callable[[str], None] | None = None) -> None:
    params = text_encoder_parameters(clip_model)
    for p in params:
        p.requires_grad_(True)
    _say(log, f"unfroze the text encoder ({_count(params):,} parameters)")


def freeze_prompt_learner(prompt_learner: nn.Module, log: Callable[[str], None] | None = None) -> None:
    for p in prompt_learner.parameters():
        p.requires_grad_(False)
    _say(log, f"froze the prompt learner ({_count(prompt_learner.parameters()):,} parameters)")


# ----------------------------------------------------------------------------- prompts

class PromptLearner(nn.Module):
    """Class-specific learned context inside a fixed prompt (CLIP-ReID's stage-1 prompt).

    Every class c reads ``"A photo of a [ctx_c,1] ... [ctx_c,n_ctx] {template}."``, where
    ``{template}`` is ``prompt_template`` with ``{aspect}`` filled in. Only ``ctx``
    (num_classes x n_ctx x width) trains; the other token embeddings are frozen buffers."""

    def __init__(self, classnames: Sequence[str], clip_model: nn.Module, n_ctx: int,
                 prompt_template: str = "{aspect} hand of a person", aspect: str = "",
                 model_name: str | None = None):
        super().__init__()
        self.classnames = list(classnames)
        self.n_ctx = n_ctx
        body = prompt_template.format(aspect=aspect).strip()
        parts = slot_prompt(clip_model, model_name, body, n_ctx, "n_ctx", f"with n_ctx={n_ctx}",
                            "lower n_ctx or shorten prompt_template")
        self.prompt_text, self.eot_index = parts.text, parts.eot_index
        self.register_buffer("tokens", parts.tokens, persistent=False)
        self.register_buffer("token_prefix", parts.prefix, persistent=False)
        self.register_buffer("token_suffix", parts.suffix, persistent=False)
        ctx = torch.empty(len(self.classnames), n_ctx, parts.prefix.shape[-1])
        nn.init.normal_(ctx, std=0.02)
        self.ctx = nn.Parameter(ctx)
        self.to(clip_model.token_embedding.weight.device)

    @property
    def num_classes(self) -> int:
        return self.ctx.shape[0]

    def forward_batch(self, labels: torch.Tensor) -> torch.Tensor:
        """Prompt token embeddings for ``labels``: (B, eot_index + 1, width)."""
        ctx = self.ctx[labels]
        batch = ctx.shape[0]
        return torch.cat([self.token_prefix.expand(batch, -1, -1), ctx,
                          self.token_suffix.expand(batch, -1, -1)], dim=1)


@dataclass(frozen=True)
class SlotPrompt:
    """``"A photo of a X ... X {body}."`` tokenized and embedded around its ``n_slots`` slots:
    ``prefix`` (start token and "A photo of a"), ``suffix`` (the body, the full stop and the
    end-of-text token, where the text path stops), both (1, L, width) on the CPU."""

    text: str
    tokens: torch.Tensor
    eot_index: int
    prefix: torch.Tensor
    suffix: torch.Tensor


def slot_prompt(clip_model: nn.Module, model_name: str | None, body: str, n_slots: int, key: str = "n_ctx",
                what: str = "", fix: str = "shorten the prompt") -> SlotPrompt:
    """Build the prompt with ``n_slots`` learned (or computed) token embeddings after
    "A photo of a"; ``n_slots`` 0 is the plain text. A prompt longer than CLIP's context is a
    ConfigError naming ``key``. Shared by CLIP-ReID's class prompts and PromptSG's pseudo-token
    prompt, so both take exactly CLIP's tokenization and embeddings."""
    context_length = int(clip_model.positional_embedding.shape[0])
    text, tokenizer = check_prompt_fits(model_name, body, n_slots, context_length, key, what, fix)
    tokens = tokenizer([text])[:, :context_length]
    # The causal mask makes the end-of-text feature depend only on the tokens up to it, so
    # the text transformer runs on that many positions instead of the full 77.
    eot_index = int(tokens.argmax(-1).item())
    with torch.no_grad():
        embedding = clip_model.token_embedding(tokens.to(clip_model.token_embedding.weight.device))
    start = 1 + _n_tokens(tokenizer, PROMPT_PREFIX)
    return SlotPrompt(text, tokens, eot_index, embedding[:, :start].detach().clone().cpu(),
                      embedding[:, start + n_slots:eot_index + 1].detach().clone().cpu())


def check_prompt_fits(model_name: str | None, body: str, n_slots: int, context_length: int | None = None,
                      key: str = "n_ctx", what: str = "", fix: str = "shorten the prompt"):
    """The prompt text ``"A photo of a X ... X {body}."`` and the model's tokenizer, or a
    ConfigError naming ``key`` when it needs more tokens than CLIP's context (the model config's
    when ``context_length`` is None). Cheap: no model is built, so it runs before a run starts."""
    tokenizer = open_clip.get_tokenizer(model_name) if model_name else open_clip.get_tokenizer("ViT-B-16")
    if context_length is None:
        config = open_clip.get_model_config(model_name) if model_name else None
        context_length = int(((config or {}).get("text_cfg") or {}).get("context_length", 77))
    text = f"{PROMPT_PREFIX} {' '.join(['X'] * n_slots)} {body}.".replace("  ", " ")
    needed = _n_tokens(tokenizer, text) + 2  # start and end of text
    if needed > context_length:
        raise ConfigError(f"{key}: the prompt needs {needed} tokens{' ' + what if what else ''}, more than CLIP's "
                          f"context of {context_length}; {fix}")
    return text, tokenizer


def _n_tokens(tokenizer, text: str) -> int:
    tokens = tokenizer([text], context_length=512) if _accepts_length(tokenizer) else tokenizer([text])
    return int((tokens[0] != 0).sum().item()) - 2


def _accepts_length(tokenizer) -> bool:
    import inspect
    try:
        return "context_length" in inspect.signature(tokenizer.__call__).parameters
    except (TypeError, ValueError):
        return False


def encode_prompt_embeddings(clip_model: nn.Module, embeddings: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """CLIP's text path from prompt embeddings (B, L, width) whose last position is the
    end-of-text token: + positional embedding -> causal transformer -> ln_final -> EOT
    feature -> text_projection -> L2 normalise (unless ``normalize`` is off: the official
    CLIP-ReID's raw text feature). Returns (B, embed_dim)."""
    length = embeddings.shape[1]
    x = embeddings + clip_model.positional_embedding[:length].to(embeddings.dtype)
    mask = clip_model.attn_mask[:length, :length] if clip_model.attn_mask is not None else None
    x = clip_model.transformer(x, attn_mask=mask)
    x = clip_model.ln_final(x[:, -1])
    proj = clip_model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x


def text_features(clip_model: nn.Module, prompt_learner: PromptLearner, labels: torch.Tensor,
                  normalize: bool = True) -> torch.Tensor:
    """Text features (L2-normalised unless ``normalize`` is off) of the learned prompts of
    ``labels``: (B, embed_dim)."""
    return encode_prompt_embeddings(clip_model, prompt_learner.forward_batch(labels), normalize)


def all_text_features(clip_model: nn.Module, prompt_learner: PromptLearner, chunk: int = 256,
                      normalize: bool = True) -> torch.Tensor:
    """Text features of every class in label order: (num_classes, embed_dim)."""
    labels = torch.arange(prompt_learner.num_classes, device=prompt_learner.ctx.device)
    return torch.cat([text_features(clip_model, prompt_learner, part, normalize) for part in labels.split(chunk)])


def encode_images(clip_model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Unnormalised image features from CLIP's image encoder: (B, embed_dim)."""
    return clip_model.encode_image(images)


def encode_image_parts(clip_model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pre-projection, projected) unnormalised image features, as the official CLIP-ReID
    takes them: for a ViT the class token after ln_post and after the projection; for a
    ModifiedResNet (RN50) the average-pooled last feature map and the attention pool's output.
    The projected feature equals ``encode_images``."""
    visual = clip_model.visual
    if _is_modified_resnet(visual):
        x = visual.stem(images)
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        return x.mean(dim=(2, 3)), visual.attnpool(x)
    if hasattr(visual, "_embeds") and hasattr(visual, "_pool") and hasattr(visual, "proj"):
        pooled, _ = visual._pool(visual.transformer(visual._embeds(images)))
        return pooled, (pooled @ visual.proj if visual.proj is not None else pooled)
    raise ConfigError(f"test_feature: proj_and_pre_proj needs an open_clip ViT or ModifiedResNet image tower, "
                      f"not {type(visual).__name__}")


def encode_image_tokens(clip_model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(global feature (B, embed_dim), local tokens (B, N, embed_dim)), unnormalised, both in
    CLIP's joint embedding space. ViT: the pooled class token and the patch tokens, each after
    ln_post and the projection (open_clip leaves the patch tokens unprojected). ModifiedResNet
    (RN50): the attention pool's output, and each of the H/32 x W/32 positions through the
    pool's value and output projections alone (as MaskCLIP reads dense CLIP features): run as
    queries through the pool's attention, every position would come out as nearly the same
    pooled vector, leaving the interaction module one key to attend to. The global feature
    equals ``encode_images``."""
    visual = clip_model.visual
    if _is_modified_resnet(visual):
        x = visual.stem(images)
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        pool = visual.attnpool
        positions = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        positions = positions + pool.positional_embedding[1:].to(positions.dtype)
        tokens = pool.c_proj(pool.v_proj(positions))
        return pool(x), tokens
    if hasattr(visual, "_embeds") and hasattr(visual, "_pool") and hasattr(visual, "proj"):
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "final_ln_after_pool", False):
            raise ConfigError("stage_mode: promptsg needs an open_clip ViT whose patch tokens pass ln_post like its "
                              "class token (not an attention-pooled or final-LN-after-pool tower)")
        pooled, tokens = visual._pool(visual.transformer(visual._embeds(images)))
        if visual.proj is not None:
            pooled, tokens = pooled @ visual.proj, tokens @ visual.proj
        return pooled, tokens
    raise ConfigError(f"stage_mode: promptsg needs an open_clip ViT or ModifiedResNet image tower, "
                      f"not {type(visual).__name__}")


def compile_encoders(clip_model: nn.Module, log: Callable[[str], None] | None = None) -> None:
    """torch.compile, in place, the parts every training and evaluation path runs: the ViT's
    transformer (or a ModifiedResNet's four stages) and the text transformer. The modules keep
    their parameters and state-dict names (checkpoints are unchanged); compilation happens on
    the first call of each input shape."""
    visual = clip_model.visual
    parts = [getattr(visual, f"layer{i}") for i in range(1, 5)] if _is_modified_resnet(visual) else [visual.transformer]
    for module in [*parts, clip_model.transformer]:
        module.compile()
    _say(log, f"compiled the image encoder's {'stages' if len(parts) > 1 else 'transformer'} and the text "
              f"transformer (torch.compile; the first steps include compilation)")
