"""What stopping trials out of reach of the best (``tune.stop_out_of_reach``) would have saved in a
finished study: its trials replayed in the order of their numbers, each reporting its recorded
validation curve to a fresh in-memory study until the pruner stops it. Prints, for the median
pruner alone and with the out-of-reach stop at each margin, the image epochs the trials would
train, how many complete, the best value, and every trial that ends earlier than in the study.

    python bench/prune_replay.py --journal studies/quickstart.journal --study quickstart [--margin 1 2 3]
    python bench/prune_replay.py --mlflow sqlite:///mlflow.db --study quickstart

A replay cannot go on past the end of a recorded curve: a trial that the study pruned and the
replay would keep ends where the study pruned it. Trials that ran side by side (``n_jobs`` above 1)
saw fewer complete trials than the replay gives them, so for such a study even the median pruner
alone replays differently from how it ran; the line for it is the baseline to compare with.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import optuna

from workbench.tuning import ReachPruner, build_pruner, OUT_OF_REACH


@dataclass
class Recorded:
    number: int
    complete: bool
    value: float | None
    curve: dict[int, float]  # epoch -> the reported validation value


def from_journal(path: str, study: str) -> tuple[list[Recorded], str]:
    """The study's COMPLETE and PRUNED trials that reported values, and its direction."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    loaded = optuna.load_study(study_name=study, storage=JournalStorage(JournalFileBackend(path)))
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    trials = [Recorded(t.number, t.state == optuna.trial.TrialState.COMPLETE, t.value, dict(t.intermediate_values))
              for t in loaded.trials if t.state in states and t.intermediate_values]
    return trials, loaded.direction.name.lower()


def from_mlflow(uri: str, study: str, key: str) -> list[Recorded]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.study_name = '{study}' and tags.`workbench.role` = 'trial'",
                              max_results=10000)
    trials = []
    for run in runs:
        curve = {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}
        complete = run.data.tags.get("state") == "COMPLETE"
        value = float(run.data.tags["objective"]) if "objective" in run.data.tags else max(curve.values(), default=None)
        if curve:
            trials.append(Recorded(int(run.data.tags["trial_number"]), complete, value if complete else None, curve))
    return sorted(trials, key=lambda t: t.number)


def replay(trials: list[Recorded], pruner: optuna.pruners.BasePruner, epochs: int, direction: str) -> dict:
    study = optuna.create_study(direction=direction, pruner=pruner)
    trained, ended_earlier = 0, []
    for recorded in trials:
        trial = study.ask()
        stopped = None
        for epoch in sorted(recorded.curve):
            trial.report(recorded.curve[epoch], epoch)
            if trial.should_prune():
                stopped = epoch
                break
        why = pruner.pop_reason(trial.number) if isinstance(pruner, ReachPruner) and stopped else None
        if why and why.startswith("out of reach"):
            trial.set_user_attr(OUT_OF_REACH, why)
        if stopped is None and recorded.complete:
            study.tell(trial, recorded.value)
            trained += epochs
            continue
        end = stopped if stopped is not None else max(recorded.curve)
        recorded_end = epochs if recorded.complete else max(recorded.curve)
        if end < recorded_end or recorded.complete:
            sign = 1 if direction == "maximize" else -1
            best_so_far = sign * max(sign * v for e, v in recorded.curve.items() if e <= end)
            ended_earlier.append(f"{recorded.number}: epoch {end} of {recorded_end} at {best_so_far:.2f} "
                                 f"(ended at {recorded.value if recorded.complete else best_so_far:.2f})"
                                 if recorded.complete else f"{recorded.number}: epoch {end} of {recorded_end}")
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        trained += end
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return {"epochs": trained, "complete": len(complete), "best": study.best_value if complete else float("nan"),
            "ended_earlier": ended_earlier}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--journal", help="the study's Optuna journal file (studies/<study>.journal)")
    source.add_argument("--mlflow", help="the tracking store that holds the study's trial runs")
    parser.add_argument("--study", required=True)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs_image of the study's trials (default: the last epoch of its complete trials)")
    parser.add_argument("--metric", default="mAP", help="with --mlflow: the validation metric the trials reported")
    parser.add_argument("--direction", default="maximize", help="with --mlflow: the study's direction")
    parser.add_argument("--margin", type=float, nargs="+", default=[ReachPruner.MARGIN])
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if args.journal:
        trials, direction = from_journal(args.journal, args.study)
    else:
        trials, direction = from_mlflow(args.mlflow, args.study, args.metric), args.direction
    epochs = args.epochs or max((max(t.curve) for t in trials if t.complete), default=0)
    if not epochs:
        parser.error("no complete trial to read epochs_image from: give --epochs")
    print(f"{len(trials)} trials, {sum(t.complete for t in trials)} complete in the study ({direction}, "
          f"{epochs} epochs)")
    rules = [("median", build_pruner("median", epochs, stop_out_of_reach=False))]
    for margin in args.margin:
        pruner = build_pruner("median", epochs)
        pruner.MARGIN = margin
        rules.append((f"median + out of reach, margin {margin:g}x", pruner))
    baseline = None
    for name, pruner in rules:
        r = replay(trials, pruner, epochs, direction)
        baseline = r["epochs"] if baseline is None else baseline
        print(f"{name}: {r['epochs']} image epochs ({baseline - r['epochs']:+d} saved), {r['complete']} complete, "
              f"best {r['best']:.2f}")
        for line in r["ended_earlier"]:
            print(f"    trial {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
