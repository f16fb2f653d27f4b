"""The experiment config: one frozen, typed object, loaded from YAML and validated once.

The YAML keeps the original research code's flat key names (``lr``, ``n_ctx``,
``epochs_image``, ...) so its configs load unchanged. ``load(path, overrides)`` is the only
code that reads YAML; ``--set key=value`` overrides are parsed as YAML scalars and must keep
the key's type.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import ConfigError

UNSAFE_NAME = r"[/\\\x00-\x1f]|\.\."  # in a config string that becomes part of a file name
STAGE_MODES = ("prompt_then_image", "prompt_only", "image_only", "promptsg")
# Choices of the keys that switch between the original design and the official CLIP-ReID recipe.
CHOICES = {
    "id_head": ("arcface", "linear"),
    "train_feature": ("normalized", "raw"),
    "test_feature": ("proj", "proj_and_pre_proj"),
    "i2t_mode": ("batch_supcon", "all_classes"),
    "i2t_logit_mode": ("cosine_scaled", "raw_dot"),
    "prompt_logit_mode": ("cosine_scaled", "raw_dot"),
    "lr_schedule": ("cosine", "multistep"),
    "select_metric": ("rank1", "mAP"),
    "eval_neck_feat": ("before", "after"),
    "dataset_format": ("auto", "folders", "market1501"),
    "promptsg_eval_prompt": ("composed", "simplified"),
    "mim_fusion": ("query", "reweight"),
}
LOSS_NAMES = ("id", "triplet", "center", "i2t", "t2i")
# Names the original research configs used for the same losses.
LOSS_ALIASES = {
    "ce": ("id",), "xent": ("id",), "arcface": ("id",), "id_loss": ("id",),
    "tri": ("triplet",), "tri_loss": ("triplet",), "center_loss": ("center",),
    "supcon": ("i2t", "t2i"), "contrastive": ("i2t", "t2i"),
    "loss_i2t": ("i2t",), "loss_t2i": ("t2i",),
}
CLIP_CONTEXT_LENGTH = 77
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


# Metric to tune -> the per-epoch validation number reported for pruning.
TUNE_METRICS = {"best_mAP": "mAP", "best_rank1": "rank1", "final_mAP": "mAP", "final_rank1": "rank1"}
PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random", "cmaes")
_SPEC_KEYS = {"int": {"type", "low", "high", "step", "log"}, "float": {"type", "low", "high", "step", "log"},
              "categorical": {"type", "choices"}}
# Keys a study may not search: bookkeeping (num_workers never changes a run's numbers), and what
# defines the data or the selection split (trials scored on different held-out identities, or by
# different metrics, are not comparable).
_UNTUNABLE = {"tune", "experiment", "output_dir", "tracking_uri", "data_root", "device", "seed", "val_identities",
              "val_seed", "select_metric", "synthesize_if_missing", "synth_identities", "synth_test_identities",
              "synth_images_per_identity", "split", "dataset_format", "system_metrics",
              "system_metrics_interval", "num_workers"}


def _check_search_dimension(name: str, spec) -> None:
    where = f"space.{name}"
    if name in _UNTUNABLE:
        raise ConfigError(f"{where}: not a tunable config key ({name} is bookkeeping, or defines the data or the "
                          f"selection split)")
    if name not in {f.name for f in dataclasses.fields(Config)}:
        close = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(Config)], n=1)
        raise ConfigError(f"{where}: not a tunable config key" + (f"; did you mean {close[0]}?" if close else ""))
    if not isinstance(spec, dict) or spec.get("type") not in _SPEC_KEYS:
        raise ConfigError(f"{where}: expected a mapping with type int, float or categorical")
    unknown = set(spec) - _SPEC_KEYS[spec["type"]]
    if unknown:
        raise ConfigError(f"{where}: unknown setting {sorted(unknown)[0]!r} for type {spec['type']}")
    if spec["type"] == "categorical":
        if not isinstance(spec.get("choices"), list) or not spec["choices"]:
            raise ConfigError(f"{where}: categorical needs a non-empty list of choices")
        return
    low, high = _as_number(where, spec.get("low"), spec["type"]), _as_number(where, spec.get("high"), spec["type"])
    step = None if spec.get("step") is None else _as_number(where, spec["step"], spec["type"], "step")
    if spec["type"] == "int" and not all(isinstance(v, int) for v in (low, high, step or 1)):
        raise ConfigError(f"{where}: an int range needs whole numbers, got low {low}, high {high}, step {step}")
    if not low < high:
        raise ConfigError(f"{where}: empty range: low {low} must be below high {high}")
    if spec.get("log") and low <= 0:
        raise ConfigError(f"{where}: a log scale needs low > 0, got {low}")
    if step is not None and (spec.get("log") or step <= 0):
        raise ConfigError(f"{where}: step must be > 0 and cannot go with log")


def _as_number(where: str, value, kind: str, what: str = "low and high"):
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        value = float(value)
    if kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"{where}: {what} must be {'finite numbers' if ' and ' in what else 'a finite number'}, "
                          f"got {value!r}")
    return value


def _numeric_spec(name: str, spec: dict) -> dict:
    if spec["type"] == "categorical":
        return dict(spec)
    out = dict(spec)
    for key in ("low", "high", "step"):
        if out.get(key) is not None:
            out[key] = _as_number(f"space.{name}", out[key], spec["type"], "step" if key == "step" else "low and high")
    return out


@dataclass(frozen=True)
class TuneConfig:
    """The ``tune:`` section: what ``workbench tune`` maximises and over which space."""

    metric: str = "best_mAP"
    """Run metric to optimise: best_mAP, best_rank1, mAP or rank1 (last epoch)."""
    direction: str = "maximize"
    """maximize or minimize."""
    space: dict = field(default_factory=lambda: {
        "n_ctx": {"type": "int", "low": 2, "high": 16},
        "lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
        "center_loss_weight": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    })
    """Search space: config key -> {type: int|float|categorical, low, high, step, log, choices}."""
    pruner: str = "median"
    """median, hyperband or none."""
    stop_out_of_reach: bool = True
    """With the median pruner, also stop a trial that can no longer become the best: from the
    pruner's first judged epoch, once 5 complete trials reported values after that epoch, when its
    best value so far plus twice the largest gain any of them made after it is still behind the
    study's best. The last epoch is never judged."""
    sampler: str = "tpe"
    """tpe, random or cmaes."""
    keep_checkpoints: str = "best"
    """Checkpoints stored as MLflow artifacts: best (the best trial's only), all or none."""
    n_jobs: int = 1
    """Trials run at once by one ``workbench tune`` process (threads; ``--n-jobs`` overrides). On a
    CPU each gets its share of the cores; with several GPUs, one GPU each in turn."""
    heartbeat_interval: int = 30
    """With a database storage (PostgreSQL, ...): seconds between a running trial's heartbeats
    (Optuna's RDB heartbeat), by which workers on other machines learn that its worker is alive."""
    grace_period: int | None = None
    """Seconds without a heartbeat after which a running trial's worker counts as dead and the
    trial is failed and replaced (None: 4 x heartbeat_interval)."""
    retry_failed: int = 0
    """How often a trial whose worker died is run again with the same values; 0: it is replaced
    by a newly sampled trial."""

    def __post_init__(self):
        if self.metric not in TUNE_METRICS:
            raise ConfigError(f"metric: unknown {self.metric!r}; choose one of {', '.join(TUNE_METRICS)}")
        if self.direction not in ("maximize", "minimize"):
            raise ConfigError(f"direction: must be maximize or minimize, got {self.direction!r}")
        for key, allowed in (("pruner", PRUNERS), ("sampler", SAMPLERS), ("keep_checkpoints", ("best", "all", "none"))):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: unknown {getattr(self, key)!r}; choose one of {', '.join(allowed)}")
        if self.n_jobs < 1:
            raise ConfigError(f"n_jobs: must be >= 1, got {self.n_jobs}")
        if self.heartbeat_interval < 1:
            raise ConfigError(f"heartbeat_interval: must be >= 1 second, got {self.heartbeat_interval}")
        if self.grace_period is not None and self.grace_period <= self.heartbeat_interval:
            raise ConfigError(f"grace_period: must be longer than heartbeat_interval ({self.heartbeat_interval} s), "
                              f"got {self.grace_period}")
        if self.retry_failed < 0:
            raise ConfigError(f"retry_failed: must be >= 0, got {self.retry_failed}")
        if not self.space:
            raise ConfigError("space: is empty; name at least one config key to search")
        for name, spec in self.space.items():
            _check_search_dimension(name, spec)
        # YAML reads 1e-4 (no dot) as a string: keep the numbers as numbers for the sampler.
        object.__setattr__(self, "space", {name: _numeric_spec(name, spec) for name, spec in self.space.items()})


@dataclass(frozen=True)
class Config:
    """Everything one ``workbench run`` needs. Every field has a default."""

    # --- naming and bookkeeping ---
    experiment: str = "workbench"
    """MLflow experiment name and the first part of every file name."""
    variant: str = "base"
    """Free-form tag for this configuration, part of every file name."""
    seed: int = 0
    """Seed for torch, numpy and Python's random."""
    output_dir: str = "runs"
    """Folder under which each run writes its log, config and checkpoints."""
    tracking_uri: Optional[str] = None
    """MLflow tracking URI; null means MLFLOW_TRACKING_URI or sqlite:///mlflow.db."""
    device: str = "auto"
    """auto (cuda when available), cpu, cuda or cuda:N."""
    amp: bool = True
    """bf16 autocast on CUDA (ignored on the CPU)."""
    compile: bool = False
    """torch.compile the image encoder and the text transformer (fastest on CUDA; the first steps include compilation)."""
    ddp_global_batch: bool = True
    """Under DDP (torchrun, --nproc) gather the ranks' features so that every loss sees the global batch; false: per-rank losses, as the official CLIP-ReID."""
    log_every: int = 20
    """Steps between metric flushes and progress-bar updates (each costs one host sync)."""
    save_checkpoints: bool = True
    """Write BEST / FINAL checkpoints to disk."""
    log_checkpoints: bool = True
    """Also store the checkpoints as MLflow artifacts."""
    system_metrics: Optional[bool] = None
    """Log CPU, memory, disk and network use (GPU utilisation and memory with nvidia-ml-py) beside the curves (MLflow system metrics); null: on when training on CUDA."""
    system_metrics_interval: float = 10.0
    """Seconds between system-metric samples."""

    # --- data ---
    dataset: str = "11k"
    """Dataset name used in file names and tags."""
    data_root: str = "data/11k_dorsal_r"
    """Dataset folder: train/, query/, gallery/ (or prepared query<i>/gallery<i>) of identity folders, or a Market-1501 folder."""
    dataset_format: str = "auto"
    """folders (train/query/gallery of identity folders), market1501 (bounding_box_train/test, query), or auto (detect)."""
    split: int = 0
    """Which prepared query<i>/gallery<i> pair a run tests on (plain query/gallery folders are split 0)."""
    synthesize_if_missing: bool = False
    """Generate the synthetic identity dataset into data_root when it does not exist; one that exists
    must have been made with these synth_* values (its synthetic.json says which)."""
    synth_identities: int = 60
    """Synthetic dataset: identities for training (and the validation hold-out)."""
    synth_test_identities: Optional[int] = None
    """Synthetic dataset: test identities (query/gallery); null means synth_identities."""
    synth_images_per_identity: int = 8
    """Synthetic dataset: images per identity and split."""
    val_identities: float = 0
    """Training identities held out for validation (a count >= 1 or a fraction < 1; 0: none, select on test)."""
    val_seed: Optional[int] = None
    """Seed of the validation hold-out draw; null means seed."""
    aspect: str = "dorsal right"
    """Hand aspect substituted for {aspect} in prompt_template."""
    image_size: list = field(default_factory=lambda: [256, 128])
    """Input size [height, width]."""
    batch_size: int = 32
    """Images per training batch (P identities x num_instances images)."""
    num_instances: int = 4
    """Images per identity in a training batch (K of the PK sampler)."""
    test_batch_size: int = 128
    """Batch size for feature extraction."""
    num_workers: int | str = "auto"
    """DataLoader worker processes, or auto: 0 on the CPU; on a GPU the cores less one (shared among DDP ranks and parallel trials), 1-8. Never changes the numbers."""
    cache_images: bool = True
    """Decode and resize every image once per run and keep it in memory (uint8; not when it would take over half the free memory)."""
    flip_prob: float = 0.5
    """Probability of a horizontal flip in training."""
    pad: int = 10
    """Padding before the random crop in training (pixels)."""
    random_erasing: float = 0.5
    """Probability of random erasing in training."""
    pixel_mean: list = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    """Per-channel mean subtracted from the input (CLIP's; the official CLIP-ReID ViT uses 0.5)."""
    pixel_std: list = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    """Per-channel standard deviation dividing the input (CLIP's; the official CLIP-ReID ViT uses 0.5)."""

    # --- model ---
    model_type: str = "ViT-B/16"
    """CLIP architecture: the original's names (ViT-B/16, RN50, vitb16) or open_clip's."""
    pretrained: Optional[str] = "openai"
    """open_clip pretrained tag, a local weights file, or null for random weights."""
    quick_gelu: Optional[bool] = None
    """QuickGELU activation (OpenAI weights); null detects it from the tag, the weights file or the model name."""
    n_ctx: int = 12
    """Learned context tokens per class in the prompt."""
    prompt_template: str = "{aspect} hand of a person"
    """Prompt text after the learned context tokens; {aspect} is replaced by aspect."""
    stage_mode: str = "prompt_then_image"
    """prompt_then_image, prompt_only, image_only (CLIP-ReID) or promptsg (PromptSG: one end-to-end stage)."""
    freeze_prompt: bool = True
    """Keep the learned prompt fixed during the image stage."""
    train_text_encoder: bool = False
    """Also fine-tune CLIP's text encoder during the image stage."""
    id_head: str = "arcface"
    """ID classifier on the BNNeck feature: arcface (original design) or linear (official, no bias)."""
    train_feature: str = "normalized"
    """Image feature that BNNeck and the triplet loss take: normalized (original design) or raw (official)."""
    test_feature: str = "proj"
    """proj, or proj_and_pre_proj (official: pre-projection feature with its own BNNeck and ID head, concatenated at test)."""
    arcface_scale: float = 30.0
    """ArcFace scale s."""
    arcface_margin: float = 0.5
    """ArcFace additive angular margin m (radians)."""
    eval_neck_feat: str = "before"
    """Features for validation: before (image features, L2-normalised) or after the BNNeck."""

    # --- optimisation ---
    epochs_prompt: int = 60
    """Epochs of the prompt stage."""
    epochs_image: int = 40
    """Epochs of the image stage."""
    lr: float = 5e-5
    """Learning rate of the image stage (and of the prompt stage unless lr_prompt is set)."""
    lr_prompt: Optional[float] = None
    """Learning rate of the prompt stage; null means lr."""
    weight_decay: float = 1e-4
    """Adam weight decay."""
    warmup_epochs: int = 0
    """Linear warm-up epochs at the start of the image stage (and of the prompt stage unless warmup_epochs_prompt)."""
    warmup_factor: Optional[float] = None
    """Learning-rate factor at the first warm-up epoch, rising linearly to 1; null means 1 / (warmup_epochs + 1)."""
    warmup_epochs_prompt: Optional[int] = None
    """Warm-up epochs of the prompt stage; null means warmup_epochs."""
    warmup_factor_prompt: Optional[float] = None
    """Warm-up start factor of the prompt stage; null means warmup_factor."""
    lr_schedule: str = "cosine"
    """Image-stage schedule after warm-up: cosine (to eta_min) or multistep (x lr_gamma at each of lr_steps)."""
    lr_steps: list = field(default_factory=list)
    """Epochs at which the multistep schedule multiplies the learning rate by lr_gamma."""
    lr_gamma: float = 0.1
    """Factor of each multistep decay."""
    bias_lr_factor: float = 1.0
    """Learning rate of bias parameters in the image stage: lr x bias_lr_factor (official: 2)."""
    weight_decay_bias: Optional[float] = None
    """Weight decay of bias parameters in the image stage; null means weight_decay."""
    eta_min: float = 1e-6
    """Final learning rate of the cosine schedule."""
    loss_list: list = field(default_factory=lambda: list(LOSS_NAMES))
    """Losses of the image stage: id, triplet, center, i2t, t2i (aliases: supcon, tri, ce)."""
    triplet_margin: Optional[float] = 0.3
    """Margin of the batch-hard triplet loss; null: soft margin log(1 + exp(d_ap - d_an)) (official NO_MARGIN)."""
    label_smoothing: float = 0.0
    """Label smoothing of the ID loss."""
    id_loss_weight: float = 1.0
    """Weight of the ID loss in the image stage."""
    triplet_loss_weight: float = 1.0
    """Weight of the triplet loss in the image stage."""
    i2t_loss_weight: float = 1.0
    """Weight of the image-to-text loss in the image stage."""
    t2i_loss_weight: float = 1.0
    """Weight of the text-to-image loss in the image stage."""
    i2t_mode: str = "batch_supcon"
    """Image-stage i2t: batch_supcon (SupCon in the batch, original design) or all_classes (cross-entropy over every identity's text feature, official; no t2i)."""
    i2t_label_smoothing: float = 0.0
    """Label smoothing of the all_classes i2t cross-entropy."""
    i2t_logit_mode: str = "cosine_scaled"
    """Image-stage image-text logits: cosine_scaled (cosine x logit scale) or raw_dot (unnormalised dot product)."""
    prompt_logit_mode: str = "cosine_scaled"
    """Prompt-stage logits: cosine_scaled (cosine x logit scale) or raw_dot (unnormalised features, temperature 1, official)."""
    center_lr: float = 0.5
    """SGD learning rate of the class centers."""
    center_loss_weight: float = 0.0003
    """Weight of the center loss in the total loss."""
    prompt_reg_weight: float = 0.001
    """Weight of the L2 regulariser mean(ctx^2) in the prompt stage."""
    contrastive_logit_scale: Optional[float] = None
    """Scale of the image-text cosine logits; null means CLIP's learned logit_scale."""
    max_rank: int = 50
    """Longest CMC curve computed in validation."""
    val_every: int = 1
    """Validate (select BEST, report to the pruner) every val_every-th epoch and at the last one."""
    val_start: Optional[int] = None
    """Validation starts at this image-stage epoch: the epochs validated are the multiples of
    val_every from val_start on, and the last (earlier ones train without validation, so they are no
    BEST candidates and draw no curve point); null: 1 in a run, and in a tuning trial the first epoch
    the pruner judges (a quarter of epochs_image), since earlier validations would only draw curves."""
    select_metric: str = "rank1"
    """Validation metric that picks the BEST checkpoint: rank1 or mAP."""

    # --- PromptSG (stage_mode: promptsg) ---
    promptsg_template: str = "{aspect} hand"
    """PromptSG prompt after "A photo of a": composed "A photo of a X {template}." (X: the image's pseudo-token), simplified without X."""
    promptsg_module_lr: float = 5e-5
    """Learning rate of PromptSG's new modules (inversion network, interaction module, BNNeck, ID head); lr is the image encoder's."""
    promptsg_supcon_weight: float = 0.5
    """lambda: weight of the image-text SupCon terms (i2t and t2i in loss_list) between the global image feature and the composed prompt's text feature."""
    promptsg_eval_prompt: str = "composed"
    """Prompt of the interaction module at test time: composed (each image's own pseudo-token) or simplified (one text, encoded once)."""
    mim_fusion: str = "query"
    """Output of the interaction module: query (the cross-attention's text-query token after the blocks) or reweight (tokens re-weighted by the attention map, the global token after the blocks)."""
    mim_blocks: int = 2
    """Self-attention + feed-forward blocks after the cross-attention."""
    mim_heads: int = 8
    """Attention heads of the interaction module (must divide CLIP's embedding width)."""
    inversion_hidden: int = 512
    """Hidden width of the inversion network (3-layer MLP with a BatchNorm after the last layer)."""

    tune: TuneConfig = field(default_factory=TuneConfig)
    """Settings of ``workbench tune``."""

    def __post_init__(self):
        def bad(key, why):
            raise ConfigError(f"{key}: {why}")

        for key in ("experiment", "variant", "dataset", "aspect"):  # they reach file and folder names
            value = getattr(self, key) or ""
            if re.search(UNSAFE_NAME, value) or value.startswith("."):
                bad(key, f"{value!r} cannot name files: use no path separator, no '..', no control character "
                         f"and no leading dot")
        if not self.experiment.strip():
            bad("experiment", "must not be empty")
        if self.stage_mode not in STAGE_MODES:
            bad("stage_mode", f"unknown value {self.stage_mode!r}; choose one of {', '.join(STAGE_MODES)}")
        for key in ("seed", "val_seed"):  # what numpy and torch take as a seed
            if getattr(self, key) is not None and not 0 <= getattr(self, key) < 2**32:
                bad(key, f"must be between 0 and 2**32 - 1, got {getattr(self, key)}")
        for key in ("lr", "center_lr"):
            if getattr(self, key) <= 0:
                bad(key, f"must be positive, got {getattr(self, key)}")
        for key in ("weight_decay", "eta_min"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.lr_prompt is not None and self.lr_prompt <= 0:
            bad("lr_prompt", f"must be positive, got {self.lr_prompt}")
        if self.center_loss_weight < 0:
            bad("center_loss_weight", f"must be >= 0, got {self.center_loss_weight}")
        if self.center_loss_weight == 0 and "center" in self.losses:
            bad("center_loss_weight", "is 0 while loss_list has center; remove center from loss_list instead")
        if not 1 <= self.n_ctx < CLIP_CONTEXT_LENGTH - 2:
            bad("n_ctx", f"must be between 1 and {CLIP_CONTEXT_LENGTH - 3} (CLIP's context is "
                f"{CLIP_CONTEXT_LENGTH} tokens), got {self.n_ctx}")
        _check_template("prompt_template", self.prompt_template, self.aspect)
        if len(self.image_size) != 2 or any(not isinstance(s, int) or s < 32 for s in self.image_size):
            bad("image_size", f"must be [height, width] with both at least 32, got {self.image_size}")
        if not 0 <= self.pad <= min(self.image_size):
            bad("pad", f"must be between 0 and the smaller side of image_size ({min(self.image_size)}), got {self.pad}")
        for key in ("epochs_prompt", "epochs_image", "warmup_epochs"):
            if getattr(self, key) < 0:
                bad(key, f"must be >= 0, got {getattr(self, key)}")
        if self.num_workers != "auto" and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            bad("num_workers", f"must be auto or a count >= 0, got {self.num_workers!r}")
        if self.trains_prompt and self.epochs_prompt == 0:
            bad("epochs_prompt", f"is 0 but stage_mode {self.stage_mode} trains the prompt")
        if self.stage_mode != "prompt_only" and self.epochs_image == 0:
            bad("epochs_image", f"is 0 but stage_mode {self.stage_mode} trains the image encoder")
        if self.num_instances < 2:
            bad("num_instances", f"must be >= 2 (the triplet loss needs positives), got {self.num_instances}")
        if self.batch_size % self.num_instances or self.batch_size < 2 * self.num_instances:
            bad("batch_size", f"must be a multiple of num_instances ({self.num_instances}) covering at "
                f"least 2 identities, got {self.batch_size}")
        for key in ("log_every", "test_batch_size", "max_rank", "synth_identities", "synth_images_per_identity",
                    "val_every", "val_start"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                bad(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("flip_prob", "random_erasing", "label_smoothing", "i2t_label_smoothing"):
            if not 0 <= getattr(self, key) <= 1:
                bad(key, f"must be within [0, 1], got {getattr(self, key)}")
        for key, allowed in CHOICES.items():
            if getattr(self, key) not in allowed:
                bad(key, f"unknown value {getattr(self, key)!r}; choose one of {', '.join(allowed)}")
        for key in ("id_loss_weight", "triplet_loss_weight", "i2t_loss_weight", "t2i_loss_weight", "lr_gamma",
                    "bias_lr_factor"):
            if getattr(self, key) < 0 or (key in ("lr_gamma", "bias_lr_factor") and getattr(self, key) == 0):
                bad(key, f"must be {'positive' if key in ('lr_gamma', 'bias_lr_factor') else '>= 0'}, "
                         f"got {getattr(self, key)}")
        for key in ("pixel_mean", "pixel_std"):
            value = getattr(self, key)
            if len(value) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                                      for v in value) or (key == "pixel_std" and min(value) <= 0):
                bad(key, f"must be three numbers{' > 0' if key == 'pixel_std' else ''}, got {value}")
        if self.triplet_margin is not None and self.triplet_margin < 0:
            bad("triplet_margin", f"must be >= 0 or null (soft margin), got {self.triplet_margin}")
        if self.weight_decay_bias is not None and self.weight_decay_bias < 0:
            bad("weight_decay_bias", f"must be >= 0, got {self.weight_decay_bias}")
        for key in ("warmup_factor", "warmup_factor_prompt"):
            value = getattr(self, key)
            if value is not None and not 0 < value <= 1:
                bad(key, f"must be within (0, 1], got {value}")
        if self.warmup_epochs_prompt is not None and self.warmup_epochs_prompt < 0:
            bad("warmup_epochs_prompt", f"must be >= 0, got {self.warmup_epochs_prompt}")
        if self.lr_schedule == "multistep":
            if not self.lr_steps or any(not isinstance(e, int) or isinstance(e, bool) for e in self.lr_steps):
                bad("lr_steps", f"multistep needs a list of epochs, got {self.lr_steps}")
            if sorted(self.lr_steps) != list(self.lr_steps) or not 0 < self.lr_steps[0] or \
                    self.lr_steps[-1] > self.epochs_image:
                bad("lr_steps", f"must increase within 1..epochs_image ({self.epochs_image}), got {self.lr_steps}")
        if self.val_identities < 0 or (self.val_identities >= 1 and not float(self.val_identities).is_integer()):
            bad("val_identities", f"must be 0, a fraction below 1 or a whole count, got {self.val_identities}")
        if self.split < 0:
            bad("split", f"must be >= 0, got {self.split}")
        if "t2i" in self.losses and self.i2t_mode == "all_classes":
            bad("i2t_mode", "all_classes has no t2i term (as the official stage 2); remove t2i from loss_list")
        if self.i2t_mode == "all_classes" and "i2t" in self.losses and \
                (self.train_text_encoder or not self.freeze_prompt):
            bad("i2t_mode", "all_classes encodes every identity's text once per stage (as the official stage 2), "
                            "so nothing on the text side can train: set freeze_prompt: true, train_text_encoder: false")
        if self.arcface_scale <= 0 or not 0 <= self.arcface_margin < 1.6:
            bad("arcface_margin" if self.arcface_scale > 0 else "arcface_scale",
                "scale must be > 0 and margin within [0, 1.6) radians")
        if self.contrastive_logit_scale is not None and self.contrastive_logit_scale <= 0:
            bad("contrastive_logit_scale", f"must be positive, got {self.contrastive_logit_scale}")
        if not self.device == "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", self.device):
            bad("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.synth_test_identities is not None and self.synth_test_identities < 1:
            bad("synth_test_identities", f"must be >= 1 or null, got {self.synth_test_identities}")
        if not self.losses:
            bad("loss_list", "is empty")
        _check_template("promptsg_template", self.promptsg_template, self.aspect)
        if self.system_metrics_interval <= 0:
            bad("system_metrics_interval", f"must be positive, got {self.system_metrics_interval}")
        if self.promptsg_module_lr <= 0:
            bad("promptsg_module_lr", f"must be positive, got {self.promptsg_module_lr}")
        if self.promptsg_supcon_weight < 0:
            bad("promptsg_supcon_weight", f"must be >= 0, got {self.promptsg_supcon_weight}")
        for key, low in (("mim_blocks", 0), ("mim_heads", 1), ("inversion_hidden", 1)):
            if getattr(self, key) < low:
                bad(key, f"must be >= {low}, got {getattr(self, key)}")
        if self.stage_mode == "promptsg":
            for key, wanted in (("test_feature", "proj"), ("i2t_mode", "batch_supcon"),
                                ("i2t_logit_mode", "cosine_scaled"), ("train_text_encoder", False)):
                if getattr(self, key) != wanted:
                    bad(key, f"stage_mode promptsg needs {key}: {str(wanted).lower()} (its SupCon is in the batch on "
                             f"cosine logits, its text encoder stays frozen, its feature is the interaction module's)")

    @property
    def losses(self) -> tuple[str, ...]:
        """loss_list with aliases resolved, in canonical order."""
        return resolve_loss_list(self.loss_list)

    @property
    def has_holdout(self) -> bool:
        """Whether selection reads a validation split (val_identities or a val/ folder decide at run time)."""
        return self.val_identities > 0

    @property
    def prompt_lr(self) -> float:
        return self.lr if self.lr_prompt is None else self.lr_prompt

    @property
    def trains_prompt(self) -> bool:
        return self.stage_mode in ("prompt_then_image", "prompt_only")

    @property
    def trains_image(self) -> bool:
        """Whether the image encoder trains (CLIP-ReID's image stage, or PromptSG's one stage)."""
        return self.stage_mode in ("prompt_then_image", "image_only", "promptsg")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """Short, stable hash of the resolved config (tags, checkpoints, caches)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _check_template(key: str, template: str, aspect: str) -> None:
    """A prompt template may hold the {aspect} placeholder and no other, and must hold it when
    aspect is set; a stray brace is a ConfigError, not a format error in the middle of a run."""
    import string

    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ConfigError(f"{key}: {template!r} is not a valid template ({err}); write a literal brace as {{{{ or }}}}")
    if any(name != "aspect" for name in fields):
        raise ConfigError(f"{key}: {template!r}: only the {{aspect}} placeholder is allowed")
    if aspect and "aspect" not in fields:
        raise ConfigError(f"{key}: {template!r} has no {{aspect}} placeholder while aspect is {aspect!r}")


def resolve_loss_list(loss_list) -> tuple[str, ...]:
    chosen = set()
    for name in loss_list:
        key = str(name).lower()
        if key in LOSS_NAMES:
            chosen.add(key)
        elif key in LOSS_ALIASES:
            chosen.update(LOSS_ALIASES[key])
        else:
            raise ConfigError(f"loss_list: unknown loss {name!r}; known: {', '.join(LOSS_NAMES)} "
                              f"(aliases: {', '.join(LOSS_ALIASES)})")
    return tuple(n for n in LOSS_NAMES if n in chosen)


# ----------------------------------------------------------------------------- loading

def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_UNION_WANTS = {"num_workers": "must be auto or a count >= 0"}  # what a key of several types takes, in words


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return value coerced to the annotation (int -> float only), or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _check_type(key, value, inner[0])
        for kind in inner:  # e.g. int | str: the first that takes the value
            try:
                return _check_type(key, value, kind)
            except ConfigError:
                pass
        want = _UNION_WANTS.get(key) or "expected " + " or ".join(getattr(k, "__name__", str(k)) for k in inner)
        raise ConfigError(f"{key}: {want}, got {type(value).__name__} {value!r}")
    if annotation is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # PyYAML reads 1e-4 (no dot) as a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # YAML's .nan and .inf
                raise ConfigError(f"{key}: must be a finite number, got {value}")
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation in (bool, str, dict, list):
        if isinstance(value, annotation):
            return list(value) if annotation is list else value
    elif dataclasses.is_dataclass(annotation):
        if isinstance(value, dict):
            return _build(annotation, value, prefix=f"{key}.")
    else:  # pragma: no cover - a schema bug, not a user error
        raise TypeError(f"unsupported annotation {annotation} for {key}")
    want = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"{key}: expected {want}, got {type(value).__name__} {value!r}")


def _build(cls, values: dict, prefix: str = ""):
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            close = difflib.get_close_matches(key, list(types_), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{prefix}{key}: unknown config key{hint}")
        kwargs[key] = _check_type(prefix + key, value, types_[key])
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'a.b=1e-4'`` -> (['a', 'b'], 1e-4); the value is parsed as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"{key}: cannot parse override value {raw!r}: {err.problem}") from None
    if isinstance(value, str) and raw.strip().lower() in ("null", "none", "~"):
        value = None
    return key.split("."), value


def apply_overrides(values: dict, overrides: list[str] | None) -> dict:
    """Return a copy of the raw YAML dict with each ``key=value`` override applied.

    An override may not change the type of a key the YAML or the defaults already give (an int
    where a float is expected is fine)."""
    values = json.loads(json.dumps(values))  # deep copy of plain YAML data
    defaults = Config().to_dict()
    for text in overrides or []:
        path, value = parse_override(text)
        target, default = values, defaults
        for part in path[:-1]:
            if not isinstance(default, dict) or part not in default:
                raise ConfigError(f"{'.'.join(path)}: unknown config key")
            target = target.setdefault(part, {})
            default = default[part]
            if not isinstance(target, dict):
                raise ConfigError(f"{'.'.join(path)}: {part} is not a section")
        target[path[-1]] = value
    return values


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error: otherwise
    the later value would win without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys written next to it override
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment file (or only the defaults when path is None), apply overrides,
    validate, and return the frozen Config. Raises ConfigError naming the offending key."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path} is a folder; give an experiment YAML file, e.g. experiments/quickstart.yaml")
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (expected a YAML experiment config)") from None
        except OSError as err:
            raise ConfigError(f"{path}: cannot read: {err.strerror}") from None
        try:
            loader = _UniqueKeyLoader(text)
            try:
                values = loader.get_single_data() or {}
            finally:
                loader.dispose()
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or str(err).strip().splitlines()[0]
            raise ConfigError(f"{path}: not valid YAML{where}: {problem}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    values = apply_overrides(values, overrides)
    return _build(Config, values)


def replace(cfg: Config, **changes) -> Config:
    """A validated copy of cfg with changes (dotted sections via nested dicts)."""
    values = cfg.to_dict()
    for key, value in changes.items():
        values[key] = value
    return _build(Config, values)


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become their JSON text (MLflow params)."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and name != "tune.space":
            out.update(flatten(value, name + "."))
        elif isinstance(value, (dict, list)):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


# ----------------------------------------------------------------------------- names

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "", text.replace("/", "").replace("-", "")) or "x"


def build_filename(cfg: Config, epochs: int | None, stage: str, extension: str | None = None,
                   timestamped: bool = False, tag: str = "") -> str:
    """Name of one file of a run, e.g. ``quickstart_ViTB16_11k_dorsalright_base_e40_lr5e-05_bs32_nctx12_image_BEST.pth``.

    experiment, model, dataset, aspect, variant, epochs, lr, batch size, n_ctx (when the prompt
    matters), then the stage and tag. With ``extension=None`` it returns the stem, which is also
    the MLflow run name."""
    lr = cfg.prompt_lr if stage == "prompt" else cfg.lr
    parts = [_slug(cfg.experiment), _slug(cfg.model_type), _slug(cfg.dataset),
             _slug(cfg.aspect or "noaspect"), _slug(cfg.variant)]
    if epochs is not None:
        parts.append(f"e{epochs}")
    parts += [f"lr{lr:g}", f"bs{cfg.batch_size}"]
    if cfg.stage_mode == "promptsg":
        parts.append("promptsg")
    elif cfg.stage_mode != "image_only":
        parts.append(f"nctx{cfg.n_ctx}")
    parts.append(stage + (f"_{tag.lstrip('_')}" if tag else ""))
    if timestamped:
        parts.append(time.strftime("%Y%m%d-%H%M%S"))
    stem = "_".join(parts)
    return f"{stem}.{extension.lstrip('.')}" if extension else stem
