"""``workbench``: run, eval and data commands.

Errors a user can cause (config, data, weights, checkpoint, NaN loss) end with one line on
stderr and exit status 2; Ctrl-C exits 130. Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path



def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .evaluation import EvaluationError
    from .model import ModelError
    from .stages import NonFiniteLossError

    return ConfigError, DataError, ModelError, CheckpointError, EvaluationError, NonFiniteLossError


def _one_line(err: BaseException) -> str:
    # Errors raised inside DataLoader workers arrive wrapped with the worker's traceback text;
    # the original message is its last line.
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(err).__name__
    for prefix in ("workbench.data.DataError: ",):
        text = text.replace(prefix, "")
    return text


def cmd_run(args) -> int:
    from . import config
    from .runner import train_joint
    from .tracking import MlflowTracker, resolve_tracking_uri

    cfg = config.load(args.config, args.set)
    tracker = MlflowTracker(resolve_tracking_uri(args.tracking_uri, cfg))
    return _report(train_joint(cfg, tracker), tracker)


def _report(result: dict, tracker) -> int:
    print(f"best rank1 {result['best_rank1']:.2f}  best mAP {result['best_mAP']:.2f}  "
          f"(epoch {result['best_epoch']})")
    if result.get("final_rank1") is not None:
        print(f"final rank1 {result['final_rank1']:.2f}  rank5 {result['final_rank5']:.2f}  "
              f"rank10 {result['final_rank10']:.2f}  mAP {result['final_mAP']:.2f}")
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
        raise config.ConfigError(f"{run_dir}: expected one *_config.yaml of a workbench run, found {len(configs)}")
    cfg = config.load(configs[0])
    tracker = MlflowTracker(resolve_tracking_uri(args.tracking_uri, cfg))
    return _report(train_joint(cfg, tracker, resume_dir=run_dir), tracker)


def cmd_eval(args) -> int:
    """Evaluate a BEST / FINAL checkpoint (or an untrained model) on query / gallery."""
    import torch

    from . import config
    from .checkpoint import load_checkpoint
    from .data import load_reid_dataset
    from .evaluation import validate
    from .runner import build_model_and_loaders, ensure_dataset, seed_everything, select_device

    cfg = config.load(args.config, args.set)
    seed_everything(cfg.seed)
    device = select_device(cfg.device)
    ensure_dataset(cfg, print)
    data = load_reid_dataset(cfg.data_root)
    loaders, model, _, _ = build_model_and_loaders(cfg, data, device)
    if args.checkpoint:
        load_checkpoint(args.checkpoint, model=model, device=device, restore_rng=False, log=print)
    cams = ([r.camid for r in data.query], [r.camid for r in data.gallery]) if data.has_cameras else (None, None)
    with torch.no_grad():
        result = validate(model, loaders.query, loaders.gallery, device, [r.pid for r in data.query],
                          [r.pid for r in data.gallery], *cams, neck=cfg.eval_neck_feat, max_rank=cfg.max_rank,
                          amp=cfg.amp)
    print("rank1 {rank1:.2f}  rank5 {rank5:.2f}  rank10 {rank10:.2f}  mAP {mAP:.2f}  mINP {mINP:.2f}".format(**result))
    return 0


def cmd_data_synth(args) -> int:
    from .data import synthesize_dataset

    root = synthesize_dataset(args.out, args.identities, args.images_per_identity, seed=args.seed,
                              size=(args.height, args.width))
    print(f"wrote a synthetic dataset of {args.identities} train + {args.identities} test identities to {root}")
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

    ev = sub.add_parser("eval", help="rank-k and mAP of a checkpoint (or of the untrained model)",
                        description="Evaluate on the config's query/gallery; without --checkpoint, the model as "
                                    "built from the config's weights.")
    ev.add_argument("config")
    ev.add_argument("--checkpoint", help="a BEST or FINAL image-stage .pth file")
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ev.set_defaults(func=cmd_eval)

    data = sub.add_parser("data", help="dataset tools", description="Dataset tools.")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the synthetic hand-identity dataset",
                                description="Write root/{train,query,gallery}/<pid>/<pid>_c<cam>_<n>.png.")
    synth.add_argument("--out", required=True, help="folder to create")
    synth.add_argument("--identities", type=int, default=60, help="training identities (as many for testing)")
    synth.add_argument("--images-per-identity", type=int, default=8)
    synth.add_argument("--height", type=int, default=128)
    synth.add_argument("--width", type=int, default=64)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_data_synth)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as err:
        print(f"workbench: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if "DataError" in str(err):  # a worker's DataError re-raised by the DataLoader
            print(f"workbench: error: {_one_line(err)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
