"""What MLflow tracking costs a run: the same run (the quickstart, shortened) with an MlflowTracker
on a fresh SQLite store against a NullTracker (tracking off), alternating the two in one process
so that both see the same machine. Prints each wall time, the medians and the overhead.

    python bench/tracking_overhead.py [--config experiments/quickstart.yaml] [--repeats 3]
        [--set epochs_prompt=3 --set epochs_image=6] [--tracking-uri URI]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from workbench import config
from workbench.runner import train_joint
from workbench.tracking import MlflowTracker, NullTracker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="experiments/quickstart.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides (default: epochs_prompt=3, epochs_image=6)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind, alternating")
    parser.add_argument("--tracking-uri", default=None, help="a store to measure (default: a fresh SQLite file)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        overrides = ["epochs_prompt=3", "epochs_image=6", "save_checkpoints=false", f"output_dir={tmp}/runs",
                     *args.set]
        cfg = config.load(args.config, overrides)
        uri = args.tracking_uri or f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        times: dict[str, list[float]] = {"off": [], "mlflow": []}
        train_joint(cfg, NullTracker())  # warm-up: dataset, decoded images, first-call costs
        for repeat in range(args.repeats):
            order = ("off", "mlflow") if repeat % 2 == 0 else ("mlflow", "off")
            for kind in order:
                tracker = NullTracker() if kind == "off" else MlflowTracker(uri)
                started = time.perf_counter()
                train_joint(cfg, tracker)
                times[kind].append(time.perf_counter() - started)
                print(f"repeat {repeat + 1} {kind:6s} {times[kind][-1]:7.2f} s", file=sys.stderr)
    off, on = statistics.median(times["off"]), statistics.median(times["mlflow"])
    print(f"config {args.config} {' '.join(overrides[:2] + args.set)}; store {args.tracking_uri or 'SQLite (fresh)'}")
    print(f"tracking off: median {off:.2f} s ({', '.join(f'{t:.2f}' for t in times['off'])})")
    print(f"MLflow on:    median {on:.2f} s ({', '.join(f'{t:.2f}' for t in times['mlflow'])})")
    print(f"overhead: {100 * (on / off - 1):+.1f}% (ratio {on / off:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
