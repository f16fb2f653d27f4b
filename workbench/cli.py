"""``workbench``: run, resume, tune, compare, ui, eval and data commands.

Every error a user can cause or meet is a ``WorkbenchError``: one line on stderr, exit status 2
when the command was wrong (config, arguments, a file that is not what it should be) and 1 when a
run met a fault (data, weights, NaN loss, tracking store, disk). Ctrl-C exits 130, SIGTERM 143.
Anything else is a bug and keeps its traceback; ``--debug`` or ``WORKBENCH_DEBUG=1`` shows the
traceback of every error.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import sys
import traceback
from pathlib import Path

from .errors import CheckpointError, ConfigError, ResourceError, UsageError, WorkbenchError, os_error_message

# Operating-system refusals that are the machine's state, not a bug: one line, exit 1.
_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                       errno.EISDIR}


def _one_line(err: BaseException) -> str:
    """The message on one line. Errors raised inside DataLoader workers arrive wrapped in the
    worker's traceback text: their own message is its last line."""
    text = str(err).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if "Traceback (most recent call last)" in text:
        return re.sub(r"^[A-Za-z_][\w.]*(Error|Exception): ", "", lines[-1])
    return " ".join(lines).removeprefix(f"{type(err).__module__}.{type(err).__name__}: ")


def cmd_run(args) -> int:
    from . import config, distributed
    from .runner import check_model_shapes, preflight, train_joint
    from .tracking import MlflowTracker, resolve_tracking_uri

    cfg = config.load(args.config, args.set)
    preflight(cfg, args.nproc)
    check_model_shapes(cfg)
    if args.nproc is not None and args.nproc > 1:
        return _launch(args, ["run", args.config, *[a for kv in args.set for a in ("--set", kv)]])
    with _process_group(cfg):
        tracker = MlflowTracker(resolve_tracking_uri(args.tracking_uri, cfg)) if distributed.is_main() else None
        result = train_joint(cfg, tracker)
        return _report(result, tracker) if distributed.is_main() else 0


@contextlib.contextmanager
def _process_group(cfg):
    """Under torchrun, the DDP process group for the time of the command."""
    from . import distributed

    distributed.setup(cfg.device)
    if not distributed.is_main():
        logging.getLogger().setLevel(logging.ERROR)  # libraries' warnings (open_clip's) once, from rank 0
    try:
        yield
    finally:
        distributed.teardown()


def _launch(args, command: list[str]) -> int:
    """``workbench run/resume --nproc N``: ``command`` on N processes started by torch's elastic
    launcher (what torchrun --standalone does); each rank prints its own errors, so a failure
    ends in those lines and the first failed rank's exit status."""
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    argv = ["-m", "workbench", *command, *(["--tracking-uri", args.tracking_uri] if args.tracking_uri else []),
            *(["--debug"] if _debug(args) else [])]
    if "OMP_NUM_THREADS" not in os.environ:  # the cores shared by the ranks (torchrun would say 1, with a warning)
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.nproc))
    launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)  # its reports repeat what the ranks said
    try:
        elastic_launch(launch, sys.executable)(*argv)
    except ChildFailedError as err:
        rank, first = err.get_first_failure()
        if first.exitcode < 0:  # killed (out of memory, kill -9): the process could not say it
            import signal

            name = signal.Signals(-first.exitcode).name if -first.exitcode in signal.valid_signals() else "a signal"
            print(f"workbench: error: rank {rank} was killed by {name} (out of memory?); the others were stopped",
                  file=sys.stderr)
            return 1
        return first.exitcode
    except SignalException as err:  # Ctrl-C or SIGTERM, passed on to the ranks, which said what they did
        return 128 + int(err.sigval)
    return 0


def _report(result: dict, tracker) -> int:
    from .runner import summary_line

    print(summary_line(result))
    if result.get("final_rank1") is not None:
        print(f"final {result['selection']} rank1 {result['final_rank1']:.2f}  rank5 {result['final_rank5']:.2f}  "
              f"rank10 {result['final_rank10']:.2f}  mAP {result['final_mAP']:.2f}")
        print("test  BEST  rank1 {test_rank1:.2f}  rank5 {test_rank5:.2f}  rank10 {test_rank10:.2f}  mAP {test_mAP:.2f}"
              "  mINP {test_mINP:.2f}".format(**result))
        print("test  FINAL rank1 {final_test_rank1:.2f}  rank5 {final_test_rank5:.2f}  rank10 {final_test_rank10:.2f}"
              "  mAP {final_test_mAP:.2f}  mINP {final_test_mINP:.2f}".format(**result))
    print(f"wall time {result['total_seconds']:.1f}s  files in {result['run_dir']}")
    print(f"MLflow run {result['run_id']} at {tracker.tracking_uri}")
    return 0


def cmd_resume(args) -> int:
    """Continue an interrupted run from its folder (config, LAST checkpoint, MLflow run)."""
    from . import config, distributed
    from .runner import train_joint
    from .tracking import MlflowTracker, resolve_tracking_uri

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is a file, not a run folder" if run_dir.exists() else f"run folder not found: {run_dir}")
    configs = sorted(run_dir.glob("*_config.yaml"))
    if len(configs) != 1:
        raise ConfigError(f"{run_dir}: expected one *_config.yaml of a workbench run, found {len(configs)}")
    cfg = config.load(configs[0])
    if args.nproc is not None and args.nproc > 1:
        from .runner import check_resumable, preflight

        preflight(cfg, args.nproc)
        check_resumable(cfg, run_dir)
        return _launch(args, ["resume", str(run_dir)])
    with _process_group(cfg):
        if not distributed.is_main():  # under torchrun rank 0 reopens the MLflow run
            train_joint(cfg, None, resume_dir=run_dir)
            return 0
        tracker = MlflowTracker(resolve_tracking_uri(args.tracking_uri, cfg), must_exist=True)  # where the run is
        _close_stale_runs(tracker, cfg.experiment, run_dir, "workbench resume")
        return _report(train_joint(cfg, tracker, resume_dir=run_dir), tracker)


def _close_stale_runs(tracker, experiment: str, run_dir: Path | None, by: str) -> None:
    """Mark the experiment's stale RUNNING runs KILLED (their process died without closing
    them); refuse to resume ``run_dir`` while the process that runs it is still alive."""
    import json

    from .tracking import mark_stale_runs, stale_reason

    run_files = list(run_dir.glob("*_run.json")) if run_dir is not None else []
    if run_files:
        run_id = json.loads(run_files[0].read_text())["run_id"]
        if not tracker.has_run(run_id):
            raise UsageError(f"the MLflow run {run_id} of {run_dir} is not in {tracker.tracking_uri}; give the "
                             f"--tracking-uri it was logged to")
        run = tracker.client.get_run(run_id)
        if run.data.tags.get("workbench.role") == "trial":
            raise UsageError(f"{run_dir} is trial {run.data.tags.get('trial_number')} of study "
                             f"{run.data.tags.get('study_name')}: run workbench tune again, which replaces "
                             f"interrupted trials")
        if run.info.status == "RUNNING" and stale_reason(run) is None:
            raise UsageError(f"the run in {run_dir} is still running (process {run.data.tags.get('workbench.pid')} "
                             f"on {run.data.tags.get('workbench.host')}); stop it first")
    found = tracker.client.get_experiment_by_name(experiment)
    marked = mark_stale_runs(tracker.client, [found.experiment_id], by) if found else []
    if marked:
        print(f"marked {len(marked)} stale RUNNING run(s) of experiment {experiment} KILLED (their process ended "
              f"without closing them): {', '.join(marked[:5])}{' ...' if len(marked) > 5 else ''}", file=sys.stderr)


def _study_name(config_path: str, overrides: list[str]) -> str:
    """Stable default: the config file's name, plus a hash of the --set values when there are any."""
    import hashlib

    name = Path(config_path).stem
    if overrides:
        name += "_" + hashlib.sha256("\n".join(sorted(overrides)).encode()).hexdigest()[:8]
    return name


def cmd_tune(args) -> int:
    from . import config, distributed
    from .tracking import resolve_tracking_uri
    from .tuning import TuneOptions, default_tune_config, plain_study_name, run_study

    if distributed.env_world_size() > 1:
        raise UsageError("workbench tune runs trials, not DDP ranks: start it without torchrun (--n-jobs and more "
                         "workers on one --storage spread a study over GPUs and machines)")
    config_path = args.config or default_tune_config()
    if not args.config:
        print(f"no config given: tuning {config_path}", file=sys.stderr)
    cfg = config.load(config_path, args.set)
    if not cfg.trains_image:
        raise ConfigError(f"stage_mode: {cfg.stage_mode} has no image stage, so no ReID metric to tune")
    if not (cfg.has_holdout or (Path(cfg.data_root) / "val").is_dir()) and not args.select_on_test:
        raise ConfigError("val_identities: tuning needs a validation hold-out (set val_identities, e.g. 0.2) "
                          "so that trials are not chosen on the test split; --select-on-test to do it anyway")
    selected_on = config.TUNE_METRICS[cfg.tune.metric]
    if cfg.tune.metric.startswith("best_") and selected_on != cfg.select_metric:
        print(f"note: tune.metric {cfg.tune.metric} reads the epoch that select_metric {cfg.select_metric} picked, "
              f"not the epoch with the best {selected_on}", file=sys.stderr)
    options = TuneOptions(trials=args.trials,
                          study_name=args.study_name or plain_study_name(_study_name(config_path, args.set)),
                          storage=args.storage, n_jobs=args.n_jobs, timeout=args.timeout, pruner=args.pruner,
                          sampler=args.sampler, tracking_uri=resolve_tracking_uri(args.tracking_uri, cfg),
                          keep_checkpoints=args.keep_checkpoints)
    study = run_study(cfg, options, config_path, args.set)
    try:
        best = study.best_trial
    except ValueError:  # all pruned, or none finished before --timeout
        raise WorkbenchError(f"no trial completed in study {options.study_name}; re-run the command to go on") \
            from None
    print(f"best trial {best.number}: {cfg.tune.metric} {best.value:.2f}  "
          + " ".join(f"{k}={v}" for k, v in best.params.items()))
    print(f"re-run it alone: {best.user_attrs.get('rerun', '')}")
    print(f"MLflow: {options.tracking_uri} (experiment {cfg.experiment}); study: {options.study_name}")
    return 0


def cmd_compare(args) -> int:
    from .tracking import resolve_tracking_uri, runs_table

    uri = resolve_tracking_uri(args.tracking_uri, None)
    if args.out and (Path(args.out).is_dir() or not Path(args.out).parent.is_dir()):  # before the work
        out = Path(args.out)
        raise UsageError(f"--out {out}: " + ("is a folder; give a file name" if out.is_dir() else
                                             f"the folder {out.parent} does not exist"))
    try:
        frame = runs_table(uri, args.experiment, args.study, args.metric)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if frame.empty:
        print("no runs found")
        return 0
    import pandas as pd

    if args.table in ("md", "latex"):
        shown = frame.drop(columns=[c for c in ("run_id",) if c in frame.columns])
        rows = [[_cell(v) for v in row] for row in shown.itertuples(index=False)]
        print(format_table([str(c) for c in shown.columns], rows, args.table))
    else:
        with pd.option_context("display.max_rows", 200, "display.width", 200, "display.max_columns", 20):
            print(frame.to_string(index=False))
    out = Path(args.out or f"compare_{args.study or args.experiment or 'all'}.csv")
    try:
        frame.to_csv(out, index=False)
    except OSError as err:
        raise UsageError(os_error_message(err, f"--out {out}")) from None
    print(f"saved {len(frame)} runs to {out}")
    return 0


def cmd_ui(args) -> int:
    import contextlib
    import os
    import shutil
    import signal
    import subprocess
    import time

    from .tracking import MlflowTracker, resolve_tracking_uri
    from .tuning import storage_for

    uri = resolve_tracking_uri(args.tracking_uri, None)
    MlflowTracker(uri, must_exist=True)  # a store that cannot be used is one line here, not the server's traceback
    storage = storage_for(args.study, args.storage, must_exist=True)[1] if args.study else None
    ports = [args.port] + ([args.dashboard_port] if args.study else [])
    for port in ports:
        _check_port_free(args.host, port)
    # Each server gets its own process group, so that stopping `workbench ui` (Ctrl-C or SIGTERM,
    # which main() turns into a KeyboardInterrupt) stops its workers too.
    processes = [subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                   "--host", args.host, "--port", str(args.port), "--workers", str(args.workers)],
                                  start_new_session=True)]
    print(f"MLflow UI on http://{args.host}:{args.port}/#/experiments?workflowType=machine_learning over {uri}",
          flush=True)
    if args.study:
        dashboard = shutil.which("optuna-dashboard")
        if dashboard is None:
            print("optuna-dashboard is not installed (pip install optuna-dashboard); showing MLflow only")
        else:
            processes.append(subprocess.Popen([dashboard, storage, "--host", args.host,
                                               "--port", str(args.dashboard_port)], start_new_session=True))
            print(f"optuna-dashboard on http://{args.host}:{args.dashboard_port} over {storage}")
    try:
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
    finally:
        for p in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in processes:
            p.wait(timeout=30)
    ended = next((p for p in processes if p.returncode not in (None, 0, -signal.SIGTERM)), None)
    if ended is not None:
        raise ResourceError(f"{Path(ended.args[0]).name} {' '.join(ended.args[1:4])} stopped with exit status "
                            f"{ended.returncode} (its message is above)")
    return 0


def _positive(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _port(text: str) -> int:
    """An argparse type: a TCP port number."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {port}")
    return port


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ResourceError(f"port {port} on {host} is not free ({err.strerror}); choose another with "
                                f"--port / --dashboard-port") from None


def cmd_eval(args) -> int:
    """Evaluate a checkpoint (or the untrained model): on one split, on many (--splits, with the
    mean and standard deviation, pictures and MLflow), or by image-to-prompt retrieval (--prompts)."""
    import torch

    from . import config
    from .checkpoint import CheckpointMismatch, load_checkpoint, read_checkpoint
    from .data import available_splits
    from .evaluation import validate, validate_stage1_prompts
    from .runner import build_model_and_loaders, ensure_dataset, feature_spec, load_data, seed_everything, select_device
    from .stages import cache_image_features, eval_splits

    checkpoint = _checkpoint_file(Path(args.checkpoint)) if args.checkpoint else None
    if args.config and args.config_option:
        raise UsageError("give the config once: as CONFIG or as --config")
    cfg = config.load(args.config or args.config_option or _run_config(checkpoint), args.set)
    if args.prompts and cfg.stage_mode == "promptsg":
        raise UsageError("--prompts: PromptSG has no class prompts to retrieve (its prompt is composed per image); "
                         "evaluate it without --prompts")
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    ensure_dataset(cfg, print)
    data = load_data(cfg)
    loaders, model, prompt_learner, _ = build_model_and_loaders(cfg, data, device, cache_images=False)
    state = read_checkpoint(checkpoint) if checkpoint else None
    stage = (state or {}).get("metadata", {}).get("stage", "image")
    if state is not None:
        if stage == "prompt" and not args.prompts:
            raise UsageError(f"{checkpoint} is the prompt stage's checkpoint: evaluate it with --prompts, or give "
                             f"the image stage's BEST or FINAL")
        target = dict(model=prompt_learner) if stage == "prompt" else dict(
            model=model, prompt_learner=prompt_learner if state.get("prompt_learner_state_dict") else None)
        try:
            load_checkpoint(checkpoint, **target, device=device, restore_rng=False, log=print,
                            metadata_expected={"architecture": cfg.model_type})
        except CheckpointMismatch as err:
            raise CheckpointMismatch(f"{err} (evaluate a checkpoint with the _config.yaml of its run folder)") from None
        _warn_config_differences(state.get("metadata", {}).get("config"), cfg)
    if args.prompts:
        if state is not None and stage == "image" and not state.get("prompt_learner_state_dict"):
            raise UsageError(f"{checkpoint} holds no prompt learner (an image_only or promptsg run): "
                             f"nothing to retrieve")
        feats, labels = cache_image_features(model, loaders.train_eval, device, cfg.amp)
        result = validate_stage1_prompts(model, prompt_learner, feats, labels, max_rank=cfg.max_rank,
                                         raw_dot=cfg.prompt_logit_mode == "raw_dot")
        print("image-to-prompt retrieval over the {n} training identities: rank1 {rank1:.2f}  rank5 {rank5:.2f}  "
              "rank10 {rank10:.2f}  mAP {mAP:.2f}".format(n=data.num_classes, **result))
        return 0
    if args.splits or args.flip or args.table:
        if args.split == "val":
            raise UsageError("--split val evaluates the validation hold-out; --splits, --flip and --table the test "
                             "splits")
        return _eval_splits(args, cfg, model, device, checkpoint, state, available_splits(cfg.data_root))
    selection, test = eval_splits(loaders)
    if args.split == "val" and selection.name != "val":
        raise ConfigError("--split val: this config has no validation split (set val_identities)")
    with torch.no_grad():
        result = validate(model, selection if args.split == "val" else test, device,
                          feature_spec(cfg), max_rank=cfg.max_rank, amp=cfg.amp)
    print("rank1 {rank1:.2f}  rank5 {rank5:.2f}  rank10 {rank10:.2f}  mAP {mAP:.2f}  mINP {mINP:.2f}".format(**result))
    return 0


def _checkpoint_file(path: Path) -> Path:
    """``path``, or in a run folder its BEST (else FINAL) image-stage checkpoint."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_dir():
        return path
    for tag in ("BEST", "FINAL"):
        found = sorted(path.glob(f"*_image_{tag}.pth"))
        if found:
            return found[0]
    raise UsageError(f"{path} holds no *_image_BEST.pth or *_image_FINAL.pth checkpoint")


def _run_config(checkpoint: Path | None) -> str:
    """The ``_config.yaml`` beside a checkpoint (its run folder's)."""
    found = sorted(checkpoint.parent.glob("*_config.yaml")) if checkpoint else []
    if len(found) != 1:
        raise UsageError("no config: give CONFIG (or --config), or a checkpoint in its run folder, which holds "
                         "its _config.yaml")
    return str(found[0])


def _parse_splits(text: str, available: list[int]) -> list[int]:
    if text in (None, "", "all"):
        return available if text == "all" else available[:1]
    try:
        splits = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--splits {text!r}: expected all or numbers such as 0,3,5") from None
    missing = sorted(set(splits) - set(available))
    if missing or not splits:
        raise UsageError(f"--splits: no split {missing[0] if missing else text!r} in this dataset (it has "
                         f"{', '.join(map(str, available))})")
    return list(dict.fromkeys(splits))


def _eval_splits(args, cfg, model, device, checkpoint: Path | None, state: dict | None, available: list[int]) -> int:
    """``workbench eval --splits``: the per-split table, mean +- std, pictures, and MLflow."""
    import json
    import time

    from .config import build_filename
    from .runner import SPLIT_KEYS, evaluate_test_splits
    from .tracking import MlflowTracker, resolve_tracking_uri

    splits = _parse_splits(args.splits, available) if args.splits else [cfg.split]
    stem = build_filename(cfg, cfg.epochs_image, "image") + "_eval" + ("_flip" if args.flip else "")
    out_dir = checkpoint.parent if checkpoint else Path(cfg.output_dir) / f"{stem}_{time.strftime('%Y%m%d-%H%M%S')}"
    tracker = MlflowTracker(resolve_tracking_uri(args.tracking_uri, cfg))
    evaluation = evaluate_test_splits(cfg, model, device, splits, out_dir, stem, flip=args.flip)
    results, summary = evaluation["results"], evaluation["summary"]
    header = ["split", *SPLIT_KEYS, "queries"]
    rows = [[str(split), *(f"{r[k]:.2f}" for k in SPLIT_KEYS), str(r["num_valid_q"])] for split, r in results.items()]
    rows.append(["mean", *(f"{summary[f'mean_{k}']:.2f}" for k in SPLIT_KEYS), ""])
    rows.append(["std", *(f"{summary[f'std_{k}']:.2f}" for k in SPLIT_KEYS), ""])
    print(format_table(header, rows, args.table or "text"))
    print(f"over {len(splits)} split(s): " + "  ".join(
        f"{k} {summary[f'mean_{k}']:.2f} +- {summary[f'std_{k}']:.2f}" for k in SPLIT_KEYS))

    run_id = (state or {}).get("metadata", {}).get("run_id")
    run_file = sorted(checkpoint.parent.glob("*_run.json")) if checkpoint else []
    if run_id is None and run_file:
        run_id = json.loads(run_file[0].read_text())["run_id"]
    if run_id is not None and not tracker.has_run(run_id):  # a checkpoint moved to another store
        run_id = None
    tags = {"workbench.role": "eval", "checkpoint": str(checkpoint.resolve()) if checkpoint else "untrained"}
    with (tracker.attach(run_id) if run_id else tracker.start_run(stem, cfg.experiment, tags=tags)) as logged_to:
        prefix = "splits_flip_" if args.flip else "splits_"
        tracker.log_metrics({f"{prefix}{k}": v for k, v in summary.items()}, step=0)
        for split, r in results.items():
            tracker.log_metrics({f"{prefix}{k}": r[k] for k in SPLIT_KEYS}, step=split)
        tracker.log_dataset(f"{cfg.dataset}_{Path(cfg.data_root).name}", str(Path(cfg.data_root).resolve()),
                            evaluation["digest"], f"test splits {','.join(map(str, splits))}")
        for path in evaluation["files"]:
            tracker.log_artifact(path, "eval")
    print(f"files in {out_dir}; MLflow run {logged_to} at {tracker.tracking_uri}"
          + (" (the checkpoint's run)" if run_id else " (a new eval run)"))
    return 0


def _cell(value) -> str:
    """A table cell: numbers with two decimals, missing values empty."""
    import math

    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.2f}"
    return "" if value is None else str(value)


def format_table(header: list[str], rows: list[list[str]], style: str = "text") -> str:
    """Rows as aligned text, a Markdown table or a LaTeX tabular."""
    if style == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    if style == "latex":
        body = [" & ".join(header) + r" \\", r"\midrule"] + [" & ".join(row) + r" \\" for row in rows]
        return "\n".join([r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule", *body, r"\bottomrule",
                          r"\end{tabular}"])
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(x).rjust(w) for x, w in zip(row, widths)) for row in [header, *rows])


# Keys that change neither the model nor how it is evaluated.
_BOOKKEEPING = {"experiment", "variant", "output_dir", "tracking_uri", "device", "log_every", "save_checkpoints",
                "log_checkpoints", "num_workers", "test_batch_size", "tune", "system_metrics", "system_metrics_interval"}


def _warn_config_differences(trained: dict | None, cfg) -> None:
    """One line naming the keys where the checkpoint's training config and ``cfg`` differ."""
    if not trained:
        return
    now = cfg.to_dict()
    differ = [k for k in now if k not in _BOOKKEEPING and k in trained and trained[k] != now[k]]
    if differ:
        shown = ", ".join(f"{k}={trained[k]!r} (now {now[k]!r})" for k in differ[:5])
        print(f"warning: the checkpoint was trained with {shown}{' ...' if len(differ) > 5 else ''}; "
              f"the numbers may differ from its run's")


def cmd_data_synth(args) -> int:
    from .data import synthesize_dataset

    root = synthesize_dataset(args.out, args.identities, args.images_per_identity, seed=args.seed,
                              size=(args.height, args.width), test_identities=args.test_identities)
    print(f"wrote a synthetic dataset of {args.identities} train + {args.test_identities or args.identities} test "
          f"identities to {root}")
    return 0


def cmd_data_prepare(args) -> int:
    """``workbench data prepare-11k`` / ``prepare-hd``: the published hand protocol's folders."""
    from .prepare import format_summary, prepare_11k, prepare_hd

    common = dict(splits=args.splits, seed=args.seed, mode="copy" if args.copy else "link")
    if args.data_command == "prepare-11k":
        summaries = prepare_11k(args.src, args.out, aspects=args.aspects, **common)
    else:
        summaries = prepare_hd(args.src, args.out, **common)
    for aspect, rows in summaries.items():
        print(f"\n{Path(args.out) / aspect}  (seed {args.seed}; summary.csv, manifest.csv and prepare.json inside)")
        print(format_summary(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench", description="CLIP-ReID research workbench.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="one complete run (prompt stage, image stage) tracked in MLflow",
                         description="Train as the config's stage_mode says; print the final metrics and the "
                                     "MLflow run id.")
    run.add_argument("config", help="experiment YAML, e.g. experiments/quickstart.yaml")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key (YAML value; dots for sections), repeatable")
    run.add_argument("--tracking-uri", help="MLflow tracking URI (default: config, MLFLOW_TRACKING_URI, "
                                            "sqlite:///mlflow.db)")
    run.add_argument("--nproc", type=_positive, metavar="N",
                     help="train on N processes with DDP (one per GPU; gloo on the CPU), as torchrun "
                          "--standalone --nproc-per-node N -m workbench run would")
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser("resume", help="continue an interrupted run from its folder",
                            description="Load the run folder's config and LAST checkpoint and go on training; "
                                        "the numbers go to the same MLflow run.")
    resume.add_argument("run_dir", help="the run's folder under output_dir (printed by workbench run)")
    resume.add_argument("--tracking-uri", help="MLflow tracking URI of the original run")
    resume.add_argument("--nproc", type=_positive, metavar="N", help="go on with DDP on N processes")
    resume.set_defaults(func=cmd_resume)

    tune = sub.add_parser("tune", help="Optuna study: every trial a complete run, tracked in MLflow",
                          description="Search the config's tune.space; re-running the same command resumes the "
                                      "study. Prints a line per trial and, at the end, the best trial and the "
                                      "command that re-runs it.")
    tune.add_argument("config", nargs="?", help="experiment YAML with a tune: section (default: exp.yaml here)")
    tune.add_argument("--trials", type=int, required=True,
                      help="trials the study should hold: complete, pruned and failed ones count; those whose "
                           "worker was killed or interrupted do not and are replaced on a re-run")
    tune.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key for every trial, repeatable")
    tune.add_argument("--study-name", help="letters, digits, '.', '_', '-' (it names files under studies/); "
                                           "default: the config file's name (+ a hash of --set values)")
    tune.add_argument("--storage", help="database URL (sqlite:///..., postgresql://...) or journal file; "
                                        "default studies/<study>.journal")
    tune.add_argument("--n-jobs", type=int, help="trials run at once in this process (threads, >= 1); default: "
                      "the config's tune.n_jobs")
    tune.add_argument("--timeout", type=float, help="stop starting trials after this many seconds (> 0)")
    tune.add_argument("--pruner", choices=["median", "hyperband", "none"], help="default: the config's tune.pruner")
    tune.add_argument("--sampler", choices=["tpe", "random", "cmaes"], help="default: the config's tune.sampler")
    tune.add_argument("--keep-checkpoints", choices=["best", "all", "none"],
                      help="checkpoints stored in MLflow (default: the config's tune.keep_checkpoints)")
    tune.add_argument("--select-on-test", action="store_true",
                      help="allow a config without a validation hold-out: trials are then compared and pruned "
                           "on the test split (optimistic numbers)")
    tune.add_argument("--tracking-uri", help="MLflow tracking URI (default: config, MLFLOW_TRACKING_URI, "
                                             "sqlite:///mlflow.db)")
    tune.set_defaults(func=cmd_tune)

    compare = sub.add_parser("compare", help="runs as a table sorted by a metric (and saved as CSV)",
                             description="Read runs from MLflow (search_runs) and print them best first.")
    compare.add_argument("--experiment", help="MLflow experiment name (default: all)")
    compare.add_argument("--study", help="only the trials of this study")
    compare.add_argument("--metric", default="best_mAP", help="sort key (default best_mAP)")
    compare.add_argument("--out", help="CSV path (default compare_<study or experiment>.csv)")
    compare.add_argument("--table", choices=["text", "md", "latex"], help="print a Markdown or LaTeX table")
    compare.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    compare.set_defaults(func=cmd_compare)

    ui = sub.add_parser("ui", help="MLflow UI (and optuna-dashboard) on 127.0.0.1",
                        description="Start the MLflow UI over the store that run and tune use; with --study, also "
                                    "optuna-dashboard over that study's storage when it is installed.")
    ui.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    ui.add_argument("--port", type=_port, default=5000, help="the MLflow UI's port (default 5000)")
    ui.add_argument("--workers", type=_positive, default=1,
                    help="server processes (default 1: one researcher's UI starts in seconds; MLflow's own default is 4)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                         "network, with no login)")
    ui.add_argument("--study", help="also open this study in optuna-dashboard")
    ui.add_argument("--storage", help="the study's storage, if not the default studies/<study>.journal")
    ui.add_argument("--dashboard-port", type=_port, default=8080, help="optuna-dashboard's port (default 8080)")
    ui.set_defaults(func=cmd_ui)

    ev = sub.add_parser("eval", help="rank-k and mAP of a checkpoint (or of the untrained model)",
                        description="Evaluate on the config's query/gallery; with --splits, on several test "
                                    "splits with their mean and standard deviation, pictures and MLflow; without "
                                    "--checkpoint, the model as built from the config's weights.")
    ev.add_argument("config", nargs="?", help="experiment YAML (default: the _config.yaml of the checkpoint's run)")
    ev.add_argument("--config", dest="config_option", metavar="CONFIG", help="the same as CONFIG")
    ev.add_argument("--checkpoint", help="a BEST or FINAL image-stage .pth file, or a run folder (its BEST)")
    ev.add_argument("--split", choices=["test", "val"], default="test",
                    help="the test query/gallery (default) or the validation hold-out")
    ev.add_argument("--splits", help="test splits to evaluate: all, or numbers such as 0,3,5 (prepared datasets)")
    ev.add_argument("--flip", action="store_true", help="average each image's features with its mirror image's")
    ev.add_argument("--table", choices=["text", "md", "latex"], help="how to print the split table")
    ev.add_argument("--prompts", action="store_true",
                    help="image-to-prompt retrieval over the training identities instead of ReID")
    ev.add_argument("--tracking-uri", help="where --splits logs (default: as workbench run)")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key (YAML value; dots for sections), repeatable")
    ev.set_defaults(func=cmd_eval)

    data = sub.add_parser("data", help="dataset tools", description="Dataset tools.")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the synthetic hand-identity dataset",
                                description="Write root/{train,query,gallery}/<pid>/<pid>_c<cam>_<n>.png.")
    synth.add_argument("--out", required=True, help="folder to create")
    synth.add_argument("--identities", type=int, default=60, help="training identities")
    synth.add_argument("--test-identities", type=int, help="test identities (default: as many as --identities)")
    synth.add_argument("--images-per-identity", type=int, default=8)
    synth.add_argument("--height", type=int, default=128)
    synth.add_argument("--width", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_data_synth)
    prepares = []
    for name, what, src_help in (
            ("prepare-11k", "11k Hands", "the download: the folder holding Hands/ and HandInfo.csv"),
            ("prepare-hd", "HD (PolyU hand dorsal)", "the download's 'Original Images' folder (1-501/, 502-712/)")):
        prepare = data_sub.add_parser(name, help=f"write the {what} protocol's train/val/query<i>/gallery<i> folders",
                                      description=f"Prepare {what} as the published hand protocol: identities split "
                                                  f"in halves, a validation image per training identity, N seeded "
                                                  f"query/gallery splits. See README 'Real data'.")
        prepare.add_argument("--src", required=True, help=src_help)
        prepare.add_argument("--out", required=True, help="folder that receives one sub-folder per aspect")
        if name == "prepare-11k":
            prepare.add_argument("--aspects", default="dorsal_r,dorsal_l,palmar_r,palmar_l",
                                 help="comma-separated: dorsal_r, dorsal_l, palmar_r, palmar_l (default: all)")
        prepare.add_argument("--splits", type=int, default=10, help="query/gallery splits (default 10)")
        prepare.add_argument("--seed", type=int, default=0, help="seed of the validation and split draws")
        how = prepare.add_mutually_exclusive_group()
        how.add_argument("--link", action="store_true", help="hard-link the images (default; copies across devices)")
        how.add_argument("--copy", action="store_true", help="copy the images")
        prepare.set_defaults(func=cmd_data_prepare)
        prepares.append(prepare)
    # --debug anywhere: before the command, after it, or after a data sub-command.
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error (also WORKBENCH_DEBUG=1)")
    for command in [run, resume, tune, compare, ui, ev, data, synth, *prepares]:
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of an error (also WORKBENCH_DEBUG=1)")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm, ``timeout``, ``docker stop``): handled as Ctrl-C is, so the run ends KILLED
    with its metrics flushed and its last epoch's LAST checkpoint ready for ``workbench resume``."""


def _raise_terminated(signum, frame):
    raise Terminated()


def _say(err: WorkbenchError) -> int:
    """Print ``err`` as one line and return its exit status. Under DDP a rank other than 0 first
    waits a moment: when rank 0 meets the same error (a mistake every rank makes), it says it, the
    launcher stops the others, and the line is not printed twice."""
    rank = _rank()
    if rank != "0":
        import time

        try:
            time.sleep(RANK_ERROR_DELAY)
        except KeyboardInterrupt:  # stopped by the launcher: rank 0 has spoken
            return err.exit_code
    print(f"workbench: error{'' if rank == '0' else f' (rank {rank})'}: {_one_line(err)}", file=sys.stderr)
    return err.exit_code


RANK_ERROR_DELAY = 3.0


def _rank() -> str:
    """This process's DDP rank as torchrun set it ("0" without torchrun)."""
    return os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else "0"


def _debug(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("WORKBENCH_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return args.func(args)
    except Terminated:
        if _rank() == "0":  # under DDP rank 0 speaks for all
            print("terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        if _rank() == "0":
            print("interrupted", file=sys.stderr)
        return 130
    except WorkbenchError as err:
        if _debug(args):
            traceback.print_exc()
        return _say(err)
    except RuntimeError as err:
        from .distributed import lost_peer

        lost = lost_peer(err)  # DDP: a collective failed because another rank's process ended
        if lost is None:
            raise
        if _debug(args):
            traceback.print_exc()
        return _say(lost)
    except OSError as err:
        if err.errno not in _ENVIRONMENT_ERRNOS:
            raise
        if _debug(args):
            traceback.print_exc()
        print(f"workbench: error: {os_error_message(err, 'the system refused')}", file=sys.stderr)
        return ResourceError.exit_code


if __name__ == "__main__":
    sys.exit(main())
