"""What a study costs: the same study (same sampler seed, same trials) of the quickstart run twice
in one process, once with the speed switches off (images decoded on every read, validation
every epoch from the first, every trial training its own prompt stage, no stop for trials out
of reach of the best: the settings before issue 10) and once with the given ones, each on its own
fresh journal and SQLite store. Prints wall times, trial tallies, the best metric, and the ratio.

    python bench/tune_cost.py [--config experiments/quickstart.yaml] [--trials 50] [--n-jobs 1]
        [--set val_every=2] [--both epochs_image=10]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import optuna

from workbench import config
from workbench.tuning import TuneOptions, run_study

BEFORE = ["cache_images=false", "val_every=1", "val_start=1", "tune.stop_out_of_reach=false"]


def study_cost(cfg: config.Config, trials: int, n_jobs: int, folder: Path, name: str) -> dict:
    options = TuneOptions(trials=trials, study_name=name, storage=str(folder / f"{name}.log"), n_jobs=n_jobs,
                          tracking_uri=f"sqlite:///{folder / f'{name}.db'}", share_prompt_stages=name != "before")
    started = time.perf_counter()
    study = run_study(cfg, options, log=lambda line: print(f"  {name}: {line}", file=sys.stderr),
                      studies_dir=folder / "studies")
    seconds = time.perf_counter() - started
    states = [t.state for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {"seconds": seconds, "complete": len(complete),
            "pruned": states.count(optuna.trial.TrialState.PRUNED),
            "best": max((t.value for t in complete), default=float("nan"))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/quickstart.yaml")
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--n-jobs", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="the speed settings to compare with the ones before (e.g. val_every=2)")
    parser.add_argument("--both", action="append", default=[], metavar="KEY=VALUE",
                        help="overrides for both studies (e.g. a shorter run: epochs_image=10)")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in (("before", BEFORE), ("now", args.set)):
            cfg = config.load(args.config, [f"output_dir={tmp}/runs_{name}", "save_checkpoints=false", *args.both,
                                           *overrides])
            results[name] = study_cost(cfg, args.trials, args.n_jobs, Path(tmp), name)
    for name, r in results.items():
        print(f"{name:6s} ({' '.join(BEFORE if name == 'before' else args.set) or 'defaults'}): {r['seconds']:7.1f} s, "
              f"{r['complete']} complete, {r['pruned']} pruned, best {r['best']:.2f}")
    ratio = results["before"]["seconds"] / results["now"]["seconds"]
    print(f"{args.trials} trials of {args.config}, n_jobs {args.n_jobs}: now {ratio:.2f}x as fast as before")
    return 0


if __name__ == "__main__":
    sys.exit(main())
