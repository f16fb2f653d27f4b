"""``workbench``: run, resume, tune, compare, ui, eval and data commands.

Every error a user can cause or meet is a ``WorkbenchError``: one line on stderr, exit status 2
when the command was wrong (config, arguments, a file that is not what it should be) and 1 when a
run met a fault (data, weights, NaN loss, tracking store, disk). Ctrl-C exits 130, SIGTERM 143.
Anything else is a bug and keeps its traceback; ``--debug`` or ``WORKBENCH_DEBUG=1`` shows the
traceback of every error.
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys
from pathlib import Path

from .errors import ConfigError, ResourceError, UsageError, WorkbenchError, os_error_message

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
    from . import config
    from .runner import preflight, train_joint
    from .tracking import MlflowTracker, resolve_tracking_uri

    cfg = config.load(args.config, args.set)
    preflight(cfg)
    tracker = MlflowTracker(resolve_tracking_uri(args.tracking_uri, cfg))
    return _report(train_joint(cfg, tracker), tracker)


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
    from . import config
    from .runner import train_joint
    from .tracking import MlflowTracker, resolve_tracking_uri

    run_dir = Path(args.run_dir)
    configs = sorted(run_dir.glob("*_config.yaml"))
    if len(configs) != 1:
        raise ConfigError(f"{run_dir}: expected one *_config.yaml of a workbench run, found {len(configs)}")
    cfg = config.load(configs[0])
    tracker = MlflowTracker(resolve_tracking_uri(args.tracking_uri, cfg))
    _close_stale_runs(tracker, cfg.experiment, run_dir, "workbench resume")
    return _report(train_joint(cfg, tracker, resume_dir=run_dir), tracker)


def _close_stale_runs(tracker, experiment: str, run_dir: Path | None, by: str) -> None:
    """Mark the experiment's stale RUNNING runs KILLED (their process died without closing
    them); refuse to resume ``run_dir`` while the process that runs it is still alive."""
    import json

    from .tracking import mark_stale_runs, stale_reason

    found = tracker.client.get_experiment_by_name(experiment)
    if found is None:
        return
    run_files = list(run_dir.glob("*_run.json")) if run_dir is not None else []
    if run_files:
        run = tracker.client.get_run(json.loads(run_files[0].read_text())["run_id"])
        if run.info.status == "RUNNING" and stale_reason(run) is None:
            raise UsageError(f"the run in {run_dir} is still running (process {run.data.tags.get('workbench.pid')} "
                             f"on {run.data.tags.get('workbench.host')}); stop it first")
    marked = mark_stale_runs(tracker.client, [found.experiment_id], by)
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
    from . import config
    from .tracking import resolve_tracking_uri
    from .tuning import TuneOptions, default_tune_config, plain_study_name, run_study

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
    from . import config
    from .tracking import resolve_tracking_uri, runs_table

    uri = resolve_tracking_uri(args.tracking_uri, None)
    try:
        frame = runs_table(uri, args.experiment, args.study, args.metric)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if frame.empty:
        print("no runs found")
        return 0
    import pandas as pd

    with pd.option_context("display.max_rows", 200, "display.width", 200, "display.max_columns", 20):
        print(frame.to_string(index=False))
    out = Path(args.out or f"compare_{args.study or args.experiment or 'all'}.csv")
    frame.to_csv(out, index=False)
    print(f"saved {len(frame)} runs to {out}")
    return 0


def cmd_ui(args) -> int:
    import contextlib
    import os
    import shutil
    import signal
    import subprocess
    import time

    from .tracking import resolve_tracking_uri
    from .tuning import storage_for

    uri = resolve_tracking_uri(args.tracking_uri, None)
    ports = [args.port] + ([args.dashboard_port] if args.study else [])
    for port in ports:
        _check_port_free(args.host, port)
    # Each server gets its own process group, so that stopping `workbench ui` (Ctrl-C or SIGTERM)
    # stops its workers too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    processes = [subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                   "--host", args.host, "--port", str(args.port)], start_new_session=True)]
    print(f"MLflow UI on http://{args.host}:{args.port}/#/experiments?workflowType=machine_learning over {uri}",
          flush=True)
    if args.study:
        _, storage = storage_for(args.study, args.storage)
        dashboard = shutil.which("optuna-dashboard")
        if dashboard is None:
            print("optuna-dashboard is not installed (pip install optuna-dashboard); showing MLflow only")
        else:
            processes.append(subprocess.Popen([dashboard, storage, "--host", args.host,
                                               "--port", str(args.dashboard_port)], start_new_session=True))
            print(f"optuna-dashboard on http://{args.host}:{args.dashboard_port} over {storage}")
    stopped_by_user = False
    try:
        while all(p.poll() is None for p in processes):
            time.sleep(0.5)
    except KeyboardInterrupt:
        stopped_by_user = True
    finally:
        for p in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in processes:
            p.wait(timeout=30)
    ended = next((p for p in processes if p.returncode not in (None, 0, -signal.SIGTERM)), None)
    if ended is not None and not stopped_by_user:
        raise ResourceError(f"{Path(ended.args[0]).name} {' '.join(ended.args[1:4])} stopped with exit status "
                            f"{ended.returncode} (its message is above)")
    return 0


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ResourceError(f"port {port} on {host} is not free ({err.strerror}); choose another with "
                                f"--port / --dashboard-port") from None


def cmd_eval(args) -> int:
    """Evaluate a BEST / FINAL checkpoint (or an untrained model) on query / gallery."""
    import torch

    from . import config
    from .checkpoint import load_checkpoint
    from .evaluation import validate
    from .runner import build_model_and_loaders, ensure_dataset, load_data, seed_everything, select_device
    from .stages import ImageStageSettings, eval_splits

    cfg = config.load(args.config, args.set)
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    ensure_dataset(cfg, print)
    data = load_data(cfg)
    loaders, model, _, _ = build_model_and_loaders(cfg, data, device)
    if args.checkpoint:
        from .checkpoint import CheckpointMismatch

        try:
            state = load_checkpoint(args.checkpoint, model=model, device=device, restore_rng=False, log=print,
                                    metadata_expected={"architecture": cfg.model_type, "stage": "image"})
        except CheckpointMismatch as err:
            raise CheckpointMismatch(f"{err} (evaluate a checkpoint with the _config.yaml of its run folder)") from None
        _warn_config_differences(state.get("metadata", {}).get("config"), cfg)
    selection, test = eval_splits(loaders)
    if args.split == "val" and selection.name != "val":
        raise ConfigError("--split val: this config has no validation split (set val_identities)")
    with torch.no_grad():
        result = validate(model, selection if args.split == "val" else test, device,
                          ImageStageSettings.from_config(cfg).feature_spec, max_rank=cfg.max_rank, amp=cfg.amp)
    print("rank1 {rank1:.2f}  rank5 {rank5:.2f}  rank10 {rank10:.2f}  mAP {mAP:.2f}  mINP {mINP:.2f}".format(**result))
    return 0


# Keys that change neither the model nor how it is evaluated.
_BOOKKEEPING = {"experiment", "variant", "output_dir", "tracking_uri", "device", "log_every", "save_checkpoints",
                "log_checkpoints", "num_workers", "test_batch_size", "tune"}


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
    run.set_defaults(func=cmd_run)

    resume = sub.add_parser("resume", help="continue an interrupted run from its folder",
                            description="Load the run folder's config and LAST checkpoint and go on training; "
                                        "the numbers go to the same MLflow run.")
    resume.add_argument("run_dir", help="the run's folder under output_dir (printed by workbench run)")
    resume.add_argument("--tracking-uri", help="MLflow tracking URI of the original run")
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
    tune.add_argument("--n-jobs", type=int, default=1, help="trials run at once in this process (threads, >= 1)")
    tune.add_argument("--timeout", type=float, help="stop starting trials after this many seconds (> 0)")
    tune.add_argument("--pruner", choices=["median", "hyperband", "none"], help="default: the config's tune.pruner")
    tune.add_argument("--sampler", choices=["tpe", "random", "cmaes"], help="default: the config's tune.sampler")
    tune.add_argument("--keep-checkpoints", choices=["best", "all", "none"],
                      help="checkpoints stored in MLflow (default: the config's tune.keep_checkpoints)")
    tune.add_argument("--select-on-test", action="store_true",
                      help="allow a config without a validation hold-out: trials are then compared and pruned "
                           "on the test split (optimistic numbers)")
    tune.add_argument("--tracking-uri")
    tune.set_defaults(func=cmd_tune)

    compare = sub.add_parser("compare", help="runs as a table sorted by a metric (and saved as CSV)",
                             description="Read runs from MLflow (search_runs) and print them best first.")
    compare.add_argument("--experiment", help="MLflow experiment name (default: all)")
    compare.add_argument("--study", help="only the trials of this study")
    compare.add_argument("--metric", default="best_mAP", help="sort key (default best_mAP)")
    compare.add_argument("--out", help="CSV path (default compare_<study or experiment>.csv)")
    compare.add_argument("--tracking-uri")
    compare.set_defaults(func=cmd_compare)

    ui = sub.add_parser("ui", help="MLflow UI (and optuna-dashboard) on 127.0.0.1",
                        description="Start the MLflow UI over the store that run and tune use; with --study, also "
                                    "optuna-dashboard over that study's storage when it is installed.")
    ui.add_argument("--tracking-uri")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the "
                         "network, with no login)")
    ui.add_argument("--study", help="also open this study in optuna-dashboard")
    ui.add_argument("--storage", help="the study's storage, if not the default studies/<study>.journal")
    ui.add_argument("--dashboard-port", type=int, default=8080)
    ui.set_defaults(func=cmd_ui)

    ev = sub.add_parser("eval", help="rank-k and mAP of a checkpoint (or of the untrained model)",
                        description="Evaluate on the config's query/gallery; without --checkpoint, the model as "
                                    "built from the config's weights.")
    ev.add_argument("config")
    ev.add_argument("--checkpoint", help="a BEST or FINAL image-stage .pth file")
    ev.add_argument("--split", choices=["test", "val"], default="test",
                    help="the test query/gallery (default) or the validation hold-out")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
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
    for command in [run, resume, tune, compare, ui, ev, synth]:
        command.add_argument("--debug", action="store_true",
                             help="show the traceback of an error (also WORKBENCH_DEBUG=1)")
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (Slurm, ``timeout``, ``docker stop``): handled as Ctrl-C is, so the run ends KILLED
    with its metrics flushed and its last epoch's LAST checkpoint ready for ``workbench resume``."""


def _raise_terminated(signum, frame):
    raise Terminated()


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
        print("terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except WorkbenchError as err:
        if _debug(args):
            raise
        print(f"workbench: error: {_one_line(err)}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        if err.errno not in _ENVIRONMENT_ERRNOS or _debug(args):
            raise
        print(f"workbench: error: {os_error_message(err, 'the system refused')}", file=sys.stderr)
        return ResourceError.exit_code


if __name__ == "__main__":
    sys.exit(main())
