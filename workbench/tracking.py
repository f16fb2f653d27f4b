"""Tracking through a thin ``Tracker``: the loops call its methods, never MLflow.

``MlflowTracker`` batches metric calls (one ``log_batch`` per flush, not one request per
number); ``NullTracker`` does nothing (benchmarks, unit tests); ``RecordingTracker`` keeps the
call list for tests. Every tracker keeps the metric history for the end-of-run plots.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Protocol

from .config import Config, flatten

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(cli_uri: str | None, cfg: Config | None) -> str:
    """``--tracking-uri``, then the config, then MLFLOW_TRACKING_URI, then ``sqlite:///mlflow.db``
    in the current folder (what ``mlflow ui`` opens by default)."""
    return (cli_uri or (cfg.tracking_uri if cfg else None) or os.environ.get("MLFLOW_TRACKING_URI")
            or DEFAULT_TRACKING_URI)


class RunStopped(Exception):
    """Raised from inside a run to end it early on purpose (a pruned tuning trial): the run ends
    FINISHED with what it logged so far, and the exception goes on to the caller."""


class Tracker(Protocol):
    history: dict[str, list[tuple[int, float]]]

    def start_run(self, name: str, experiment: str, tags: dict | None = None, parent_run_id: str | None = None,
                  run_id: str | None = None) -> contextlib.AbstractContextManager[str]: ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def flush(self) -> None: ...


class NullTracker:
    """Keeps the metric history (for plots and return values) and nothing else."""

    run_id: str | None = None

    def __init__(self):
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    @contextlib.contextmanager
    def start_run(self, name: str, experiment: str, tags: dict | None = None, parent_run_id: str | None = None,
                  run_id: str | None = None) -> Iterator[str]:
        self.run_id = run_id or name
        yield self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.history[key].append((int(step), float(value)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass


class RecordingTracker(NullTracker):
    """Records every call as (method, args) in ``calls``; for tests."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, Any]] = []
        self.params: dict[str, Any] = {}
        self.tags: dict[str, Any] = {}
        self.artifacts: list[tuple[str, str | None]] = []
        self.status: str | None = None

    @contextlib.contextmanager
    def start_run(self, name: str, experiment: str, tags: dict | None = None, parent_run_id: str | None = None,
                  run_id: str | None = None) -> Iterator[str]:
        self.calls.append(("start_run", (name, experiment)))
        self.tags.update(tags or {})
        self.run_id = run_id or name
        try:
            yield self.run_id
            self.status = "FINISHED"
        except RunStopped:
            self.status = "FINISHED"
            raise
        except KeyboardInterrupt:
            self.status = "KILLED"
            raise
        except BaseException:
            self.status = "FAILED"
            raise

    def log_params(self, params):
        self.calls.append(("log_params", dict(params)))
        self.params.update(params)

    def log_metrics(self, metrics, step):
        self.calls.append(("log_metrics", (dict(metrics), step)))
        super().log_metrics(metrics, step)

    def log_artifact(self, path, artifact_path=None):
        self.calls.append(("log_artifact", (str(path), artifact_path)))
        self.artifacts.append((Path(path).name, artifact_path))

    def set_tags(self, tags):
        self.calls.append(("set_tags", dict(tags)))
        self.tags.update(tags)


class MlflowTracker(NullTracker):
    """MLflow through ``MlflowClient``: metrics are buffered and sent with ``log_batch``.

    A run that raises ends FAILED, one interrupted (Ctrl-C) KILLED, never FINISHED (except
    RunStopped, an intended early end). Safe to use from one thread; give each thread its own."""

    MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request

    def __init__(self, tracking_uri: str):
        super().__init__()
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        if tracking_uri.startswith("sqlite:///"):
            self.client = _open_sqlite_store(tracking_uri)
        else:
            self.client = MlflowClient(tracking_uri=tracking_uri)
        self._pending: list = []
        self._run_stack: list[str] = []
        self.last_run_id: str | None = None

    @property
    def run_id(self) -> str | None:  # type: ignore[override]
        return self._run_stack[-1] if self._run_stack else None

    def experiment_id(self, name: str) -> str:
        """Id of the experiment ``name``, created (and tagged as model development) if new."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            from mlflow.exceptions import MlflowException
            try:
                experiment_id = self.client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException:  # created meanwhile by another worker
                experiment_id = self.client.get_experiment_by_name(name).experiment_id
            return experiment_id
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            self.client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id

    @contextlib.contextmanager
    def start_run(self, name: str, experiment: str, tags: dict | None = None, parent_run_id: str | None = None,
                  run_id: str | None = None) -> Iterator[str]:
        """A new run (nested under ``parent_run_id`` when given), or with ``run_id`` the same run
        again (a resumed training run)."""
        tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
        else:
            run_id = self.client.create_run(self.experiment_id(experiment), run_name=name, tags=tags).info.run_id
        self._run_stack.append(run_id)
        self.last_run_id = run_id
        status = "FAILED"
        try:
            yield run_id
            status = "FINISHED"
        except RunStopped:
            status = "FINISHED"  # stopped on purpose (a pruned trial): its numbers so far stand
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            try:
                self.flush()
            finally:
                self.client.set_terminated(run_id, status=status)
                self._run_stack.pop()

    def log_params(self, params: dict[str, Any]) -> None:
        self.log_params_to(self.run_id, params)

    def log_params_to(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's limit of params per request
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        super().log_metrics(metrics, step)
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        if len(self._pending) >= self.MAX_BATCH:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:self.MAX_BATCH], self._pending[self.MAX_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(str(k), str(v)) for k, v in tags.items()])


def _open_sqlite_store(tracking_uri: str):
    """An MlflowClient on a SQLite store, opened (and on first use created and migrated) under a
    file lock: processes that start together, the workers of one study, would otherwise race to
    create its tables and fail."""
    import fcntl

    from mlflow.tracking import MlflowClient

    db_path = Path(tracking_uri[len("sqlite:///"):])
    lock = db_path.with_name(db_path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            client = MlflowClient(tracking_uri=tracking_uri)
            client.search_experiments(max_results=1)
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
    return client


def run_params(cfg: Config) -> dict[str, Any]:
    """The whole config, flattened (``tune.metric``, lists as JSON)."""
    return flatten(cfg.to_dict())


def save_curves(history: dict[str, list[tuple[int, float]]], path: str | Path, keys: list[str],
                title: str) -> Path | None:
    """One PNG with a panel per metric in ``keys`` that has values; None when none has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if history.get(k)]
    if not keys:
        return None
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=False, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        steps, values = zip(*history[key])
        ax.plot(steps, values, lw=1.2)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def runs_table(tracking_uri: str, experiment: str | None = None, study: str | None = None,
               metric: str = "best_mAP"):
    """Runs as a pandas DataFrame, sorted by ``metric`` (best first): run name and id, status,
    trial number, the tuned parameters, rank-k and mAP. ``experiment`` None means all
    experiments; ``study`` keeps the trials of one study."""
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ValueError(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
        ids = [found.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.study_name = '{study}' and tags.`workbench.role` = 'trial'" if study else ""
    mlflow.set_tracking_uri(tracking_uri)
    frame = mlflow.search_runs(experiment_ids=ids, filter_string=query, output_format="pandas")
    if frame.empty:
        return frame
    wanted = ["tags.mlflow.runName", "run_id", "status", "tags.trial_number", "tags.state", "params.n_ctx",
              "params.lr", "params.center_loss_weight", f"metrics.{metric}", "metrics.best_rank1", "metrics.best_mAP",
              "metrics.test_rank1", "metrics.test_mAP", "tags.selection"]
    columns = list(dict.fromkeys(c for c in wanted if c in frame.columns))
    frame = frame[columns].rename(columns=lambda c: c.split(".", 1)[1] if "." in c else c)
    if metric in frame.columns:
        frame = frame.sort_values(metric, ascending=False, na_position="last")
    return frame.reset_index(drop=True)
