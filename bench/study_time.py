"""Where a finished study's wall time went: per trial, from the study's journal (start and end
times, state, last reported epoch) and the trial's log file (the time of each image epoch's line).

    python bench/study_time.py --journal studies/quickstart.journal --study quickstart --runs runs

Prints one line per trial and the totals over the study:

- ``setup``: from the trial's start to its first image epoch's line, less one epoch (data, model,
  the prompt stage or its cached copy, the first epoch's warm-up);
- ``epochs``: from the first image epoch's line to the last, plus one epoch (an epoch's mean);
- ``end``: from the last image epoch's line to the trial's end (a complete trial's test split,
  plots and files; a pruned trial's bookkeeping);
- ``idle``: the study's slots (``--n-jobs``) times its wall time, less every trial's time.

Log lines carry whole seconds, so each trial's split is good to about a second; the sums over
50 trials are good to a few percent. Nothing here is timed: it reads what a study wrote.
"""
from __future__ import annotations

import argparse
import datetime
import re
from pathlib import Path

import optuna

EPOCH_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) image epoch (\d+)/(\d+)")


def epoch_times(log: Path) -> list[tuple[int, datetime.datetime]]:
    """(epoch, time of its line) for every image epoch the log records."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        match = EPOCH_LINE.match(line)
        if match:
            out.append((int(match[2]), datetime.datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S")))
    return out


def trial_log(runs: Path, study: str, number: int) -> Path | None:
    logs = sorted((runs / f"{study}_trial{number}").rglob("*.log"))
    return logs[-1] if logs else None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--journal", required=True, help="the study's journal file")
    parser.add_argument("--study", required=True)
    parser.add_argument("--runs", required=True, help="the config's output_dir, which holds <study>_trial<n>/")
    parser.add_argument("--n-jobs", type=int, default=2, help="trials the study ran at a time")
    args = parser.parse_args(argv)

    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name=args.study, storage=JournalStorage(JournalFileBackend(args.journal)))
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start and t.datetime_complete]
    if not trials:
        raise SystemExit("study_time: no finished trials in the journal")
    totals = dict(trial=0.0, setup=0.0, epochs=0.0, end=0.0, count=0)
    print(f"{'trial':>5} {'state':>8} {'epochs':>6} {'wall s':>7} {'setup':>6} {'epochs s':>8} {'s/epoch':>7} "
          f"{'end':>5}")
    for t in trials:
        wall = (t.datetime_complete - t.datetime_start).total_seconds()
        totals["trial"] += wall
        log = trial_log(Path(args.runs), args.study, t.number)
        lines = epoch_times(log) if log else []
        if len(lines) < 2:
            print(f"{t.number:>5} {t.state.name:>8} {'?':>6} {wall:>7.1f}   (no epoch lines in its log)")
            continue
        (first_epoch, first), (last_epoch, last) = lines[0], lines[-1]
        per_epoch = (last - first).total_seconds() / (last_epoch - first_epoch)
        start = t.datetime_start.replace(tzinfo=None)
        setup = (first - start).total_seconds() - first_epoch * per_epoch
        epochs = last_epoch * per_epoch
        end = (t.datetime_complete.replace(tzinfo=None) - last).total_seconds()
        totals["setup"] += setup
        totals["epochs"] += epochs
        totals["end"] += end
        totals["count"] += last_epoch
        print(f"{t.number:>5} {t.state.name:>8} {last_epoch:>6} {wall:>7.1f} {setup:>6.1f} {epochs:>8.1f} "
              f"{per_epoch:>7.2f} {end:>5.1f}")
    begin = min(t.datetime_start for t in trials)
    finish = max(t.datetime_complete for t in trials)
    span = (finish - begin).total_seconds()
    idle = args.n_jobs * span - totals["trial"]
    print(f"\nstudy: {len(trials)} trials in {span:.0f} s on {args.n_jobs} slots; {totals['count']} image epochs "
          f"({totals['epochs'] / max(1, totals['count']):.2f} s each in a slot)")
    slot_time = args.n_jobs * span
    for key in ("epochs", "setup", "end"):
        print(f"  {key:<7} {totals[key]:>8.0f} slot-s  {100 * totals[key] / slot_time:5.1f}%")
    print(f"  {'idle':<7} {idle:>8.0f} slot-s  {100 * idle / slot_time:5.1f}%  (no trial running in a slot)")


if __name__ == "__main__":
    main()
