"""Tracking through a thin ``Tracker``: the loops call its methods, never MLflow.

``MlflowTracker`` batches metric calls (one ``log_batch`` per flush, not one request per
number); ``NullTracker`` does nothing (benchmarks, unit tests); ``RecordingTracker`` keeps the
call list for tests. Every tracker keeps the metric history for the end-of-run plots.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator, Protocol

from .checkpoint import signals_held
from .config import Config, flatten
from .errors import TrackingError, TrackingUriError

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
                  run_id: str | None = None, spool_dir: Path | None = None) -> contextlib.AbstractContextManager[str]:
        ...
    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def log_dataset(self, name: str, source: str, digest: str, context: str) -> None: ...
    def flush(self, min_interval: float = 0.0) -> None: ...
    def system_metrics(self, interval: float) -> contextlib.AbstractContextManager: ...


class NullTracker:
    """Keeps the metric history (for plots and return values) and nothing else."""

    run_id: str | None = None

    def __init__(self):
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)

    @contextlib.contextmanager
    def start_run(self, name: str, experiment: str, tags: dict | None = None, parent_run_id: str | None = None,
                  run_id: str | None = None, spool_dir: Path | None = None) -> Iterator[str]:
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

    def log_dataset(self, name: str, source: str, digest: str, context: str) -> None:
        pass

    def flush(self, min_interval: float = 0.0) -> None:
        pass

    def system_metrics(self, interval: float) -> contextlib.AbstractContextManager:
        """Sample the machine's use into the current run while the context is open (a no-op here)."""
        return contextlib.nullcontext()


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
                  run_id: str | None = None, spool_dir: Path | None = None) -> Iterator[str]:
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

    def log_dataset(self, name, source, digest, context):
        self.calls.append(("log_dataset", (name, source, digest, context)))


class MlflowTracker(NullTracker):
    """MLflow through ``MlflowClient``: metrics are buffered and sent with ``log_batch``.

    The store is checked when the tracker is made (a TrackingError names it and the reason). A
    run that raises ends FAILED, one interrupted (Ctrl-C, SIGTERM) KILLED, never FINISHED (except
    RunStopped, an intended early end). When the store stops answering during a run, training
    goes on: metrics stay buffered and are retried at later flushes (at most every
    ``RETRY_SECONDS``); whatever is still undelivered when the run ends is written to
    ``<spool_dir>/undelivered_metrics.csv`` and the run ends with a TrackingError saying so.
    Safe to use from one thread; give each thread its own."""

    MAX_BATCH = 1000  # MLflow's limit of metrics per log_batch request
    RETRY_SECONDS = 30.0
    HEARTBEAT_SECONDS = 120.0
    PROBE_TIMEOUT = 10.0

    def __init__(self, tracking_uri: str, must_exist: bool = False):
        super().__init__()
        self.tracking_uri = tracking_uri
        self.client = _open_store(tracking_uri, self.PROBE_TIMEOUT, must_exist=must_exist)
        self._pending: list = []
        self._run_stack: list[str] = []
        self.last_run_id: str | None = None
        self.delivery_error: str | None = None  # why the last flush failed; None when all went through
        self._next_retry = 0.0
        self._last_send = 0.0

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
                  run_id: str | None = None, spool_dir: Path | None = None) -> Iterator[str]:
        """A new run (nested under ``parent_run_id`` when given), or with ``run_id`` the same run
        again (a resumed training run). Undelivered metrics are saved in ``spool_dir``."""
        tags = {k: str(v) for k, v in (tags or {}).items()} | {"workbench.host": socket.gethostname(),
                                                              "workbench.machine": machine_id(),
                                                              "workbench.pid": str(os.getpid())}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        try:
            if run_id is not None:
                self.client.update_run(run_id, status="RUNNING")
                self.client.log_batch(run_id, tags=[_tag(k, v) for k, v in tags.items() if k.startswith("workbench.")])
                if "workbench.stale" in self.client.get_run(run_id).data.tags:  # it is alive again
                    self.client.delete_tag(run_id, "workbench.stale")
            else:
                run_id = self.client.create_run(self.experiment_id(experiment), run_name=name, tags=tags).info.run_id
        except Exception as err:
            raise TrackingError(f"cannot start an MLflow run at {self.tracking_uri}: {_reason(err)}") from err
        self._run_stack.append(run_id)
        self.last_run_id = run_id
        status = "FAILED"
        failed = True
        heartbeat = _Heartbeat(self.tracking_uri, run_id, self.HEARTBEAT_SECONDS)
        try:
            yield run_id
            status, failed = "FINISHED", False
        except RunStopped as stop:
            # stopped on purpose (a pruned trial): its numbers so far stand
            status, failed = getattr(stop, "run_status", "FINISHED"), False
            raise
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            heartbeat.stop()
            try:  # nested, so that a second Ctrl-C during the flush still ends the run
                self._next_retry = 0.0
                self.flush()
            finally:
                try:
                    with signals_held():
                        self.client.set_terminated(run_id, status=status)
                except Exception as err:
                    self.delivery_error = self.delivery_error or _reason(err)
                self._run_stack.pop()
            if self.delivery_error is not None:
                message = self._report_undelivered(run_id, spool_dir)
                if not failed:  # a run's own failure is the more useful message; this one is in the log
                    raise TrackingError(message)
                print(f"warning: {message}", file=sys.stderr)

    @contextlib.contextmanager
    def system_metrics(self, interval: float) -> Iterator[None]:
        """MLflow's system metrics of the current run while the context is open: CPU, memory, disk
        and network every ``interval`` seconds, and GPU utilisation and memory when nvidia-ml-py
        (NVIDIA) or pyrsmi (AMD) is installed, as ``system/...`` (the UI's System metrics tab).
        Without psutil, one warning line and nothing else."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
        except ImportError as err:
            print(f"warning: no system metrics ({err}); pip install psutil", file=sys.stderr)
            yield
            return
        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter
        monitor = SystemMetricsMonitor(self.run_id, sampling_interval=interval, samples_before_logging=1,
                                       resume_logging=True, tracking_uri=self.tracking_uri)
        monitor.start()
        try:
            yield
        finally:
            monitor.finish()

    def has_run(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
        except Exception:
            return False
        return True

    @contextlib.contextmanager
    def attach(self, run_id: str) -> Iterator[str]:
        """Log into an existing run (a finished training run that ``workbench eval`` adds to)
        without changing its status."""
        self._run_stack.append(run_id)
        try:
            yield run_id
        finally:
            self._next_retry = 0.0
            self.flush()
            self._run_stack.pop()
        if self.delivery_error is not None:
            raise TrackingError(f"cannot log to run {run_id} at {self.tracking_uri}: {self.delivery_error}")

    def _report_undelivered(self, run_id: str, spool_dir: Path | None) -> str:
        """Write the metrics that never reached the store to a CSV; the message saying so."""
        message = f"the tracking store {self.tracking_uri} stopped answering ({self.delivery_error})"
        if self._pending:
            path = Path(spool_dir or ".") / "undelivered_metrics.csv"
            with open(path, "a") as f:
                f.write("" if path.stat().st_size else "run_id,key,value,timestamp,step\n")
                f.writelines(f"{run_id},{m.key},{m.value!r},{m.timestamp},{m.step}\n" for m in self._pending)
            message += f"; {len(self._pending)} metric values were not delivered and are saved in {path}"
            self._pending = []
        return message + "; the run's files and checkpoints are kept"

    def log_params(self, params: dict[str, Any]) -> None:
        self.log_params_to(self.run_id, params)

    def log_params_to(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
        try:
            for i in range(0, len(items), 100):  # MLflow's limit of params per request
                self.client.log_batch(run_id, params=items[i:i + 100])
        except Exception as err:
            raise TrackingError(f"cannot log the params of run {run_id} at {self.tracking_uri}: {_reason(err)}") \
                from err

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        super().log_metrics(metrics, step)
        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        if len(self._pending) >= self.MAX_BATCH:
            self.flush()

    def flush(self, min_interval: float = 0.0) -> None:
        """Send the buffered metrics, or with ``min_interval`` only when that many seconds passed
        since the last send (the training steps' flushes: one write per few seconds, whatever
        log_every is). A store that does not answer keeps them buffered (retried at the next flush
        after ``RETRY_SECONDS``) and sets ``delivery_error``."""
        now = time.monotonic()
        if not self._pending or now < self._next_retry or now - self._last_send < min_interval:
            return
        self._last_send = now
        try:
            with signals_held():
                while self._pending:
                    self.client.log_batch(self.run_id, metrics=self._pending[:self.MAX_BATCH],
                                          tags=[_tag(HEARTBEAT_TAG, int(time.time()))])
                    self._pending = self._pending[self.MAX_BATCH:]
        except Exception as err:
            if self.delivery_error is None:
                print(f"warning: cannot log to {self.tracking_uri} ({_reason(err)}); training goes on and the "
                      f"metrics are kept to retry", file=sys.stderr)
            self.delivery_error = _reason(err)
            self._next_retry = time.monotonic() + self.RETRY_SECONDS
        else:
            self.delivery_error = None

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        try:
            self.client.log_artifact(self.run_id, str(path), artifact_path)
        except Exception as err:  # the file stays in the run folder
            self.delivery_error = self.delivery_error or _reason(err)
            print(f"warning: cannot store {Path(path).name} in MLflow ({_reason(err)}); it stays at {path}",
                  file=sys.stderr)

    def set_tags(self, tags: dict[str, Any]) -> None:
        try:
            self.client.log_batch(self.run_id, tags=[_tag(k, v) for k, v in tags.items()])
        except Exception as err:
            raise TrackingError(f"cannot tag run {self.run_id} at {self.tracking_uri}: {_reason(err)}") from err

    def log_dataset(self, name: str, source: str, digest: str, context: str) -> None:
        """The data as an MLflow dataset input (the runs table's Dataset column): ``source`` is
        its folder, ``digest`` identifies its file list, ``context`` its role (train, val, test)."""
        log_dataset_to(self.client, self.run_id, name, source, digest, context)


def log_dataset_to(client, run_id: str, name: str, source: str, digest: str, context: str) -> None:
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local folder either way
        warnings.simplefilter("ignore", UserWarning)
        dataset = MetaDataset(resolve_dataset_source(source), name=name, digest=digest)
    inputs = [DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])]
    with _DATASET_LOCK:
        try:
            client.log_inputs(run_id, inputs)
        except Exception:  # MLflow checks, then inserts: a worker process may have inserted it meanwhile
            time.sleep(0.2)
            client.log_inputs(run_id, inputs)


_DATASET_LOCK = threading.Lock()  # trial threads of one process register a dataset in turn


HEARTBEAT_TAG = "workbench.heartbeat"  # unix time of the run's latest sign of life (flush or heartbeat thread)
STALE_AFTER_SECONDS = 3600  # a RUNNING run on another machine without a heartbeat for this long is stale


def machine_id() -> str:
    """This machine as process ids see it: the host name and, where Linux shows it, the PID
    namespace. Containers that share a host name but not their process ids (each its own PID
    namespace) are then different machines, whose pids this one never looks up."""
    try:
        return f"{socket.gethostname()}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()


def on_this_machine(machine: str) -> bool:
    """Whether ``machine`` (a ``machine_id``, or a bare host name recorded before the PID
    namespace was) is this one: whether its pids can be looked up here."""
    return machine == machine_id() or ("/" not in machine and machine == socket.gethostname())


def stale_reason(run, now: float | None = None) -> str | None:
    """Why a RUNNING MLflow run is stale (its process ended without closing it: SIGKILL, a
    crashed machine), or None while it may still be alive: on this machine its process must
    exist; elsewhere its latest flush must be younger than ``STALE_AFTER_SECONDS``."""
    if run.info.status != "RUNNING":
        return None
    tags = run.data.tags
    host, pid = tags.get("workbench.host"), tags.get("workbench.pid", "")
    if on_this_machine(tags.get("workbench.machine") or host or "") and pid.isdigit():  # older runs: the host
        return None if process_alive(int(pid)) else f"its process {pid} on {host} ended without closing it"
    last = max(float(tags.get(HEARTBEAT_TAG, 0)), (run.info.start_time or 0) / 1000)
    now = time.time() if now is None else now
    if now - last > STALE_AFTER_SECONDS:
        return f"no sign of life for {(now - last) / 60:.0f} min (host {host or 'unknown'})"
    return None


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def mark_stale_runs(client, experiment_ids: list[str], by: str) -> list[str]:
    """End the stale RUNNING runs of these experiments as KILLED, tagged with the reason;
    returns their ids."""
    marked = []
    for run in client.search_runs(experiment_ids, "attributes.status = 'RUNNING'", max_results=5000):
        if run.data.tags.get("workbench.role") == "study":  # a study's parent run: its workers close it
            continue
        reason = stale_reason(run)
        if reason:
            client.set_tag(run.info.run_id, "workbench.stale", f"{reason}; marked KILLED by {by}")
            client.set_terminated(run.info.run_id, status="KILLED")
            marked.append(run.info.run_id)
    return marked


class _Heartbeat:
    """A daemon thread that stamps the run's ``workbench.heartbeat`` tag every ``seconds`` (with
    its own client), so that a run alive in a long validation is never taken for a dead one."""

    def __init__(self, tracking_uri: str, run_id: str, seconds: float):
        import threading

        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(tracking_uri, run_id, seconds), daemon=True,
                                        name=f"heartbeat-{run_id}")
        self._thread.start()

    def _beat(self, tracking_uri: str, run_id: str, seconds: float) -> None:
        from mlflow.tracking import MlflowClient

        client = None
        while not self._stopped.wait(seconds):
            try:
                client = client or MlflowClient(tracking_uri)
                client.set_tag(run_id, HEARTBEAT_TAG, int(time.time()))
            except Exception:  # the store is away: the run's own flushes report it
                pass

    def stop(self) -> None:
        self._stopped.set()


def _tag(key, value):
    from mlflow.entities import RunTag

    return RunTag(str(key), str(value))


def _reason(err: BaseException) -> str:
    """An exception from MLflow, SQLAlchemy or requests as one short line."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


KNOWN_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc",
                 "file")


def _open_store(tracking_uri: str, timeout: float, must_exist: bool = False):
    """An MlflowClient on ``tracking_uri``, checked to answer. A URI that cannot name a store (an
    unknown scheme, the file store MLflow 3 refuses, a path through a file) is a
    TrackingUriError; a store that does not answer (a server down, a database that cannot be
    opened) a TrackingError. A server is asked once, with a short timeout, not through MLflow's
    minutes of retries. ``must_exist`` (read-only commands): a SQLite file that is not there is an
    error, not a new empty store."""
    from mlflow.tracking import MlflowClient

    scheme = tracking_uri.split("://", 1)[0].split("+", 1)[0] if "://" in tracking_uri else "file"
    if scheme not in KNOWN_SCHEMES:
        raise TrackingUriError(f"tracking store {tracking_uri}: unknown scheme {scheme}://; use sqlite:///mlflow.db, "
                               f"http(s)://host:port or a database URL such as postgresql://...")
    if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("1", "true"):
        raise TrackingUriError(f"tracking store {tracking_uri}: MLflow 3 no longer writes a file store; use a "
                               f"database such as sqlite:///mlflow.db (or set MLFLOW_ALLOW_FILE_STORE=true)")
    if tracking_uri.startswith("sqlite:///"):
        db_path = Path(tracking_uri[len("sqlite:///"):])
        blocking = next((p for p in db_path.parents if p.exists() and not p.is_dir()), None)
        if blocking is not None:
            raise TrackingUriError(f"tracking store {tracking_uri}: {blocking} is a file where a folder is needed")
        if must_exist and not db_path.is_file():
            raise TrackingUriError(f"tracking store {tracking_uri}: no such database file {db_path} (give the "
                                   f"--tracking-uri the runs were logged to)")
    if scheme in ("http", "https"):
        # MLflow's defaults (7 retries, 120 s timeout) stall a run for minutes per failed flush;
        # a tracker retries on its own, so each request gives up sooner unless the user says otherwise.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    try:
        if scheme in ("http", "https"):
            import requests

            requests.get(tracking_uri.rstrip("/") + "/health", timeout=timeout)
            client = MlflowClient(tracking_uri=tracking_uri)
            # /health answers even where the API refuses this client (a host name the server does
            # not allow, a login it wants): ask the API too.
            client.search_experiments(max_results=1)
            return client
        if tracking_uri.startswith("sqlite:///"):
            return _open_sqlite_store(tracking_uri)
        client = MlflowClient(tracking_uri=tracking_uri)
        client.search_experiments(max_results=1)
        return client
    except Exception as err:
        raise TrackingError(f"tracking store {tracking_uri}: {_reason(err)}") from None


def _open_sqlite_store(tracking_uri: str):
    """An MlflowClient on a SQLite store, opened (and on first use created and migrated) under a
    file lock: processes that start together, the workers of one study, would otherwise race to
    create its tables and fail."""
    import fcntl

    from mlflow.tracking import MlflowClient

    import logging

    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables..."
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


def runs_table(tracking_uri: str, experiment: str | None = None, study: str | None = None,
               metric: str = "best_mAP"):
    """Runs as a pandas DataFrame, sorted by ``metric`` (best first): run name and id, status,
    method (stage_mode), trial number, the parameters that differ between the runs (a study's
    tuned keys; PromptSG's beside CLIP-ReID's), rank-k and mAP. ``experiment`` None means all
    experiments; ``study`` keeps the trials of one study."""
    import mlflow

    client = _open_store(tracking_uri, MlflowTracker.PROBE_TIMEOUT, must_exist=True)
    if experiment:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise ValueError(f"no MLflow experiment named {experiment!r} at {tracking_uri}")
        ids = [found.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    # The study name is compared here, not inside the filter string, where a quote would break it.
    query = "tags.`workbench.role` = 'trial'" if study else ""
    mlflow.set_tracking_uri(tracking_uri)
    frame = mlflow.search_runs(experiment_ids=ids, filter_string=query, output_format="pandas")
    if study and not frame.empty:
        frame = frame[frame.get("tags.study_name") == study]
    if frame.empty:
        return frame
    if f"metrics.{metric}" not in frame.columns:
        logged = sorted(c.split(".", 1)[1] for c in frame.columns if c.startswith("metrics."))
        raise ValueError(f"--metric {metric}: no run here logged it; they logged {', '.join(logged) or 'no metric'}")
    wanted = ["tags.mlflow.runName", "run_id", "status", "tags.stage_mode", "tags.trial_number", "tags.state",
              *_varying_params(frame), f"metrics.{metric}", "metrics.best_rank1", "metrics.best_mAP",
              "metrics.test_rank1", "metrics.test_mAP", "tags.selection"]
    columns = list(dict.fromkeys(c for c in wanted if c in frame.columns))
    frame = frame[columns].rename(columns=lambda c: "run_name" if c == "tags.mlflow.runName" else c.split(".", 1)[-1])
    if metric in frame.columns:
        frame = frame.sort_values(metric, ascending=False, na_position="last")
    return frame.reset_index(drop=True)


# Params that never tell two runs' models apart, left out of the comparison.
_PARAMS_NOT_COMPARED = {"experiment", "output_dir", "tracking_uri", "device", "log_every", "save_checkpoints",
                        "log_checkpoints", "num_workers", "test_batch_size", "system_metrics",
                        "system_metrics_interval", "cache_images"}


def _varying_params(frame, most: int = 10) -> list[str]:
    """The ``params.*`` columns whose values differ between the runs (at most ``most``, by name);
    ``params.lr`` when none does."""
    columns = [c for c in frame.columns if c.startswith("params.") and not c.startswith("params.tune.")
               and c.split(".", 1)[1] not in _PARAMS_NOT_COMPARED]
    varying = sorted(c for c in columns if frame[c].astype(str).nunique(dropna=False) > 1)
    return varying[:most] or [c for c in ("params.lr",) if c in frame.columns]
