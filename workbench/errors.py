"""One family of errors a user can cause or meet, each raised where the problem is known.

The CLI catches ``WorkbenchError`` alone, prints ``workbench: error: <message>`` on one line and
exits with the class's ``exit_code``: 2 when the command itself is wrong (a config key, an
argument, a file given that is not what it should be), 1 when a correct command met a fault
while it ran (data, weights, a NaN loss, the tracking store, the disk). Anything else is a bug
and keeps its traceback. Each class also derives from the builtin its callers caught before, so
``except ValueError`` around a config load keeps working.
"""
from __future__ import annotations

import errno


class WorkbenchError(Exception):
    """Base: a message for the user, no traceback."""

    exit_code = 1


class UsageError(WorkbenchError):
    """The command or its arguments are wrong (exit 2)."""

    exit_code = 2


class ConfigError(UsageError, ValueError):
    """A config key, value or file is wrong."""


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint file is missing, unreadable, not a workbench checkpoint or does not fit the model."""


class DataError(WorkbenchError, ValueError):
    """The dataset is missing, malformed or holds an unreadable image."""


class ModelError(WorkbenchError, RuntimeError):
    """Weights cannot be loaded or the architecture cannot be built."""


class EvaluationError(WorkbenchError, ValueError):
    """Query and gallery features cannot be compared (shapes, empty splits)."""


class NonFiniteLossError(WorkbenchError, FloatingPointError):
    """A loss became NaN or infinite."""


class TrackingError(WorkbenchError):
    """The MLflow tracking store cannot be reached, opened or written."""


class TrackingUriError(UsageError, TrackingError):
    """The tracking URI given cannot name a store (unknown scheme, a file where a folder is needed)."""


class StorageError(WorkbenchError):
    """The Optuna study storage cannot be opened or written."""


class StudyFailed(WorkbenchError):
    """Every counted trial of a tuning study failed."""


class ResourceError(WorkbenchError, OSError):
    """The machine refused: disk full, folder not writable, port taken."""


def os_error_message(err: OSError, what: str) -> str:
    """``what`` and the operating system's reason in one line, with a hint for the usual ones."""
    reason = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename else ""
    hint = {errno.ENOSPC: "; free some space (old runs: mlflow gc, rm -r their run folders) and resume",
            errno.EACCES: "; choose a folder you can write to", errno.EROFS: "; choose a folder you can write to",
            errno.ENOTDIR: "; a file stands where a folder is needed"}.get(err.errno, "")
    return f"{what}: {reason}{where}{hint}"


class RankLost(WorkbenchError, RuntimeError):
    """Another process of a multi-process (DDP) run stopped, so this one cannot go on."""
