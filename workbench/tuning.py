"""``workbench tune``: an Optuna study whose every trial is a complete ``train_joint`` run.

One function maps a trial to config overrides (``suggest_overrides``); the objective applies them
and calls the same ``train_joint`` as ``workbench run``; the image stage's ``report`` callback
feeds Optuna's pruner. Each trial is an MLflow run nested under one parent run per study.

``--trials N`` asks for N counted trials: COMPLETE, PRUNED, and FAIL when the trial failed on its
own (a sampled config the validation rejects, a NaN), which would fail again. A trial whose worker
went away (killed, Ctrl-C, SIGTERM) does not count: re-running the command replaces it. Nor does a
trial that met a fault of the environment (the tracking store, the disk, the study storage): the
study stops there with that error, since every later trial would meet it too.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import errno
import fcntl
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
import torch

from . import config as config_module
from .config import TUNE_METRICS, Config, ConfigError, build_filename
from .errors import ResourceError, StorageError, StudyFailed, TrackingError, UsageError, os_error_message
from .runner import FeatureCache, PromptStageCache, preflight, train_joint, workers_side_by_side
from .tracking import MlflowTracker, RunStopped, machine_id, mark_stale_runs, on_this_machine, process_alive

STUDIES_DIR = Path("studies")
PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"
SESSIONS_ATTR = "tune_sessions"
SUMMARY_ATTR = "summary_at_trials"  # the counted trials when the summary was last written
# A study's name names files under studies/: a plain name, never a path.
STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
# Why a trial failed when it was not the trial's fault: it does not count and gets replaced.
WORKER_ENDED = "its worker process ended"
INTERRUPTED = "interrupted"
FAULT = "fault: "  # prefix of the reason of a trial stopped by a fault of the environment
# Faults of the environment, not of the trial: every later trial would fail the same way.
FAULTS = (TrackingError, ResourceError, StorageError)
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# workbench records a claimed trial's heartbeats itself (_TrialHeartbeat), as Study.optimize does.
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


class TrialPruned(RunStopped):
    """The pruner stopped this trial after a validation epoch."""


class TrialTakenOver(RunStopped):
    """Another worker failed this trial (no heartbeat for the grace period: this worker was paused
    or cut off) and replaced it: this worker drops it and leaves its MLflow run KILLED."""

    run_status = "KILLED"


@dataclass
class TuneOptions:
    trials: int
    study_name: str
    storage: str | None = None
    n_jobs: int | None = None  # None: the config's tune.n_jobs
    timeout: float | None = None
    pruner: str | None = None  # None: the config's tune.pruner
    sampler: str | None = None
    tracking_uri: str | None = None
    keep_checkpoints: str | None = None
    share_prompt_stages: bool = True  # trials that differ only in image-stage keys share one (PromptStageCache)

    def __post_init__(self):
        # Checked before anything is created: a wrong value leaves no study and no MLflow run.
        if self.trials < 1:
            raise UsageError(f"--trials: must be >= 1, got {self.trials}")
        if self.n_jobs is not None and self.n_jobs < 1:
            raise UsageError(f"--n-jobs: must be >= 1, got {self.n_jobs}")
        if self.timeout is not None and not self.timeout > 0:
            raise UsageError(f"--timeout: must be > 0 seconds, got {self.timeout}")
        check_study_name(self.study_name)


def check_study_name(name: str) -> str:
    """``name`` when it is a plain file name of letters, digits, '.', '_' and '-' (no leading dot,
    at most 200 characters); a UsageError otherwise, so that no study writes outside studies/."""
    if not STUDY_NAME.fullmatch(name):
        raise UsageError(f"--study-name {name!r}: use letters, digits, '.', '_' and '-' only, not starting with "
                         f"'.', at most 200 characters (the name names files under studies/)")
    return name


def plain_study_name(text: str) -> str:
    """``text`` made a valid study name: other characters become '_', leading dots go."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text).lstrip(".")[:200] or "study"


def default_tune_config(folder: Path = Path(".")) -> str:
    """``exp.yaml`` when ``folder`` holds one; otherwise a UsageError that names the experiment
    files (``*.yaml``, ``experiments/*.yaml``) with a top-level ``tune:`` section."""
    if (folder / "exp.yaml").is_file():
        return str(folder / "exp.yaml")
    candidates = sorted(folder.glob("*.yaml")) + sorted(folder.glob("experiments/*.yaml"))
    found = [str(p.relative_to(folder)) for p in candidates if _has_tune_section(p)]
    raise UsageError("no config given and no exp.yaml here; " + (
        f"experiment files with a tune: section: {', '.join(found)}" if found
        else "no *.yaml or experiments/*.yaml here has a tune: section"))


def _has_tune_section(path: Path) -> bool:
    try:
        return re.search(r"^tune:", path.read_text(errors="replace"), re.MULTILINE) is not None
    except OSError:
        return False


def storage_for(study_name: str, storage: str | None, studies_dir: Path = STUDIES_DIR, must_exist: bool = False):
    """``storage`` as Optuna takes it: a database URL (``sqlite:///...``, ``postgresql://...``) is
    used as is; a file path, or by default ``studies/<study>.journal``, becomes a journal file
    storage, which several processes can share safely (SQLite may answer 'database is locked').
    Returns (storage, label). A wrong argument (a folder, a path under a file, a file that is not
    a journal, an unknown URL scheme; with ``must_exist``, for commands that only read, a journal
    or SQLite file that is not there) is a UsageError; a database that cannot be opened a StorageError."""
    found = _check_storage(study_name, storage, studies_dir)
    url, path, _, label = found
    missing = path if path is not None else (Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None)
    if must_exist and missing is not None and not missing.is_file():
        raise UsageError(f"{label}: not found; name a study that `workbench tune` has run (--study), or give its "
                         f"--storage")
    return _open_storage(*found)


def _check_storage(study_name: str, storage: str | None, studies_dir: Path):
    """What ``storage`` names, checked without creating anything: (url, None, None, url) or (None,
    journal path, the journal read when the file exists else None, how messages name it)."""
    if storage and "://" in storage:
        _check_database_url(storage)
        return storage, None, None, _shown(storage)
    path = Path(storage) if storage else studies_dir / f"{check_study_name(study_name)}.journal"
    label = f"--storage {path}" if storage else str(path)
    if path.is_dir():
        raise UsageError(f"{label} is a folder; give a journal file or a database URL")
    blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise UsageError(f"{label}: {blocking} is a file, not a folder")
    return None, path, _read_journal(path, label) if path.exists() else None, label


def _open_storage(url: str | None, path: Path | None, journal, label: str,
                  heartbeat: tuple[int, int] | None = None):
    """The storage ``_check_storage`` found, its journal file (and folder) created when new. A
    database gets Optuna's heartbeat when ``heartbeat`` (interval, grace period in seconds) is given."""
    if url is not None:
        if heartbeat is None:
            return url, _shown(url)
        # Workers starting together on a new PostgreSQL database would race to create Optuna's
        # tables (a unique violation in the catalogue): one at a time, under an advisory lock.
        postgres = _backend(url) == "postgresql"
        schema_lock = _advisory_lock(url, "tables:optuna", heartbeat[1]) if postgres else contextlib.nullcontext
        try:
            with schema_lock(), warnings.catch_warnings():  # the heartbeat arguments are experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True,
                                                                         **_session_limits(url, heartbeat[1])},
                                                     heartbeat_interval=heartbeat[0], grace_period=heartbeat[1])
        except StorageError:
            raise
        except Exception as err:  # an unreachable server, a refused login, a database that does not exist
            raise StorageError(f"--storage: cannot open {_shown(url)}: {_first_line(err)}") from None
        return storage, _shown(url)
    if journal is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(os_error_message(err, f"--storage: cannot create the journal {path}")) from None
        journal = _read_journal(path, label)
    return journal, str(path)


def _read_journal(path: Path, label: str):
    """A JournalStorage over ``path`` (created empty when missing; an existing file is only read):
    a UsageError when the file is not an Optuna journal, a StorageError when it cannot be read."""
    from optuna.storages.journal import JournalFileBackend

    try:
        with open(path, "rb") as f:
            head = f.readline(1 << 16)
    except FileNotFoundError:  # a new journal: JournalFileBackend creates the file
        head = b""
    except OSError as err:
        raise StorageError(os_error_message(err, f"{label}: cannot open the journal")) from None
    reason = _not_a_journal(head)
    if reason:
        raise UsageError(f"{label}: not an Optuna journal file ({reason})")
    try:
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    except OSError as err:
        raise StorageError(os_error_message(err, f"{label}: cannot read the journal")) from None
    except Exception as err:  # what Optuna met replaying it: undecodable or unknown entries
        raise UsageError(f"{label}: not an Optuna journal file ({type(err).__name__}: {_first_line(err)})") \
            from None


JOURNAL_HEAD = b'{"op_code":'  # how Optuna writes every journal entry


def _not_a_journal(head: bytes) -> str | None:
    """Why a file whose first line is ``head`` is not an Optuna journal; None when it may be one
    (empty, or a first entry still being written by another worker)."""
    if not head.endswith(b"\n"):  # the whole file, no line yet: empty or being written
        return None if JOURNAL_HEAD.startswith(head) or head.startswith(JOURNAL_HEAD) else \
            "it holds no journal entry"
    try:
        entry = json.loads(head.decode("utf-8"))
    except UnicodeDecodeError:
        return "it is not text"
    except ValueError:
        return "its first line is not JSON"
    return None if isinstance(entry, dict) and "op_code" in entry else "its first line is not a journal entry"


def _shown(url: str) -> str:
    """A database URL as messages, tags and logs show it: without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: nothing to hide
        return url


def _backend(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).get_backend_name()


def _check_database_url(url: str) -> None:
    """A database URL SQLAlchemy knows, whose driver is installed (a StorageError otherwise; an
    unknown scheme is a UsageError), and for SQLite whose folder exists: checked before the
    tracking store or any file is touched."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        scheme = url.split("://", 1)[0]
        hint = "; PostgreSQL's scheme is postgresql://" if scheme == "postgres" else ""
        raise UsageError(f"--storage {_shown(url)}: unknown scheme {scheme}://{hint}; give a journal file or a "
                         f"database URL (sqlite:///study.db, postgresql://..., mysql://...)") from None
    try:
        (getattr(dialect, "import_dbapi", None) or dialect.dbapi)()
    except ImportError as err:
        raise StorageError(f"--storage: cannot open {_shown(url)}: its driver is not installed ({err})") from None
    database = parsed.database or ""
    if parsed.get_backend_name() == "sqlite" and database and database != ":memory:" \
            and not database.startswith("file:") and not Path(database).parent.is_dir():
        raise StorageError(f"--storage: cannot open {url}: the folder {Path(database).parent} does not exist")


def _session_limits(url: str, grace_period: float) -> dict:
    """SQLAlchemy engine arguments for a worker's PostgreSQL sessions: the server ends a session
    that sits inside a transaction for longer than the grace period (a worker paused by SIGSTOP
    or a suspended machine in the middle of a claim or a write), so that its locks (the claim
    lock, row locks) do not block the other workers for longer than a dead worker's trial would."""
    if _backend(url) != "postgresql":
        return {}
    return {"connect_args": {"options": f"-c idle_in_transaction_session_timeout={int(grace_period * 1000)}"}}


def _advisory_lock(url: str, name: str, grace_period: float) -> Callable:
    """Claims across machines: a PostgreSQL advisory lock keyed by ``name`` (``claim:<study>``),
    held while a worker claims a trial and released on unlock or when its connection (its worker)
    goes away, or stays idle in its transaction for longer than ``grace_period`` seconds (a
    paused worker)."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool, **_session_limits(url, grace_period))
    key = int.from_bytes(hashlib.blake2b(f"workbench.tune/{name}".encode(), digest_size=8).digest(), "big",
                         signed=True)

    @contextlib.contextmanager
    def lock():
        try:
            connection = engine.connect()
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
        except sqlalchemy.exc.SQLAlchemyError as err:
            raise StorageError(f"--storage: cannot open {_shown(url)}: {_first_line(err)}") from None
        try:
            yield
        finally:
            try:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
            except sqlalchemy.exc.SQLAlchemyError:
                pass  # the server ended the session (paused past the grace period): the lock went with it
            finally:
                connection.close()

    return lock


def _heartbeat_enabled(storage) -> bool:
    """Whether ``storage`` (a study's, possibly Optuna's cache over an RDBStorage) keeps heartbeats.
    Optuna's ask/tell interface has no public heartbeat calls; these are the ones its own
    ``optimize`` loop uses."""
    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    return isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage)


def _trials_with_heartbeat(storage, trial_ids: list[int]) -> set[int]:
    """Which of ``trial_ids`` have a heartbeat row in the study's database (Optuna's own table)."""
    import sqlalchemy
    from optuna.storages._rdb.models import TrialHeartbeatModel

    backend = getattr(storage, "_backend", storage)  # Optuna's cache wraps the RDBStorage
    with backend.engine.connect() as connection:
        rows = connection.execute(sqlalchemy.select(TrialHeartbeatModel.trial_id)
                                  .where(TrialHeartbeatModel.trial_id.in_(trial_ids)))
        return {row[0] for row in rows}


class _TrialHeartbeat:
    """Records a running trial's heartbeat in its database every heartbeat interval, from a daemon
    thread, until ``stop``; nothing for a storage without heartbeats (a journal file)."""

    def __init__(self, storage, trial_id: int):
        self._stopped = threading.Event()
        self._thread = None
        if _heartbeat_enabled(storage):
            storage.record_heartbeat(trial_id)
            self._thread = threading.Thread(target=self._beat, args=(storage, trial_id,
                                                                     storage.get_heartbeat_interval()),
                                            daemon=True, name=f"heartbeat-trial-{trial_id}")
            self._thread.start()

    def _beat(self, storage, trial_id: int, seconds: float) -> None:
        while not self._stopped.wait(seconds):
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a database hiccup: the next beat tries again; the grace period covers it
                pass

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()


def trial_devices(device: str, n_jobs: int) -> list[str | None]:
    """The device each of ``n_jobs`` parallel workers pins its trials to. With several GPUs
    visible and ``device`` auto or cuda, worker i runs its trials on cuda:(i mod GPUs): one trial
    per GPU at a time, or several on each when ``n_jobs`` is larger (a small model). Otherwise
    None: every trial on the config's device."""
    if device in ("auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        count = torch.cuda.device_count()
        return [f"cuda:{i % count}" for i in range(n_jobs)]
    return [None] * n_jobs


@contextlib.contextmanager
def _threads_per_worker(n_jobs: int, log: Callable[[str], None]):
    """Each of ``n_jobs`` parallel trials gets its share of torch's CPU threads, then the count is
    restored. Small models scale poorly over threads: on 2 cores two one-thread trials finish
    about 1.6x the epochs per second of one two-thread trial (BENCHMARKS.md, "The 50-trial study")."""
    before = torch.get_num_threads()
    share = max(1, before // n_jobs)
    if share != before:
        torch.set_num_threads(share)
        log(f"{n_jobs} trials at a time: {share} CPU thread(s) each, of {before}")
    try:
        yield share if share != before else None
    finally:
        torch.set_num_threads(before)


def build_sampler(name: str, seed: int):
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    # constant_liar: trials still running count as poor ones while TPE samples, so parallel workers
    # (threads, processes, machines) do not propose the same region; one worker samples as before.
    return ReachAwareTPESampler(seed=seed, constant_liar=True)


class ReachAwareTPESampler(optuna.samplers.TPESampler):
    """Optuna's TPE, which learns from a trial stopped out of reach of the best as from a complete
    trial at its objective's value when stopped (user attr ``STOPPED_VALUE``). TPE learns from its
    good group, the best tenth of the trials, filled with complete trials first: PRUNED alone would
    rank such a trial after every complete one, though it may well be among the best tenth. The
    trial stays PRUNED in the study; only what the sampler reads changes (``StudyAsLearned``)."""

    def sample_relative(self, study, trial, search_space):
        return super().sample_relative(StudyAsLearned(study), trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return super().sample_independent(StudyAsLearned(study), trial, param_name, param_distribution)


class StudyAsLearned:
    """``study`` as its sampler reads it: every trial stopped out of reach (PRUNED, with
    ``STOPPED_VALUE``) shown COMPLETE at that value; everything else is the study's own."""

    def __init__(self, study: optuna.Study):
        self._study = study

    def __getattr__(self, name):
        return getattr(self._study, name)

    def get_trials(self, deepcopy: bool = True, states=None) -> list[optuna.trial.FrozenTrial]:
        return self._shown(lambda asked: self._study.get_trials(deepcopy=deepcopy, states=asked), states)

    def _get_trials(self, deepcopy: bool = True, states=None, use_cache: bool = False) -> list:
        return self._shown(lambda asked: self._study._get_trials(deepcopy=deepcopy, states=asked,
                                                                 use_cache=use_cache), states)

    @staticmethod
    def _shown(fetch, states) -> list[optuna.trial.FrozenTrial]:
        pruned, complete = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE
        wanted = None if states is None else tuple(states)
        asked = wanted if wanted is None or complete not in wanted or pruned in wanted else (*wanted, pruned)
        shown = []
        for trial in fetch(asked):
            if trial.state == pruned and math.isfinite(trial.user_attrs.get(STOPPED_VALUE, math.nan)):
                trial = copy.copy(trial)  # the storage's own object stays as it is
                trial.state, trial.value = complete, float(trial.user_attrs[STOPPED_VALUE])
            if wanted is None or trial.state in wanted:
                shown.append(trial)
        return shown


def first_judged_epoch(name: str, epochs: int) -> int:
    """The first epoch a pruner judges: the first quarter of the image stage is never pruned
    (early mAP says little about the final one); 1 without a pruner."""
    return 1 if name == "none" else max(1, epochs // 4)


OUT_OF_REACH = "out_of_reach"  # user attr of a trial stopped because it could no longer become the best: why
STOPPED_VALUE = "value_when_stopped"  # user attr of such a trial: its objective's value then (what TPE learns)


class ReachPruner(optuna.pruners.BasePruner):
    """``base`` (Optuna's median pruner, unchanged), plus a stop for a trial that can no longer
    become the study's best.

    Out of reach: from ``n_warmup_steps`` on, once ``n_startup_trials`` complete trials reported
    values both up to the step and after it, a trial whose best value so far, improved by twice the
    largest gain any of them made after the step (its best value at the end against its best up
    to the step), still falls short of the study's best. A trial's objective is never above its
    best reported value (best_* reads one of them, final_* the last), so the bound holds for every
    objective. The margin is the study's own: early on complete trials gained tens of points after
    the step and nothing is stopped; near the end of a cosine schedule they gain a point or two,
    and a trial far behind the best stops there instead of training its last epochs. Twice,
    because the largest of a handful of trials' gains underestimates what the next may gain. Steps
    after which no complete trial reported anything (the last epoch) are never judged: nothing is
    left to save there. Such a trial is PRUNED with its reason in the user attr ``OUT_OF_REACH``
    (set by the objective); like every pruned trial it is not in the median's population, which
    stays Optuna's (complete trials). ``reason`` says why a trial would stop."""

    MARGIN = 2.0  # times the largest gain after the step seen in a complete trial

    def __init__(self, base: optuna.pruners.BasePruner, n_startup_trials: int = 5, n_warmup_steps: int = 0):
        self.base, self.n_startup_trials, self.n_warmup_steps = base, n_startup_trials, n_warmup_steps
        self._reasons: dict[int, str] = {}  # trial number -> why prune() said yes (read by the objective)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        reason = self.reason(study, trial)
        if reason is not None and trial.state == optuna.trial.TrialState.RUNNING:
            self._reasons[trial.number] = reason
        return reason is not None

    def pop_reason(self, number: int) -> str | None:
        """Why the last ``prune`` stopped trial ``number`` (once)."""
        return self._reasons.pop(number, None)

    def reason(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str | None:
        """Why ``trial`` should stop now ("median" or "out of reach: ..."), else None."""
        if self.base.prune(study, trial):
            return "median"
        step = trial.last_step
        if step is None or step < self.n_warmup_steps:
            return None
        complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
        sign = 1.0 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1.0
        # Complete trials that reported up to the step and after it: what they gained afterwards
        gains = [sign * (_best_intermediate(t, sign) - _best_intermediate(t, sign, upto=step)) for t in complete
                 if any(s > step for s in t.intermediate_values)]
        gains = [g for g in gains if not math.isnan(g)]
        best_so_far = _best_intermediate(trial, sign)
        if len(gains) < self.n_startup_trials or math.isnan(best_so_far):
            return None
        best = max((t.value for t in complete), key=lambda v: sign * v)
        reach = best_so_far + sign * self.MARGIN * max(gains)
        if sign * reach < sign * best:
            return (f"out of reach: best so far {best_so_far:.2f} {'+' if sign > 0 else '-'} {self.MARGIN:g} x the "
                    f"largest gain of a complete trial after step {step} ({max(gains):.2f}) = {reach:.2f}, behind the "
                    f"study's best {best:.2f}")
        return None


def value_so_far(metric: str, validations: list[dict], select_metric: str) -> float:
    """The objective ``metric`` of a run stopped after ``validations`` (each epoch's validation
    metrics, in order), as the run would have given it then: ``final_*`` the last epoch's value,
    ``best_*`` the value at the first epoch with the highest ``select_metric`` (the BEST epoch,
    ``stages.Selection``'s rule: a NaN never improves); NaN when no epoch was selected."""
    key = TUNE_METRICS[metric]
    if metric.startswith("final_"):
        return float(validations[-1][key])
    best = None
    for row in validations:
        if row[select_metric] > (best[select_metric] if best is not None else -1.0):
            best = row
    return float(best[key]) if best is not None else math.nan


def _best_intermediate(trial: optuna.trial.FrozenTrial, sign: float, upto: int | None = None) -> float:
    """The trial's best reported value (up to step ``upto``); NaN when there is none."""
    values = [v for s, v in trial.intermediate_values.items() if (upto is None or s <= upto) and not math.isnan(v)]
    return sign * max(sign * v for v in values) if values else math.nan


def build_pruner(name: str, epochs: int, stop_out_of_reach: bool = True):
    """Pruners judge the per-epoch validation metric from ``first_judged_epoch`` on. The median
    pruner also stops trials out of reach of the best (``ReachPruner``) unless told not to."""
    if name == "none":
        return optuna.pruners.NopPruner()
    start = first_judged_epoch(name, epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=start, max_resource=max(1, epochs))
    median = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=start)
    return ReachPruner(median, n_startup_trials=5, n_warmup_steps=start) if stop_out_of_reach else median


def suggest_overrides(trial: optuna.trial.BaseTrial, space: dict) -> dict:
    """Sample one value per searched key: {config key: value}."""
    values = {}
    for name, spec in space.items():
        kind = spec["type"]
        if kind == "categorical":
            values[name] = trial.suggest_categorical(name, spec["choices"])
        elif kind == "int":
            values[name] = trial.suggest_int(name, int(spec["low"]), int(spec["high"]), step=spec.get("step") or 1,
                                             log=bool(spec.get("log")))
        else:
            values[name] = trial.suggest_float(name, float(spec["low"]), float(spec["high"]), step=spec.get("step"),
                                               log=bool(spec.get("log")))
    return values


def rerun_command(config_path: str | None, base_overrides: list[str], values: dict, threads: int | None = None) -> str:
    """The ``workbench run`` command that reproduces one trial alone; ``threads``: the CPU threads
    the trial had when it ran beside others (another count changes the floating-point sums)."""
    args = (["env", f"OMP_NUM_THREADS={threads}"] if threads else []) + ["workbench", "run", config_path or "CONFIG"]
    args += [a for o in base_overrides for a in ("--set", o)]
    for key, value in values.items():
        args += ["--set", f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"]
    return " ".join(shlex.quote(a) for a in args)


def _replaced(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial that failed because its worker went away or met a fault of the environment: it does
    not count toward ``trials``."""
    if trial.state != optuna.trial.TrialState.FAIL:
        return False
    reason = str(trial.user_attrs.get("fail_reason", ""))
    return reason == INTERRUPTED or reason.startswith((WORKER_ENDED, FAULT))


def _is_fault(err: BaseException) -> bool:
    """A fault of the environment (store, disk, storage), which every later trial would meet too."""
    return isinstance(err, FAULTS) or (isinstance(err, OSError) and err.errno in DISK_FULL) \
        or _storage_down(err)


def _storage_down(err: BaseException) -> bool:
    """The study's database stopped answering (Optuna's storage error, SQLAlchemy's connection error)."""
    import sqlalchemy

    return isinstance(err, (optuna.exceptions.StorageInternalError, sqlalchemy.exc.OperationalError))


def _fail_reason(err: BaseException) -> str:
    """Why a trial failed, as its ``fail_reason``: 'interrupted', 'fault: <error>' (both replaced)
    or '<error>' (counted)."""
    if isinstance(err, KeyboardInterrupt):
        return INTERRUPTED
    message = str(err).strip()
    reason = f"{type(err).__name__}: {message.splitlines()[-1] if message else ''}"
    return FAULT + reason if _is_fault(err) else reason


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _tag_outcome(client, run_id: str, state: str, reason: str | None = None) -> None:
    """The trial's Optuna state (and why it failed) as tags on its MLflow run."""
    client.set_tag(run_id, "state", state)
    if reason:
        client.set_tag(run_id, "fail_reason", reason[:5000])


def _bookkeeping(what: str, call: Callable, *args) -> None:
    """``call(*args)``, a write to the tracking store that the trial's outcome does not depend on:
    when it fails, one warning line and the outcome stands (nor is another error masked)."""
    try:
        call(*args)
    except Exception as err:
        print(f"warning: cannot {what} in MLflow ({_first_line(err)}); the trial's outcome stands", file=sys.stderr)


class _TrialTracker(MlflowTracker):
    """Writes the MLflow run's id on the Optuna trial as soon as the run exists, so that the run
    of a worker killed mid-trial can be found and ended by the next worker (``_fail_dead_workers``).
    ``check`` is called after every logged step: it raises KeyboardInterrupt in this worker thread
    when the study was interrupted (the signal reaches the main thread only)."""

    def __init__(self, tracking_uri: str, trial: optuna.trial.Trial, check: Callable[[], None] = lambda: None):
        super().__init__(tracking_uri)
        self.trial = trial
        self.check = check

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        super().log_metrics(metrics, step)
        self.check()

    @contextlib.contextmanager
    def start_run(self, *args, **kwargs):
        with super().start_run(*args, **kwargs) as run_id:
            self.trial.set_user_attr(RUN_ATTR, run_id)
            yield run_id


def _in_space(value, spec) -> bool:
    if spec["type"] == "categorical":
        return value in spec["choices"]
    return spec["low"] <= value <= spec["high"]


class Study:
    """One ``workbench tune`` invocation: study, MLflow parent run, objective, summary."""

    def __init__(self, cfg: Config, options: TuneOptions, config_path: str | None = None,
                 base_overrides: list[str] | None = None, log: Callable[[str], None] = print,
                 studies_dir: Path = STUDIES_DIR):
        self.cfg, self.options, self.log = cfg, options, log
        self.config_path, self.base_overrides = config_path, list(base_overrides or [])
        self.tune = cfg.tune
        self.metric = self.tune.metric
        self.pruner_name = options.pruner or self.tune.pruner
        reach = self.pruner_name == "median" and self.tune.stop_out_of_reach
        self.pruner_label = self.pruner_name + (" + out of reach" if reach else "")
        self.sampler_name = options.sampler or self.tune.sampler
        self.keep = options.keep_checkpoints or self.tune.keep_checkpoints
        self.n_jobs = options.n_jobs or self.tune.n_jobs
        self.trial_threads: int | None = None  # CPU threads of each trial when they run side by side
        self.tracking_uri = options.tracking_uri
        # Wrong arguments first, then a database server (nothing is created here if it cannot be
        # reached), then the tracking store, then the files here: what is refused leaves no study
        # file behind.
        url, journal_path, journal, label = _check_storage(options.study_name, options.storage, studies_dir)
        self.grace_period = self.tune.grace_period or 4 * self.tune.heartbeat_interval
        heartbeat = (self.tune.heartbeat_interval, self.grace_period)
        remote = url is not None and _backend(url) != "sqlite"
        if remote:
            self.storage, self.storage_label = _open_storage(url, None, None, label, heartbeat)
        self.tracker = MlflowTracker(self.tracking_uri)  # probes the store: TrackingError, TrackingUriError
        if not remote:
            self.storage, self.storage_label = _open_storage(url, journal_path, journal, label, heartbeat)
        # Across machines trials are claimed under a lock in the database itself (PostgreSQL); a
        # journal file, and SQLite, live on one machine, where a file lock does.
        self._db_lock = (_advisory_lock(url, f"claim:{options.study_name}", self.grace_period)
                         if url and _backend(url) == "postgresql" else None)
        self.feature_cache = FeatureCache(studies_dir / f"{options.study_name}_features")
        self.prompt_cache = PromptStageCache() if options.share_prompt_stages else None
        # No new trial starts once set; with _interrupt, running trials end too (``stop``).
        self.stopping = threading.Event()
        self._interrupt: type[BaseException] | None = None
        self.worker_id = f"{machine_id()}:{os.getpid()}"  # host/PID namespace:pid
        try:
            self.study = optuna.create_study(
                study_name=options.study_name, storage=self.storage, load_if_exists=True,
                direction=self.tune.direction,
                pruner=build_pruner(self.pruner_name, cfg.epochs_image, self.tune.stop_out_of_reach))
        except Exception as err:  # a wrong URL, a missing driver, an unreachable server; a broken journal
            if journal_path is not None and not isinstance(err, OSError):
                raise UsageError(f"{label}: not an Optuna journal file "
                                 f"({type(err).__name__}: {_first_line(err)})") from None
            raise StorageError(f"--storage: cannot open {self.storage_label}: {_first_line(err)}") from None
        studies_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.studies_dir = studies_dir
        self.lock_path = studies_dir / f"{options.study_name}.lock"
        with self._claim_lock():  # workers starting together agree on one parent run and one baseline
            self.parent_run_id = self._parent_run()
            try:
                self._fail_dead_workers()
                # The k-th process to open the study samples with seed + k: a fresh study is
                # reproducible, a resumed one does not repeat the killed trials' parameters, and two
                # workers do not propose the same ones.
                session = self.study.user_attrs.get(SESSIONS_ATTR, 0)
                self.study.set_user_attr(SESSIONS_ATTR, session + 1)
                self.study.sampler = build_sampler(self.sampler_name, (cfg.seed + session) % 2**32)
                self._enqueue_defaults()
            except BaseException as err:
                self._end_parent(err)
                raise

    # ------------------------------------------------------------------ MLflow parent run
    def _parent_run(self) -> str:
        tracker = self.tracker
        existing = self.study.user_attrs.get(PARENT_ATTR)
        if existing:
            try:
                tracker.client.update_run(existing, status="RUNNING")
            except Exception as err:  # mostly: the study was started with another --tracking-uri
                raise TrackingError(f"study {self.options.study_name}: cannot reopen its MLflow parent run {existing} "
                                    f"in {self.tracking_uri}: {_first_line(err)}") from None
            return existing
        tags = {"study_name": self.options.study_name, "storage": self.storage_label, "sampler": self.sampler_name,
                "pruner": self.pruner_label, "tune_metric": self.metric, "direction": self.tune.direction,
                "workbench.role": "study"}
        run_id = tracker.client.create_run(tracker.experiment_id(self.cfg.experiment),
                                           run_name=f"study_{self.options.study_name}", tags=tags).info.run_id
        self.study.set_user_attr(PARENT_ATTR, run_id)
        # Several workers may start at once: the first id written to the study wins.
        winner = optuna.load_study(study_name=self.options.study_name, storage=self.storage).user_attrs[PARENT_ATTR]
        if winner != run_id:
            tracker.client.delete_run(run_id)
            return winner
        tracker.log_params_to(run_id, {f"space.{k}": json.dumps(v) for k, v in self.tune.space.items()}
                              | {"metric": self.metric, "direction": self.tune.direction})
        return run_id

    def _end_parent(self, err: BaseException) -> None:
        """The parent run ended KILLED (``err`` a KeyboardInterrupt) or FAILED, unless trials of
        another worker process are still running (the last worker ends it); a store that fails
        here gets a warning, not the place of ``err``."""
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        try:
            if any(t.user_attrs.get("worker") != self.worker_id
                   for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))):
                return
        except Exception:  # the storage failed: end the run all the same
            pass
        try:
            self.tracker.client.set_terminated(self.parent_run_id, status)
        except Exception as end_err:
            print(f"warning: cannot mark the study's MLflow run {self.parent_run_id} {status} "
                  f"({_first_line(end_err)})", file=sys.stderr)

    def stop(self, interrupt: type[BaseException] | None = KeyboardInterrupt) -> None:
        """No new trial starts; with ``interrupt`` (a KeyboardInterrupt class), the running trials
        raise it in their worker thread at their next logged step or validation, and end FAIL
        'interrupted' with their MLflow runs KILLED."""
        if interrupt is not None:
            self._interrupt = interrupt
        self.stopping.set()

    def check_interrupt(self) -> None:
        """Raise the interrupt ``stop`` was given, if any (called from the trials' threads)."""
        if self._interrupt is not None:
            raise self._interrupt()

    def _enqueue_defaults(self) -> None:
        """A new study first tries the config as written, so its best is never worse than that
        (again when the first try's worker was killed)."""
        trials = self.study.get_trials(deepcopy=False)
        baselines = [t for t in trials if t.user_attrs.get("baseline")]
        if trials and not (baselines and all(_replaced(t) for t in baselines)):
            return
        values = {k: getattr(self.cfg, k) for k in self.tune.space}
        if all(_in_space(v, self.tune.space[k]) for k, v in values.items()):
            self.study.enqueue_trial(values, user_attrs={"baseline": True})

    # ------------------------------------------------------------------ objective
    def objective(self, trial: optuna.trial.Trial, device: str | None = None) -> float:
        """One trial: a complete run with the sampled values (on ``device`` when given)."""
        values = suggest_overrides(trial, self.tune.space)
        pinned = {"device": device} if device else {}
        if self.n_jobs > 1 and self.cfg.num_workers == "auto":
            pinned["num_workers"] = workers_side_by_side(self.cfg, self.n_jobs, device)
        # Validations before the pruner's first judged epoch would only draw curve points (val_start)
        schedule = {} if self.cfg.val_start is not None or "val_start" in values else {
            "val_start": first_judged_epoch(self.pruner_name, self.cfg.epochs_image)}  # the pruner's, as built
        try:
            cfg = config_module.replace(self.cfg, **values, **schedule, **pinned,
                                        output_dir=str(self.trial_dir(trial.number)))
        except ConfigError as err:  # a sampled combination the config rejects
            trial.set_user_attr("fail_reason", str(err))
            raise
        trial.set_user_attr("seed", cfg.seed)
        trial.set_user_attr("rerun", rerun_command(self.config_path, self.base_overrides, values | schedule,
                                                   self.trial_threads))
        report_key = TUNE_METRICS[self.metric]
        validations: list[dict] = []

        def report(epoch: int, metrics: dict) -> None:
            self.check_interrupt()
            validations.append(metrics)
            try:
                trial.report(metrics[report_key], epoch)
            except optuna.exceptions.UpdateFinishedTrialError:
                raise TrialTakenOver(f"trial {trial.number} was failed meanwhile by another worker, which found "
                                     f"no heartbeat from this one for {self.grace_period} s") from None
            if trial.should_prune():
                why = self.study.pruner.pop_reason(trial.number) if isinstance(self.study.pruner, ReachPruner) else None
                if why and why.startswith("out of reach"):
                    trial.set_user_attr(OUT_OF_REACH, why)
                    value = value_so_far(self.metric, validations, cfg.select_metric)
                    if math.isfinite(value):  # else TPE sees it PRUNED, as Optuna would
                        trial.set_user_attr(STOPPED_VALUE, value)
                raise TrialPruned(f"pruned after epoch {epoch} at {report_key} {metrics[report_key]:.2f}"
                                  + (f" ({why})" if why else ""))

        stem = build_filename(cfg, cfg.epochs_image, "image")
        tracker = _TrialTracker(self.tracking_uri, trial, self.check_interrupt)
        tags = {"study_name": self.options.study_name, "trial_number": trial.number, "workbench.role": "trial"}
        try:
            result = train_joint(cfg, tracker, report, run_name=f"{stem}_trial{trial.number}",
                                 parent_run_id=self.parent_run_id, extra_tags=tags,
                                 feature_cache=self.feature_cache, prompt_cache=self.prompt_cache,
                                 keep_checkpoints=self.keep == "all",
                                 quiet=self.n_jobs > 1)  # side by side: one line per trial
            value = result[self.metric]
            if value is None or not math.isfinite(value):
                raise ValueError(f"the run produced no finite {self.metric}")
        except TrialPruned as stop:
            _bookkeeping(f"tag trial {trial.number} PRUNED", _tag_outcome, tracker.client, tracker.last_run_id,
                         "PRUNED")
            raise optuna.TrialPruned(str(stop)) from None
        except TrialTakenOver:
            raise
        except (Exception, KeyboardInterrupt) as err:
            reason = _fail_reason(err)
            trial.set_user_attr("fail_reason", reason)
            if tracker.last_run_id:
                _bookkeeping(f"tag trial {trial.number} FAIL", _tag_outcome, tracker.client, tracker.last_run_id,
                             "FAIL", reason)
            raise
        trial.set_user_attr("run_dir", result["run_dir"])
        _bookkeeping(f"tag trial {trial.number} COMPLETE", _tag_outcome, tracker.client, result["run_id"],
                     "COMPLETE")
        _bookkeeping(f"tag trial {trial.number}'s objective", tracker.client.set_tag, result["run_id"],
                     "objective", value)
        return value

    def trial_dir(self, number: int) -> Path:
        """Where a trial's run folder goes: its checkpoints can be found (and removed) by number."""
        return Path(self.cfg.output_dir) / f"{self.options.study_name}_trial{number}"

    def _remove_surplus_checkpoints(self) -> None:
        """Checkpoints on disk are kept for the best trial so far only (``keep_checkpoints`` best or
        none; all keeps every trial's): a finished trial that is not the best never will be."""
        if self.keep == "all":
            return
        try:
            best = self.study.best_trial.number if self.keep == "best" else None
        except ValueError:
            best = None
        for trial in self.study.get_trials(deepcopy=False, states=self.FINISHED):
            if trial.number != best:
                for path in self.trial_dir(trial.number).glob("*/*.pth"):
                    path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ running
    WATCH_SECONDS = 2.0  # how often a worker with nothing left to claim looks at the others' trials
    FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)

    def counts(self) -> dict[str, int]:
        """Trials by outcome: complete, pruned and failed count toward ``trials``; replaced (failed
        because their worker went away) do not; running are claimed."""
        counts = dict.fromkeys(("complete", "pruned", "failed", "replaced", "running"), 0)
        for trial in self.study.get_trials(deepcopy=False):
            key = "replaced" if _replaced(trial) else {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed",
                                                       "RUNNING": "running"}.get(trial.state.name)
            if key:
                counts[key] += 1
        return counts

    def remaining(self) -> int:
        """Counted trials still missing."""
        counts = self.counts()
        return max(0, self.options.trials - counts["complete"] - counts["pruned"] - counts["failed"])

    def _claimed(self) -> int:
        counts = self.counts()
        return counts["complete"] + counts["pruned"] + counts["failed"] + counts["running"]

    def tally(self) -> str:
        """'3/10 trials: 2 complete, 0 pruned, 1 failed; 1 replaced'."""
        c = self.counts()
        return (f"{c['complete'] + c['pruned'] + c['failed']}/{self.options.trials} trials: {c['complete']} complete, "
                f"{c['pruned']} pruned, {c['failed']} failed; {c['replaced']} replaced")

    def failure(self) -> str | None:
        """Why the study failed when every counted trial failed (and at least one did); else None."""
        counts = self.counts()
        if not counts["failed"] or counts["complete"] or counts["pruned"]:
            return None
        first = min((t for t in self.study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.FAIL
                     and not _replaced(t)), key=lambda t: t.number)
        return (f"all {counts['failed']} trials failed; the first reason (trial {first.number}): "
                f"{first.user_attrs.get('fail_reason', 'unknown')}")

    @contextlib.contextmanager
    def _claim_lock(self):
        """Threads of this process and processes on this machine (on every machine, with a
        PostgreSQL storage) take turns to claim a trial, so the study never runs more than
        ``trials`` of them."""
        with self._lock:
            if self._db_lock is not None:
                with self._db_lock():
                    yield
                return
            with open(self.lock_path, "a+") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def _watched_elsewhere(self) -> bool:
        """Whether another worker runs a trial whose death this worker would notice (its process on
        this machine, or a heartbeat in the database): one that may still need replacing."""
        heartbeats = _heartbeat_enabled(self.study._storage)
        for trial in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            worker = str(trial.user_attrs.get("worker", ""))
            if worker != self.worker_id and (heartbeats or on_this_machine(worker.rpartition(":")[0])):
                return True
        return False

    def _fail_dead_workers(self) -> None:
        """Trials left RUNNING by a dead worker are marked FAIL, and their MLflow runs KILLED, so
        that they are replaced (or retried, ``retry_failed``): a process of this machine that no
        longer exists, or, with a database storage, a worker anywhere whose trial has had no
        heartbeat for ``grace_period`` seconds (call under the claim lock)."""
        storage = self.study._storage  # Optuna has no public call to fail a foreign trial
        running = self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        stale, silent = set(), set()
        if _heartbeat_enabled(storage) and running:
            stale = set(storage._get_stale_trial_ids(self.study._study_id))
            # A worker killed between claiming a trial and its first heartbeat (or a workbench
            # before heartbeats) leaves a trial that Optuna never calls stale: judged by its age.
            started = datetime.datetime.now() - datetime.timedelta(seconds=self.grace_period)
            silent = {t._trial_id for t in running if t.datetime_start and t.datetime_start < started} \
                - _trials_with_heartbeat(storage, [t._trial_id for t in running])
        for trial in running:
            worker = str(trial.user_attrs.get("worker", ""))
            worker_host, _, pid = worker.rpartition(":")
            if on_this_machine(worker_host) and pid.isdigit() and not process_alive(int(pid)):
                reason, why = WORKER_ENDED, f"pid {pid}"
            elif trial._trial_id in stale | silent:
                why = f"no heartbeat for {self.grace_period} s from {worker or 'its worker'}"
                reason = f"{WORKER_ENDED} ({why})"
            else:
                continue
            try:
                storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
                storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:  # its worker, or another, finished it meanwhile
                continue
            run_id = trial.user_attrs.get(RUN_ATTR)
            if run_id:
                _bookkeeping(f"mark the run {run_id} of trial {trial.number} KILLED", self._kill_run, run_id,
                             f"{WORKER_ENDED} ({why})")
            retries = int(trial.user_attrs.get("retries", 0))
            if retries < self.tune.retry_failed:
                attrs = {"retry_of": trial.number, "retries": retries + 1} | (
                    {"baseline": True} if trial.user_attrs.get("baseline") else {})
                self.study.enqueue_trial(trial.params, user_attrs=attrs)
                then = f"it will be retried with the same values (retry {retries + 1} of {self.tune.retry_failed})"
            else:
                then = "it will be replaced"
            self.log(f"trial {trial.number:3d} FAIL     {WORKER_ENDED} ({why}); {then}")

    def _kill_run(self, run_id: str, reason: str) -> None:
        client = MlflowTracker(self.tracking_uri).client
        _tag_outcome(client, run_id, "FAIL", reason)
        client.set_terminated(run_id, "KILLED")

    def _worker(self, deadline: float | None, device: str | None = None) -> None:
        """Claim and run trials until the study has enough, the deadline passes or ``stopping`` is
        set. Whatever ends a worker but the study being complete stops the other workers claiming."""
        waiting = False
        try:
            while not self.stopping.is_set() and (deadline is None or time.time() < deadline):
                trial = None
                with self._claim_lock():
                    if self.stopping.is_set():
                        return
                    self._fail_dead_workers()
                    if self._claimed() < self.options.trials:
                        trial = self.study.ask()
                        trial.set_user_attr("worker", self.worker_id)
                        heartbeat = _TrialHeartbeat(self.study._storage, trial._trial_id)
                    elif not self._watched_elsewhere():
                        return
                if trial is None:
                    # Every trial is claimed, but another worker's may still die and need replacing:
                    # wait for them, so that the study ends with exactly ``trials`` counted ones.
                    if not waiting:
                        waiting = True
                        self.log("every trial is claimed; waiting for the other workers' running trials")
                    self.stopping.wait(self.WATCH_SECONDS)
                    continue
                try:
                    value = self.objective(trial, device)
                    frozen = self.study.tell(trial, value)
                except optuna.TrialPruned:
                    frozen = self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                except TrialTakenOver as lost:
                    self.log(f"{lost}; this worker goes on")
                    continue
                except KeyboardInterrupt:
                    trial.set_user_attr("fail_reason", INTERRUPTED)
                    self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    raise
                except Exception as err:
                    if _is_fault(err):  # not the trial's fault: it is replaced, and the study stops here
                        self._fail_on_fault(trial, err)
                        if _storage_down(err):
                            raise StorageError(f"--storage: the study's database {self.storage_label} stopped "
                                               f"answering: {_first_line(err)}") from None
                        raise
                    # the study goes on; the reason is on the trial and its MLflow run
                    frozen = self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
                finally:
                    heartbeat.stop()
                self._progress(self.study, frozen)
                self._remove_surplus_checkpoints()
        except BaseException:
            self.stopping.set()
            raise

    def _fail_on_fault(self, trial: optuna.trial.Trial, err: BaseException) -> None:
        """The trial FAIL with a 'fault: ' reason (not counted), as far as the storage still takes it."""
        self.stopping.set()  # before anything that may block: the other workers claim no more trials
        try:
            trial.set_user_attr("fail_reason", _fail_reason(err))
            frozen = self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self._progress(self.study, frozen)
        except Exception:  # the storage itself may be the fault; the next worker fails the trial
            pass

    def _progress(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        try:
            best = f"{study.best_value:.2f} (trial {study.best_trial.number})"
        except ValueError:
            best = "none yet"
        value = "-" if trial.value is None else f"{trial.value:.2f}"
        params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        reason = trial.user_attrs.get("fail_reason") or trial.user_attrs.get(OUT_OF_REACH, "")
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds() \
            if trial.datetime_complete and trial.datetime_start else float("nan")
        if trial.state == optuna.trial.TrialState.PRUNED and trial.intermediate_values:
            epoch = max(trial.intermediate_values)
            what = f"at epoch {epoch}: {TUNE_METRICS[self.metric]} {trial.intermediate_values[epoch]:.2f}"
        else:
            what = f"{self.metric} {value}"
        self.log(f"trial {trial.number:3d} {trial.state.name:8s} {what}  {params}  {seconds:.0f}s  best {best}"
                 + (f"  ({reason})" if reason else "") + f"  [{self.tally()}]")

    def run(self) -> optuna.Study:
        """Run trials until the study holds ``trials`` counted ones (resuming an existing study
        runs only the missing ones), then write the summary to the parent run. Raises StudyFailed
        when every counted trial failed."""
        try:
            client = self.tracker.client
            stale = mark_stale_runs(client, [client.get_run(self.parent_run_id).info.experiment_id], "workbench tune")
            if stale:
                self.log(f"marked {len(stale)} stale RUNNING run(s) KILLED (their process ended without closing them)")
            self.log(f"study {self.options.study_name} ({self.storage_label}): {self.tally()}, {self.remaining()} to "
                     f"go, {self.n_jobs} at a time; pruner {self.pruner_label}, sampler {self.sampler_name}, "
                     f"{self.tune.direction} {self.metric}")
            deadline = time.time() + self.options.timeout if self.options.timeout else None
            if self.n_jobs == 1:
                self._worker(deadline)
            else:
                with (_threads_per_worker(self.n_jobs, self.log) as self.trial_threads,
                      ThreadPoolExecutor(self.n_jobs) as pool):
                    devices = trial_devices(self.cfg.device, self.n_jobs)
                    if devices[0] is not None:
                        self.log(f"trials pinned to GPUs: worker i runs on cuda:(i mod {torch.cuda.device_count()})")
                    futures = [pool.submit(self._worker, deadline, device) for device in devices]
                    try:
                        for future in futures:
                            future.result()
                    except BaseException as err:
                        # Before leaving the block, which waits for the workers: Ctrl-C or SIGTERM reach
                        # this thread only, so the running trials are interrupted from here; a worker's
                        # error lets them finish but starts no new one.
                        self.stop(type(err) if isinstance(err, KeyboardInterrupt) else None)
                        raise
            if self._claim_summary():
                try:
                    self.summarise()
                except BaseException:  # not written after all: the next worker or session writes it
                    _bookkeeping("release the summary", self.study.set_user_attr, SUMMARY_ATTR, None)
                    raise
            else:  # written by the worker that ended the study; the parent run only needs to be ended
                _bookkeeping("end the study's MLflow run", self.tracker.client.set_terminated, self.parent_run_id,
                             "FAILED" if self.failure() else "FINISHED")
        except BaseException as err:  # the parent run says so (KILLED, FAILED); re-running the command resumes
            if isinstance(err, KeyboardInterrupt):  # also when it came while waiting for the workers to finish
                self.stop(type(err))
            self._end_parent(err)
            raise
        failure = self.failure()
        if failure:
            raise StudyFailed(failure)
        return self.study

    def _claim_summary(self) -> bool:
        """Whether this worker writes the summary: the first to end the study at its current count
        does (workers that end together would write the same tags into the parent run at once)."""
        with self._claim_lock():
            counts = self.counts()
            done = counts["complete"] + counts["pruned"] + counts["failed"]
            if self.study.user_attrs.get(SUMMARY_ATTR) == done:
                return False
            self.study.set_user_attr(SUMMARY_ATTR, done)
            return True

    def summarise(self) -> None:
        """Best params and value, the trials table and Optuna's plots on the parent run; the best
        trial's checkpoints on its own run (``keep_checkpoints: best``)."""
        client, parent = self.tracker.client, self.parent_run_id
        frame = self.study.trials_dataframe()
        out = self.studies_dir / f"{self.options.study_name}_summary"
        out.mkdir(parents=True, exist_ok=True)
        frame.to_csv(out / f"{self.options.study_name}_trials.csv", index=False)
        client.log_artifact(parent, str(out / f"{self.options.study_name}_trials.csv"))
        complete = [t for t in self.study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if complete:
            best = self.study.best_trial
            step = len(self.study.trials)
            out_of_reach = sum(t.state == optuna.trial.TrialState.PRUNED and bool(t.user_attrs.get(OUT_OF_REACH))
                               for t in self.study.trials)  # a trial killed right after the attr is FAIL
            for key, value in {"best_value": best.value, "best_trial": best.number, "n_complete": len(complete),
                               "n_out_of_reach": out_of_reach, "n_trials": len(self.study.trials)}.items():
                client.log_metric(parent, key, float(value), step=step)
            # MLflow params cannot change once set and a resumed study may find a new best: tags
            for key, value in best.params.items():
                client.set_tag(parent, f"best.{key}", value)
            client.set_tag(parent, "best_trial", best.number)
            client.set_tag(parent, "best_rerun", best.user_attrs.get("rerun", ""))
            best_file = out / f"{self.options.study_name}_best.json"
            best_file.write_text(json.dumps({"trial": best.number, "value": best.value, "params": best.params,
                                             "rerun": best.user_attrs.get("rerun")}, indent=1))
            client.log_artifact(parent, str(best_file))
            if self.keep == "best" and best.user_attrs.get("run_dir"):
                logged = {a.path for a in client.list_artifacts(best.user_attrs[RUN_ATTR], "checkpoints")}
                for path in sorted(Path(best.user_attrs["run_dir"]).glob("*.pth")):
                    if f"checkpoints/{path.name}" not in logged:
                        client.log_artifact(best.user_attrs[RUN_ATTR], str(path), "checkpoints")
            for plot in _optuna_plots(self.study, out, self.options.study_name):
                client.log_artifact(parent, str(plot), "plots")
        if not self.counts()["running"]:  # otherwise a worker still at work ends the parent run
            client.set_terminated(parent, "FAILED" if self.failure() else "FINISHED")


def _optuna_plots(study: optuna.Study, folder: Path, name: str) -> list[Path]:
    """Optimization history, parameter importances, parallel coordinates and slice plots as PNG
    (those the trials so far allow: importances need two complete trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    plots = {"optimization_history": ovm.plot_optimization_history, "param_importances": ovm.plot_param_importances,
             "parallel_coordinate": ovm.plot_parallel_coordinate, "slice": ovm.plot_slice}
    written = []
    import warnings

    for key, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = plot(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as err:  # too few trials for this plot
            print(f"skipping the {key} plot: {err}", file=sys.stderr)
            continue
        figure = result.figure if hasattr(result, "figure") else result.flat[0].figure
        path = folder / f"{name}_{key}.png"
        figure.set_size_inches(9, 5.5)
        with warnings.catch_warnings():  # the parallel coordinates' colour bar: "not compatible with tight_layout"
            warnings.simplefilter("ignore")
            figure.tight_layout()
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written


def _ends(spec: dict) -> list:
    """The values a dimension can reach at its edges: each choice, or low and the highest value on
    its step grid."""
    if spec["type"] == "categorical":
        return list(spec["choices"])
    low, high, step = spec["low"], spec["high"], spec.get("step")
    if spec["type"] == "int":
        low, high, step = int(low), int(high), int(step or 1)
    top = high if step is None else low + math.floor((high - low) / step + 1e-9) * step
    return [low, top]


def check_space_ends(cfg: Config, space: dict, most: int = 256) -> None:
    """Each end of a searched range, and each choice, must be a value its key can take together
    with some ends of the other searched keys (the rest of the config as written): a space that
    reaches past what a key allows is one error before the study starts, not trials that fail one
    by one. Values inside a range are not checked; at most ``most`` combinations are tried."""
    names = list(space)
    for name in names:
        others = [[(other, value) for value in _ends(space[other])] for other in names if other != name]
        for value in _ends(space[name]):
            first = None
            for combination in itertools.islice(itertools.product(*others), most):
                try:
                    config_module.replace(cfg, **dict(combination), **{name: value})
                    break
                except ConfigError as err:
                    first = first or err
            else:
                raise ConfigError(f"tune.space.{name}: reaches {value!r}, which the config refuses: {first}") from None


def run_study(cfg: Config, options: TuneOptions, config_path: str | None = None,
              base_overrides: list[str] | None = None, log: Callable[[str], None] = print,
              studies_dir: Path = STUDIES_DIR) -> optuna.Study:
    """Create or resume the study and run the missing trials; returns the Optuna study."""
    preflight(cfg)  # the config's mistakes (data_root, model, device) before the study exists, as for a run
    check_space_ends(cfg, cfg.tune.space)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    started = time.perf_counter()
    study = Study(cfg, options, config_path, base_overrides, log, studies_dir)
    result = study.run()
    log(f"study finished in {time.perf_counter() - started:.0f}s: {study.tally()}")
    return result
