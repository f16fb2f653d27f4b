"""``train_joint``: build data, model and tracking from a Config, run the stage mode, return
the final metrics. ``workbench run`` and every tuning trial call this one function."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import config as config_module
from . import distributed
from .config import Config, build_filename
from .errors import DataError, TrackingError, UsageError, os_error_message
from .data import (ReIDData, build_loaders, detect_format, load_reid_dataset, load_test_split, loader_workers,
                   records_digest, split_folders, synthesize_dataset, synthetic_settings, test_loader)
from .evaluation import evaluate_splits, mean_and_std
from .pictures import pick_queries, plot_cmc, plot_ranked_lists, save_curves
from .checkpoint import (GLOBAL_RNG, atomic_torch_save, atomic_write_text, check_readable, load_checkpoint,
                         own_generator, read_checkpoint, remove_stale_temporaries, rng_state, set_rng_state)
from .heads import register_bnneck_and_arcface
from .model import (PromptLearner, check_prompt_fits, compile_encoders, freeze_entire_clip_model, load_clip_with_patch,
                    resolve_model_name)
from .stages import (ImageStageSettings, PromptStageSettings, cache_image_features, console_on, quiet_console,
                     train_clipreid_image_stage, train_clipreid_prompt_stage)
from .tracking import NullTracker, RunStopped, Tracker, run_params
from .methods.promptsg import STEP_KEYS as PROMPTSG_STEP_KEYS
from .methods.promptsg import PromptSGSettings, check_promptsg, register_promptsg, train_promptsg_stage

LOSS_KEYS = ["loss", "id_loss", "tri_loss", "center_loss", "i2t_loss", "t2i_loss", "feat_norm", "arc_conf", "lr"]
PROMPT_KEYS = ["prompt_loss", "i2t_loss", "t2i_loss", "prompt_norm", "prompt_var", "prompt_class_var", "prompt_grad",
               "logits_std"]
EVAL_KEYS = ["rank1", "rank5", "rank10", "mAP", "prompt_rank1", "prompt_mAP"]
TEST_KEYS = [f"{prefix}{k}" for prefix in ("test_", "final_test_") for k in ("rank1", "rank5", "rank10", "mAP", "mINP")]
PROMPTSG_KEYS = [*PROMPTSG_STEP_KEYS, "composed_mAP", "simplified_mAP", "global_mAP", "prompt_sensitivity"]
PROMPTSG_TEST_KEYS = [f"{prefix}{k}" for prefix in ("test_", "final_test_")
                      for k in ("composed_mAP", "simplified_mAP", "global_mAP", "prompt_sensitivity")]
END_KEYS = ["best_rank1", "best_mAP", "best_mINP", "best_epoch", "prompt_rank1", "prompt_mAP", *TEST_KEYS,
            *PROMPTSG_TEST_KEYS, "prompt_stage_seconds", "image_stage_seconds", "total_seconds"]


def select_device(name: str) -> torch.device:
    """The run's device; under torchrun each rank's own GPU (``cuda:LOCAL_RANK``)."""
    if name == "auto":
        return distributed.device_for(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise config_module.ConfigError(f"device: {name} requested but CUDA is not available")
    return distributed.device_for(device)


def workers_side_by_side(cfg: Config, runs: int, device: str | None = None) -> int | str:
    """``cfg.num_workers`` for one of ``runs`` runs side by side in this process (parallel trials
    on ``device``, else the config's): ``auto`` resolved on each run's share of the cores
    (``data.loader_workers``), a count as it is."""
    if cfg.num_workers != "auto" or runs <= 1:
        return cfg.num_workers
    on_gpu = (device or cfg.device) != "cpu" and torch.cuda.is_available()
    return loader_workers("auto", on_gpu=on_gpu, sharing=runs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class _LogFileHandler(logging.FileHandler):
    """A run's log file; when it cannot be written (disk full) one warning line replaces
    logging's traceback per record, and the console keeps the messages."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            reason = sys.exc_info()[1]
            print(f"warning: cannot write the log file {self.baseFilename} ({reason}); messages go to the "
                  f"console only", file=sys.stderr)


def setup_logger(log_path: Path | None) -> logging.Logger:
    """A logger writing to the run's .log file and to the console (not under ``quiet_console``);
    with no ``log_path`` (a DDP rank other than 0) a silent one."""
    logger = logging.getLogger(f"workbench.run.{log_path or f'rank{distributed.rank()}'}")
    logger.setLevel(logging.DEBUG)  # DEBUG lines (a failure's traceback) go to the file only
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    if log_path is None:
        logger.addHandler(logging.NullHandler())
        return logger
    file_handler = _LogFileHandler(log_path)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(file_handler)
    if console_on():
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.INFO)
        console.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(console)
    return logger


def check_data_root(cfg: Config) -> Path:
    """``data_root``, or a ConfigError when it is missing and will not be synthesized, lacks its
    layout's folders, or holds a synthetic dataset other than the config's synth_* keys describe."""
    root = Path(cfg.data_root)
    if not root.exists() and not cfg.synthesize_if_missing:
        raise config_module.ConfigError(f"data_root: dataset folder not found: {root} (set data_root, or "
                                        f"synthesize_if_missing: true for the synthetic dataset)")
    if root.exists() and not root.is_dir():
        raise config_module.ConfigError(f"data_root: {root} is a file, not a dataset folder")
    if root.is_dir():
        _check_layout(cfg, root)
        if cfg.synthesize_if_missing:
            check_synthetic_settings(cfg, root)
    return root


def _check_layout(cfg: Config, root: Path) -> None:
    """The folders of ``data_root``'s layout (for the config's test split) are there: a data_root
    that is not a dataset is the config's mistake, found before a run exists."""
    market = (detect_format(root) if cfg.dataset_format == "auto" else cfg.dataset_format) == "market1501"
    if market:
        needed = [root / "bounding_box_train", root / "query", root / "bounding_box_test"]
    else:
        try:
            needed = [root / "train", *split_folders(root, cfg.split)]
        except DataError as err:  # a split the prepared tree does not have
            raise config_module.ConfigError(str(err)) from None
    missing = [f"{path.name}/" for path in needed if not path.is_dir()]
    if missing:
        raise config_module.ConfigError(
            f"data_root: {root} has no {', '.join(missing)}: not a dataset in the "
            f"{'Market-1501' if market else 'folder'} layout (train/, query/, gallery/ of identity folders, or "
            f"Market-1501's bounding_box_train/, query/, bounding_box_test/)")


def ensure_dataset(cfg: Config, log: Callable[[str], None]) -> Path:
    """The data root, the synthetic dataset generated first when the config says so. Processes
    that start together (the workers of a study) generate it once: under a file lock beside it."""
    root = check_data_root(cfg)
    if not root.exists():
        with _dataset_lock(root):
            if not root.exists():  # not made meanwhile by another process
                log(f"generating the synthetic dataset in {root} ({cfg.synth_identities} training identities)")
                synthesize_dataset(root, cfg.synth_identities, cfg.synth_images_per_identity, seed=cfg.seed,
                                   test_identities=cfg.synth_test_identities,
                                   size=tuple(cfg.image_size))
    return root


def check_synthetic_settings(cfg: Config, root: Path) -> None:
    """A synthetic dataset already in ``data_root`` must be the one the config's synth_* keys
    describe: otherwise the run would log those keys while it trains on other data. (Its seed
    and image size are not compared: a run with another seed or size reads the same images.)"""
    made = synthetic_settings(root)
    if made is None:
        return
    wanted = {"identities": cfg.synth_identities, "images_per_identity": cfg.synth_images_per_identity,
              "test_identities": cfg.synth_test_identities or cfg.synth_identities}
    said = {"test_identities": f"null, i.e. {cfg.synth_identities}"} if cfg.synth_test_identities is None else {}
    differ = [f"synth_{key} {made.get(key)} (the config says {said.get(key, value)})" for key, value in wanted.items()
              if made.get(key) != value]
    if differ:
        raise config_module.ConfigError(f"data_root: {root} holds a synthetic dataset made with {', '.join(differ)}; "
                                        f"give another data_root, delete {root} to make it anew, or set "
                                        f"synthesize_if_missing: false to train on it as it is")


@contextlib.contextmanager
def _dataset_lock(root: Path):
    """An exclusive lock on ``<root>.lock``; none where that file cannot be made (synthesize_dataset
    then names the problem)."""
    import fcntl

    try:
        root.parent.mkdir(parents=True, exist_ok=True)
        handle = open(root.with_name(root.name + ".lock"), "a+")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if root.exists():  # made: whoever waits on this lock finds it there, so the file can go
                with contextlib.suppress(OSError):
                    root.with_name(root.name + ".lock").unlink()
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_tags(cfg: Config) -> dict[str, str]:
    return {"stage_mode": cfg.stage_mode, "model": cfg.model_type, "dataset": cfg.dataset, "aspect": cfg.aspect,
            "variant": cfg.variant, "git_commit": git_commit(), "config_hash": cfg.hash()}


class FeatureCache:
    """Frozen training-image features of the prompt stage, shared by runs that would compute the
    same ones (the trials of a study): keyed by model, weights, data, input size, seed (random
    weights depend on it), device and precision. Kept in memory and, with ``folder``, on disk so
    that worker processes and resumed studies reuse them too. Thread-safe; ``misses`` counts
    the extractions actually run."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder else None
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.misses = 0
        self._lock = threading.Lock()

    @staticmethod
    def key(cfg: Config) -> str:
        parts = [resolve_model_name(cfg.model_type), cfg.pretrained, cfg.quick_gelu, str(Path(cfg.data_root).resolve()),
                 list(cfg.image_size), cfg.seed if cfg.pretrained in (None, "", "none") else None,
                 cfg.device, cfg.amp, "raw", cfg.pixel_mean, cfg.pixel_std, cfg.val_identities, cfg.val_seed]
        return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]

    def get(self, cfg: Config, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]], device: torch.device):
        key = self.key(cfg)
        with self._lock:
            if key not in self.memory and self.folder is not None and (self.folder / f"{key}.pt").is_file():
                feats, labels = torch.load(self.folder / f"{key}.pt", map_location="cpu", weights_only=True)
                self.memory[key] = (feats, labels)
            if key not in self.memory:
                self.misses += 1
                feats, labels = compute()
                self.memory[key] = (feats.cpu(), labels.cpu())
                if self.folder is not None:
                    atomic_torch_save(self.memory[key], self.folder / f"{key}.pt")
            feats, labels = self.memory[key]
        return feats.to(device), labels.to(device)


# Config keys that only the image stage reads (the prompt stage's learning rate, which falls back
# on lr, enters the key resolved): runs that differ in nothing else train the same prompt stage.
IMAGE_STAGE_KEYS = frozenset({
    "lr", "center_loss_weight", "center_lr", "epochs_image", "triplet_margin", "label_smoothing", "id_loss_weight",
    "triplet_loss_weight", "i2t_loss_weight", "t2i_loss_weight", "i2t_label_smoothing", "lr_schedule", "lr_steps",
    "lr_gamma", "weight_decay_bias", "bias_lr_factor", "val_every", "val_start", "select_metric", "output_dir"})


class _RecordingTracker:
    """Passes everything on to ``tracker`` and keeps the metrics logged, to replay them."""

    def __init__(self, tracker: Tracker):
        self._tracker, self.metrics = tracker, []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics.append(({k: float(v) for k, v in metrics.items()}, step))
        self._tracker.log_metrics(metrics, step)

    def __getattr__(self, name):
        return getattr(self._tracker, name)


class PromptStageCache:
    """Finished prompt stages shared by runs that would train the same one (the trials of a study
    that differ only in image-stage keys, such as lr or center_loss_weight): the learned prompt,
    the random state after the stage, its logged metrics and its FINAL checkpoint. A run that
    finds its stage here goes on from exactly where the first run's prompt stage ended (with
    ``--n-jobs 1``; threads share the global RNG). Thread-safe: runs needing the same stage at
    once wait for the first; ``misses`` counts the stages actually trained."""

    def __init__(self):
        self.entries: dict[str, dict] = {}
        self.misses = 0
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(cfg: Config) -> str:
        values = {k: v for k, v in cfg.to_dict().items() if k not in IMAGE_STAGE_KEYS}
        values["prompt_stage"] = dataclasses.asdict(PromptStageSettings.from_config(cfg))
        return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]

    @contextlib.contextmanager
    def slot(self, cfg: Config):
        """Yields ``cfg``'s stored stage, or None: then the caller trains it and ``store``s it
        before leaving, while runs needing the same stage wait."""
        key = self.key(cfg)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            entry = self.entries.get(key)
            if entry is None:
                self.misses += 1
            yield entry

    def store(self, cfg: Config, entry: dict) -> None:
        self.entries[self.key(cfg)] = entry


def preflight(cfg: Config, ranks: int | None = None) -> None:
    """The config mistakes that can be found before anything starts (model name, device, data
    folder, what ``ranks`` processes (default: torchrun's) cannot run): found here, they leave
    no run folder and no MLflow run behind."""
    resolve_model_name(cfg.model_type)
    select_device(cfg.device)
    check_data_root(cfg)
    if ranks is None:
        check_ranks(cfg, distributed.env_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    else:
        check_ranks(cfg, ranks, ranks)


def check_ranks(cfg: Config, ranks: int, here: int) -> None:
    """What a run on ``ranks`` DDP processes (``here`` of them on this machine) needs: P x K
    batches whose P identities the ranks share equally, and a GPU for each process here."""
    if ranks <= 1:
        return
    gpus = torch.cuda.device_count()
    if select_device(cfg.device).type == "cuda" and gpus < here:
        raise config_module.ConfigError(f"device: {here} processes on this machine need a GPU each; {gpus} are "
                                        f"visible (lower --nproc / --nproc-per-node)")
    identities = cfg.batch_size // cfg.num_instances
    if identities % ranks:
        raise config_module.ConfigError(
            f"batch_size: {cfg.batch_size} holds {identities} identities of num_instances {cfg.num_instances} "
            f"images, which {ranks} processes cannot share equally; make batch_size / num_instances a multiple "
            f"of {ranks}")


def check_model_shapes(cfg: Config) -> None:
    """The mistakes that need the model's shape, found from open_clip's config without building
    it: a prompt longer than CLIP's context, PromptSG's heads. ``workbench run`` checks them
    before its run exists; a tuning trial meets them inside its own run, which records why."""
    name = resolve_model_name(cfg.model_type)
    if cfg.stage_mode == "promptsg":
        check_promptsg(cfg)
    elif cfg.stage_mode != "image_only" or not cfg.freeze_prompt:
        check_prompt_fits(name, cfg.prompt_template.format(aspect=cfg.aspect).strip(), cfg.n_ctx, None, "n_ctx",
                          f"with n_ctx={cfg.n_ctx}", "lower n_ctx or shorten prompt_template")


def check_resumable(cfg: Config, run_dir: Path) -> None:
    """What ``workbench resume`` looks at before the MLflow run is reopened (a finished run's
    record stays as it is): the folder is a run of ``cfg``, not finished, and the checkpoint it
    goes on from is readable."""
    stem = build_filename(cfg, cfg.epochs_image if cfg.trains_image else cfg.epochs_prompt,
                          "image" if cfg.trains_image else "prompt")
    if not (run_dir / f"{stem}_config.yaml").is_file():
        raise UsageError(f"cannot resume: {run_dir} holds no {stem}_config.yaml (not a run folder of this config)")
    last = run_dir / build_filename(cfg, cfg.epochs_image, "image", "pth", tag="LAST")
    final = run_dir / build_filename(cfg, cfg.epochs_image, "image", "pth", tag="FINAL")
    if not (cfg.trains_image and last.is_file()) and final.is_file():
        raise UsageError(f"cannot resume: the run in {run_dir} already finished ({final.name} exists)")
    prompt_final = run_dir / build_filename(cfg, cfg.epochs_prompt, "prompt", "pth", tag="FINAL")
    for path in (last, prompt_final):  # what the resume will start from
        if path.is_file():
            check_readable(path)
            break


def train_joint(cfg: Config | str | Path, tracker: Tracker | None = None,
                report: Callable[[int, dict], None] | None = None, *, run_name: str | None = None,
                parent_run_id: str | None = None, extra_tags: dict | None = None,
                feature_cache: FeatureCache | None = None, prompt_cache: PromptStageCache | None = None,
                keep_checkpoints: bool = True, resume_dir: str | Path | None = None, quiet: bool = False) -> dict:
    """One complete run: prompt stage and/or image stage as ``cfg.stage_mode`` says.

    ``cfg`` is a Config or a YAML path. The tracker (default: none) gets one run named by
    ``build_filename``'s stem. ``report(epoch, metrics)`` is called after every validation.
    ``feature_cache`` (a FeatureCache shared between runs) reuses the frozen training features of the
    prompt stage when model, weights, data and transforms are the same; ``prompt_cache`` (a
    PromptStageCache) the whole prompt stage when only image-stage keys differ. Returns the final
    metrics: best_rank1, best_mAP, best_epoch, final rank-k, wall times, run_id and run_dir.

    ``resume_dir`` (the folder of an earlier, interrupted run of the same config) continues it:
    a finished prompt stage is loaded, not retrained, the image stage goes on after its last
    finished epoch, and the same MLflow run receives the numbers. ``quiet`` keeps the progress
    bars and log lines off the console (the log file has them): trials side by side."""
    if quiet:
        with quiet_console():
            return train_joint(cfg, tracker, report, run_name=run_name, parent_run_id=parent_run_id,
                               extra_tags=extra_tags, feature_cache=feature_cache, prompt_cache=prompt_cache,
                               keep_checkpoints=keep_checkpoints, resume_dir=resume_dir)
    cfg = config_module.load(cfg) if isinstance(cfg, (str, Path)) else cfg
    main = distributed.is_main()
    tracker = tracker if tracker is not None and main else NullTracker()  # under DDP only rank 0 logs
    preflight(cfg)
    stem = build_filename(cfg, cfg.epochs_image if cfg.trains_image else cfg.epochs_prompt,
                          "image" if cfg.trains_image else "prompt")
    if resume_dir is not None:
        run_dir = Path(resume_dir)
        check_resumable(cfg, run_dir)
    else:
        base = Path(cfg.output_dir) / f"{stem}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}"
        run_dir, n = base, 1
        while run_dir.exists():  # two runs of one config within a second
            n += 1
            run_dir = base.with_name(f"{base.name}_{n}")
        run_dir = Path(distributed.broadcast_object(str(run_dir)))  # the DDP ranks share rank 0's folder
    if main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise config_module.ConfigError(os_error_message(err, f"output_dir: cannot create the run folder "
                                                                  f"{run_dir}"))
        if not os.access(run_dir, os.W_OK):
            raise config_module.ConfigError(f"output_dir: cannot write to {run_dir}; choose a folder you can write to")
    run_file = run_dir / f"{stem}_run.json"
    previous_run_id = json.loads(run_file.read_text())["run_id"] if resume_dir and run_file.exists() else None
    with contextlib.ExitStack() as stack:
        try:
            run_id = stack.enter_context(tracker.start_run(
                run_name or stem, cfg.experiment, tags=run_tags(cfg) | (extra_tags or {}),
                parent_run_id=parent_run_id, run_id=previous_run_id, spool_dir=run_dir))
        except TrackingError:
            if resume_dir is None and main:  # no run folder without its MLflow run
                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        if cfg.system_metrics or (cfg.system_metrics is None and select_device(cfg.device).type == "cuda"):
            stack.enter_context(tracker.system_metrics(cfg.system_metrics_interval))
        result = _tracked_run(cfg, tracker, report, run_dir, stem, run_id, (feature_cache, prompt_cache),
                              keep_checkpoints,
                              resume=resume_dir is not None, new_run=previous_run_id is None,
                              hint_resume=(extra_tags or {}).get("workbench.role") != "trial")
    return result


def _tracked_run(cfg: Config, tracker: Tracker, report, run_dir: Path, stem: str, run_id: str,
                 caches: tuple[FeatureCache | None, PromptStageCache | None], keep_checkpoints: bool, resume: bool,
                 new_run: bool,
                 hint_resume: bool = True) -> dict:
    """The body of ``train_joint`` inside its MLflow run: log file, config, stages, plots,
    checkpoints; a failure's traceback goes to the log file, its one line to the caller. An
    interruption says how to resume (``hint_resume``; a tuning trial is replaced instead)."""
    main = distributed.is_main()
    log_path = run_dir / f"{stem}.log"
    logger = setup_logger(log_path if main else None)  # DDP ranks other than 0 write no files
    log = logger.info
    removed = remove_stale_temporaries(run_dir) if resume and main else []
    if removed:
        log(f"removed {len(removed)} partial file(s) of an interrupted save: {', '.join(p.name for p in removed)}")
    config_path = run_dir / f"{stem}_config.yaml"
    if main:
        atomic_write_text(config_path, cfg.to_yaml())
        atomic_write_text(run_dir / f"{stem}_run.json", json.dumps({"run_id": run_id}))
    written: list[Path] = []
    try:
        if distributed.active():
            log(f"DDP: {distributed.world_size()} processes ({torch.distributed.get_backend()}), "
                f"{cfg.batch_size // distributed.world_size()} images per process of each {cfg.batch_size}-image "
                f"batch, losses on " + ("the gathered global batch" if cfg.ddp_global_batch else
                                        "each process's share (ddp_global_batch: false)")
                + "; this is rank 0, which logs, prints and writes the files")
        if new_run:
            tracker.log_params(run_params(cfg))
            tracker.log_artifact(config_path)
        result = _run_stages(cfg, tracker, report, log, run_dir, stem, written, caches, resume=resume,
                             run_id=run_id, resumable=hint_resume)
        result.update(run_id=run_id, run_dir=str(run_dir))
        tracker.log_metrics({k: result[k] for k in END_KEYS if result.get(k) is not None}, step=0)
        plots = [(f"{stem}_losses.png", LOSS_KEYS), (f"{stem}_metrics.png", EVAL_KEYS)]
        plots.append((f"{stem}_promptsg.png", PROMPTSG_KEYS) if cfg.stage_mode == "promptsg" else
                     (f"{stem}_prompt.png", PROMPT_KEYS))
        for name, keys in plots if main else []:
            plot = save_curves(tracker.history, run_dir / name, keys, stem)
            if plot is not None:
                tracker.log_artifact(plot, "plots")
        if cfg.log_checkpoints and keep_checkpoints:
            for path in written:
                if path.exists():
                    tracker.log_artifact(path, "checkpoints")
        log(f"run finished: {summary_line(result)}, {result['total_seconds']:.1f}s; files in {run_dir}")
    except RunStopped:
        raise
    except KeyboardInterrupt as err:
        how = "terminated (SIGTERM)" if type(err).__name__ == "Terminated" else "interrupted"
        log(f"run {how}" + _resume_hint(cfg, run_dir, hint_resume))
        raise
    except BaseException as err:
        # The command line prints the one-line reason; the log file keeps the traceback.
        logger.debug("run failed:\n" + "".join(traceback.format_exception(err)).rstrip())
        lost = distributed.lost_peer(err)  # DDP: another rank's process ended
        if lost is None:
            raise
        log(f"run stopped: {lost}" + _resume_hint(cfg, run_dir, hint_resume))
        raise lost from None
    finally:
        for handler in list(logger.handlers):
            handler.flush()
        if main:
            tracker.log_artifact(log_path)
        for handler in list(logger.handlers):
            handler.close()
            logger.removeHandler(handler)
    return result


def _resume_hint(cfg: Config, run_dir: Path, hint: bool) -> str:
    """"; continue it with: workbench resume ..." when the run left a checkpoint to go on from; when
    it stopped before its first checkpoint (in the prompt stage, say), that the resume starts over."""
    starts = [run_dir / build_filename(cfg, cfg.epochs_image, "image", "pth", tag="LAST"),
              run_dir / build_filename(cfg, cfg.epochs_prompt, "prompt", "pth", tag="FINAL")]
    final = run_dir / build_filename(cfg, cfg.epochs_image, "image", "pth", tag="FINAL")
    if not (hint and cfg.trains_image) or final.is_file():
        return ""
    ranks = f" --nproc {distributed.world_size()}" if distributed.active() else ""
    if any(path.is_file() for path in starts):
        return f"; continue it with: workbench resume {run_dir}{ranks}"
    return f"; no checkpoint yet, so workbench resume {run_dir}{ranks} starts it over in its folder and MLflow run"


def _train_prompt_stage(cfg: Config, clip_model, prompt_learner, loaders, device: torch.device, tracker: Tracker, log,
                        feature_cache: FeatureCache | None, path: Path | None, metadata: dict,
                        prompt_cache: PromptStageCache | None, source: str) -> dict:
    """Train the prompt stage (on the shared frozen features when ``feature_cache`` has them);
    with ``prompt_cache``, store it for the runs that would train the same one."""
    cached = None
    if feature_cache is not None:
        misses = feature_cache.misses
        cached = feature_cache.get(cfg, lambda: cache_image_features(clip_model, loaders.train_eval, device,
                                                                     cfg.amp), device)
        log("frozen training features: " + ("computed and cached" if feature_cache.misses > misses
                                             else "reused from the cache"))
    recorder = _RecordingTracker(tracker)
    prompt = train_clipreid_prompt_stage(clip_model, prompt_learner, loaders.train_eval,
                                         PromptStageSettings.from_config(cfg), device, recorder, log,
                                         cached_features=cached, checkpoint_path=path, metadata=metadata)
    if prompt_cache is not None:
        prompt_cache.store(cfg, {
            "state": {k: v.detach().to("cpu", copy=True) for k, v in prompt_learner.state_dict().items()},
            "rng": rng_state(), "metrics": recorder.metrics, "source": source,
            "checkpoint": read_checkpoint(path) if path is not None else None,
            "result": {k: prompt[k] for k in ("prompt_loss", "prompt_rank1", "prompt_mAP", "steps")}})
    return prompt


def _reuse_prompt_stage(entry: dict, clip_model, prompt_learner, tracker: Tracker, log, path: Path | None,
                        metadata: dict) -> dict:
    """Go on from a prompt stage another run trained (``PromptStageCache``; tag
    ``prompt_stage_from``: that run's MLflow id): its prompt, its
    random state, its metrics logged again to this run, and its FINAL checkpoint with this run's
    metadata; the stage's wall time here is the time this took."""
    started = time.perf_counter()
    freeze_entire_clip_model(clip_model)
    prompt_learner.load_state_dict(entry["state"])
    for p in prompt_learner.parameters():
        p.requires_grad_(True)
    clip_model.eval()
    prompt_learner.train()
    for metrics, step in entry["metrics"]:
        tracker.log_metrics(metrics, step)
    tracker.flush()
    tracker.set_tags({"prompt_stage_from": entry["source"]})
    result = entry["result"]
    log(f"prompt stage: the same as in MLflow run {entry['source']} (only image-stage keys differ), reused: "
        f"{result['steps']} steps, loss {result['prompt_loss']:.4f}, image-to-prompt rank1 "
        f"{result['prompt_rank1']:.2f} mAP {result['prompt_mAP']:.2f}")
    if path is not None:
        atomic_torch_save({**entry["checkpoint"], "metadata": {**metadata, "stage": "prompt",
                                                      "progress": {"global_step": result["steps"]}}}, path)
        log(f"saved FINAL -> {path}")
    set_rng_state(entry["rng"])  # last: the image stage draws what it would after training the prompt here
    return {**result, "seconds": time.perf_counter() - started}


def build_model_and_loaders(cfg: Config, data, device: torch.device, log: Callable[[str], None] | None = None,
                            cache_images: bool | None = None):
    """Loaders, CLIP with BNNeck and ArcFace, and the prompt learner for ``cfg`` and ``data``:
    (loaders, clip_model, prompt_learner, feat_dim). Shared by runs and ``workbench eval``, which
    reads each image once and so passes ``cache_images=False`` (None: the config's key)."""
    loaders = build_loaders(data, image_size=cfg.image_size, batch_size=cfg.batch_size,
                            shard=(distributed.world_size(), distributed.rank()), num_instances=cfg.num_instances,
                            test_batch_size=cfg.test_batch_size,
                            num_workers=cfg.num_workers, seed=cfg.seed, flip_prob=cfg.flip_prob, pad=cfg.pad,
                            random_erasing=cfg.random_erasing, pin_memory=device.type == "cuda",
                            pixel_mean=tuple(cfg.pixel_mean), pixel_std=tuple(cfg.pixel_std),
                            cache_images=cfg.cache_images if cache_images is None else cache_images, log=log)
    clip_model = load_clip_with_patch(cfg.model_type, device, freeze_all=True, pretrained=cfg.pretrained,
                                      image_size=cfg.image_size, quick_gelu=cfg.quick_gelu, log=log)
    prompt_learner = PromptLearner(data.classnames, clip_model, cfg.n_ctx, cfg.prompt_template, cfg.aspect,
                                   model_name=resolve_model_name(cfg.model_type))
    feat_dim = register_bnneck_and_arcface(clip_model, data.num_classes, cfg.image_size, cfg.arcface_scale,
                                           cfg.arcface_margin, id_head=cfg.id_head,
                                           pre_proj_branch=cfg.test_feature == "proj_and_pre_proj")
    if cfg.stage_mode == "promptsg":
        register_promptsg(clip_model, cfg, feat_dim)
    return loaders, clip_model, prompt_learner, feat_dim


def feature_spec(cfg: Config):
    """The test-time feature of ``cfg``'s method (``evaluation.FeatureSpec``)."""
    settings = PromptSGSettings if cfg.stage_mode == "promptsg" else ImageStageSettings
    return settings.from_config(cfg).feature_spec


def load_data(cfg: Config) -> ReIDData:
    """The dataset of ``cfg`` with its validation hold-out (``val_identities``, seeded by
    ``val_seed`` or ``seed``) or its ``val/`` folder."""
    return load_reid_dataset(cfg.data_root, split=cfg.split, layout=cfg.dataset_format,
                             val_identities=cfg.val_identities,
                             val_seed=cfg.seed if cfg.val_seed is None else cfg.val_seed)


SPLIT_KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")


def evaluate_test_splits(cfg: Config, clip_model, device: torch.device, splits: list[int], out_dir: Path,
                         stem: str, flip: bool = False) -> dict:
    """Evaluate the model on the test splits ``splits`` of ``cfg.data_root`` (each image's
    features once), and write next to ``out_dir/<stem>``: the per-split table (CSV), the CMC
    curves (one per split and the mean) and the ranked lists of split ``splits[0]``.

    Returns ``results`` ({split: metrics}), ``summary`` (``mean_*``/``std_*``), ``files`` and the
    test images' ``digest``."""
    root = Path(cfg.data_root)
    records = {split: load_test_split(root, split, cfg.dataset_format) for split in splits}

    def loader_for(items):
        return test_loader(items, image_size=cfg.image_size, batch_size=cfg.test_batch_size,
                           num_workers=cfg.num_workers, pixel_mean=cfg.pixel_mean, pixel_std=cfg.pixel_std,
                           pin_memory=device.type == "cuda")

    spec = feature_spec(cfg)
    results = evaluate_splits(clip_model, records, loader_for, device, spec, amp=cfg.amp, flip=flip,
                              max_rank=cfg.max_rank, ranked_split=splits[0])
    summary = mean_and_std(results, SPLIT_KEYS)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = out_dir / f"{stem}_splits.csv"
    rows = [f"{split},{','.join(f'{r[k]:.4f}' for k in SPLIT_KEYS)},{r['num_valid_q']}" for split, r in results.items()]
    atomic_write_text(table, "\n".join([f"split,{','.join(SPLIT_KEYS)},num_valid_q", *rows]) + "\n")
    title = f"{stem}{' (flip)' if flip else ''}"
    cmc = plot_cmc({f"split {split}": r["cmc"] for split, r in results.items()}, out_dir / f"{stem}_cmc.png", title)
    first = results[splits[0]]
    query, gallery = records[splits[0]]
    ranked = plot_ranked_lists(query, gallery, first["ranked"], first["ap"], pick_queries(first["ap"], seed=cfg.seed),
                               out_dir / f"{stem}_ranked_split{splits[0]}.png",
                               f"{title}: split {splits[0]}, the worst queries (lowest AP) then random ones")
    digest = records_digest([r for q, g in records.values() for r in [*q, *g]], root)
    return {"results": results, "summary": summary, "files": [table, cmc, ranked], "digest": digest}


def log_datasets(tracker: Tracker, cfg: Config, data: ReIDData) -> None:
    """The run's training, validation and test images as MLflow dataset inputs, so that runs on
    the same data (and split) can be found by its digest."""
    name = f"{cfg.dataset}_{Path(cfg.data_root).name}"
    parts = {"train": data.train, "validation": data.val_query + data.val_gallery,
             f"test split {cfg.split}": data.query + data.gallery}
    for context, records in parts.items():
        if records:
            tracker.log_dataset(name, str(Path(cfg.data_root).resolve()), records_digest(records, cfg.data_root),
                                context)


def summary_line(result: dict) -> str:
    """One line of what a run found: the selection split's best and the test numbers."""
    if result.get("best_rank1") is None:
        return (f"prompt retrieval (training identities) rank1 {result['prompt_rank1']:.2f} "
                f"mAP {result['prompt_mAP']:.2f}")
    line = (f"best {result['selection']} rank1 {result['best_rank1']:.2f} mAP {result['best_mAP']:.2f} "
            f"(epoch {result['best_epoch']})")
    if result["selection"] == "val":
        line += f"; test rank1 {result['test_rank1']:.2f} mAP {result['test_mAP']:.2f}"
    return line


def _run_stages(cfg: Config, tracker: Tracker, report, log, run_dir: Path, stem: str, written: list[Path],
                caches: tuple[FeatureCache | None, PromptStageCache | None], resume: bool = False,
                run_id: str | None = None, resumable: bool = True) -> dict:
    """Data, model and the stages of ``cfg.stage_mode``. Without ``resumable`` (a tuning trial,
    which is replaced rather than resumed) no LAST checkpoint is written after each epoch."""
    started = time.perf_counter()
    feature_cache, prompt_cache = caches
    with GLOBAL_RNG:
        # Seeding, the model's initial weights and the prompt stage draw from the process-wide
        # generators: one run at a time does. The image stage draws from the run's own generator,
        # which goes on with the same stream.
        seed_everything(cfg.seed)
        device = select_device(cfg.device)
        ensure_dataset(cfg, log)
        data = load_data(cfg)
        log(f"data: {len(data.train)} train images of {data.num_classes} identities, {len(data.query)} query, "
            f"{len(data.gallery)} gallery, cameras {'known' if data.has_cameras else 'unknown'}")
        selection = "val" if data.has_validation else "test"
        if cfg.trains_image:
            tracker.set_tags({"selection": selection, "select_metric": cfg.select_metric})
            shared = {r.pid for r in data.val_query + data.val_gallery} & set(data.classnames)
            if shared:
                log(f"warning: {len(shared)} validation identities are also training identities (e.g. "
                    f"{sorted(shared)[0]}): validation then measures fit to seen people, not re-identification")
            if data.val_source == "holdout" and (Path(cfg.data_root) / "val").is_dir():
                log(f"note: {Path(cfg.data_root) / 'val'} is not used: val_identities draws the hold-out from train/ "
                    f"(set val_identities: 0 to validate on the folder)")
            if data.has_validation:
                log(f"validation ({data.val_source}): {len(data.val_query)} query and {len(data.val_gallery)} gallery "
                    f"images of {len({r.pid for r in data.val_gallery})} identities held out from training; BEST is "
                    f"selected on their {cfg.select_metric}, the test split is evaluated once at the end")
            else:
                log("warning: no validation split (set val_identities): BEST is selected on the test split, so its "
                    "numbers are optimistic; tag selection=test")
        if cfg.stage_mode == "image_only" and cfg.freeze_prompt and {"i2t", "t2i"} & set(cfg.losses):
            log("note: image_only with freeze_prompt has no trained prompt, so the i2t/t2i losses are off "
                "(set freeze_prompt: false to learn the prompt in the image stage)")
        unmatched = data.unmatched_query_pids
        if unmatched:
            log(f"warning: {len(unmatched)} query identities have no gallery image and are skipped: "
                f"{', '.join(unmatched[:10])}{' ...' if len(unmatched) > 10 else ''}")
        log_datasets(tracker, cfg, data)
        tracker.log_metrics({"num_classes": data.num_classes, "num_train": len(data.train),
                             "num_query": len(data.query), "num_gallery": len(data.gallery),
                             "num_unmatched_query_ids": len(unmatched), "num_val_query": len(data.val_query),
                             "num_val_gallery": len(data.val_gallery)}, step=0)
        loaders, clip_model, prompt_learner, feat_dim = build_model_and_loaders(cfg, data, device, log)
        if cfg.compile:
            compile_encoders(clip_model, log)
        prompt_text = clip_model.promptsg.composed_text if cfg.stage_mode == "promptsg" else prompt_learner.prompt_text
        log(f"model: {cfg.model_type} (pretrained={cfg.pretrained}) at {cfg.image_size[0]}x{cfg.image_size[1]}, "
            f"feat_dim {feat_dim}, {data.num_classes} classes, prompt '{prompt_text}', device {device}")
        metadata = {"architecture": cfg.model_type, "feat_dim": feat_dim, "num_classes": data.num_classes,
                    "classnames": data.classnames, "config": cfg.to_dict(), "config_hash": cfg.hash(),
                    "stage_mode": cfg.stage_mode, "run_id": run_id}

        result: dict = {"best_rank1": None, "best_mAP": None, "best_epoch": None,
                        "prompt_stage_seconds": None, "image_stage_seconds": None}
        step = 0
        prompt_path = run_dir / build_filename(cfg, cfg.epochs_prompt, "prompt", "pth", tag="FINAL")
        last_path = run_dir / build_filename(cfg, cfg.epochs_image, "image", "pth", tag="LAST")
        resume_image = resume and cfg.trains_image and last_path.is_file()
        if cfg.trains_prompt and resume and (prompt_path.is_file() or resume_image):
            if not resume_image:  # killed in the first image epoch: start it from the prompt stage's end exactly,
                # random state included (the LAST checkpoint restores its own otherwise)
                state = load_checkpoint(prompt_path, model=prompt_learner, device=device, restore_rng=True, log=log)
                step = state["metadata"]["progress"]["global_step"]
            log("resuming: the prompt stage finished before; not retraining it")
            written.append(prompt_path)
        elif cfg.trains_prompt:
            path = prompt_path if cfg.save_checkpoints else None
            with prompt_cache.slot(cfg) if prompt_cache is not None else contextlib.nullcontext() as shared:
                if shared is not None:
                    prompt = _reuse_prompt_stage(shared, clip_model, prompt_learner, tracker, log, path, metadata)
                else:
                    prompt = _train_prompt_stage(cfg, clip_model, prompt_learner, loaders, device, tracker, log,
                                                 feature_cache, path, metadata, prompt_cache, run_id or run_dir.name)
            if path is not None:
                written.append(path)
            step = prompt["steps"]
            result.update(prompt_stage_seconds=prompt["seconds"], prompt_rank1=prompt["prompt_rank1"],
                          prompt_mAP=prompt["prompt_mAP"])
            tracker.log_metrics({"prompt_stage_seconds": prompt["seconds"]}, step=0)
        generator = own_generator()

    if cfg.trains_image:
        def checkpoint_path(tag: str) -> Path | None:
            if tag == "LAST" and not resumable:
                return None
            path = run_dir / build_filename(cfg, cfg.epochs_image, "image", "pth", tag=tag)
            if path not in written and tag != "LAST":
                written.extend([path, path.with_name(path.stem + "_prompt.pth")])
            return path

        saves = checkpoint_path if cfg.save_checkpoints else None
        resume_from = last_path if resume_image else None
        if cfg.stage_mode == "promptsg":
            image = train_promptsg_stage(clip_model, loaders, PromptSGSettings.from_config(cfg), device, tracker, log,
                                         report, saves, metadata, start_step=step, resume_from=resume_from,
                                         generator=generator)
        else:
            image = train_clipreid_image_stage(
                clip_model, prompt_learner if cfg.stage_mode == "prompt_then_image" or not cfg.freeze_prompt else None,
                loaders, ImageStageSettings.from_config(cfg), device, tracker, log, report, saves, metadata,
                start_step=step, resume_from=resume_from, generator=generator)
        if distributed.is_main():
            last_path.unlink(missing_ok=True)  # FINAL holds the same state; LAST only serves resuming
        result.update({k: v for k, v in image.items() if k not in ("steps", "seconds")})
        result["image_stage_seconds"] = image["seconds"]
    result["total_seconds"] = time.perf_counter() - started
    return result
