"""Checkpoints: one dict of named parts, written atomically, loaded with ``weights_only=True``.

Everything saved is tensors, numbers, strings, lists and dicts, so loading never runs pickled
code. A checkpoint holds the whole training state (model, optimizer, scheduler, classifier,
center-loss state, RNG states, epoch, metrics, resolved config), so a run can resume from it.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from .errors import CheckpointError, ResourceError, os_error_message


class CheckpointMismatch(CheckpointError):
    """A readable workbench checkpoint that does not fit the model built from this config."""


FORMAT = 1  # the layout of the dict below; raised when it changes incompatibly


GLOBAL_RNG = threading.RLock()
"""Held by a run while it draws from the process-wide generators: seeding, building the model, the
prompt stage. Its image stage then draws from a generator of its own (``own_generator``), so
that runs in threads of one process (parallel tuning trials) neither shift nor reseed each
other's random numbers: each gives what it gives alone."""


def own_generator() -> torch.Generator:
    """A CPU generator that goes on with the global torch stream from where it stands now: what a
    run draws from it equals what it would draw from the global generator."""
    generator = torch.Generator()
    generator.set_state(torch.get_rng_state())
    return generator


def rng_state(generator: torch.Generator | None = None) -> dict:
    """RNG states of Python, numpy, torch CPU (``generator``'s when given: the run's own) and
    every CUDA device, as plain data."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": (generator.get_state() if generator is not None else torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_generator(generator: torch.Generator | None, state: dict) -> None:
    """After ``load_checkpoint(..., restore_rng=False)``: the stage's own ``generator`` goes on
    from the checkpoint's torch stream (nothing when None: load_checkpoint restored the global one)."""
    if generator is not None:
        generator.set_state(state["rng_state"]["torch"])


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_flags(module: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in module.named_parameters()}


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def signals_held():
    """Ctrl-C and SIGTERM wait until the block ends: an exception raised inside torch.save's
    writer (or inside a SQLite transaction of the tracking store) leaves it in a state that fails
    again on close, turning a clean interruption into a crash. Held only on the main thread,
    where Python runs signal handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    for signum in previous:
        signal.signal(signum, lambda number, _frame: received.append(number))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), received[0])


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> Path:
    """Call ``write(binary_file)`` on a temporary file in ``path``'s folder, fsync it, then rename
    it to ``path``: a crash or a full disk never leaves a torn file under the final name. An
    operating-system refusal (disk full, folder not writable) becomes a one-line ResourceError."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes it private (0600); the final file follows the umask
        with signals_held(), os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, ResourceError):
            raise ResourceError(os_error_message(err, f"cannot write {path}")) from err
        raise
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save through ``atomic_write``."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``*.tmp`` files that a killed ``atomic_write`` left in ``folder``."""
    stale = sorted(Path(folder).glob("*.*.tmp"))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def save_checkpoint(path: str | Path, *, model: nn.Module, optimizer=None, scheduler=None,
                    classifier: nn.Module | None = None, prompt_learner: nn.Module | None = None,
                    extra_modules: dict[str, nn.Module] | None = None, extra_optimizers: dict | None = None,
                    metadata: dict | None = None, epoch: int = 0, train_loss: float | None = None,
                    val_metrics: dict | None = None, tag: str = "", log: Callable[[str], None] | None = None,
                    prompt_file: bool = True, generator: torch.Generator | None = None) -> list[Path]:
    """Write the training state to ``path`` (and, when ``prompt_learner`` is given and
    ``prompt_file`` is on, its state dict to ``<stem>_prompt.pth`` beside it); the random state
    holds ``generator``'s torch stream when the stage draws from one of its own. Returns the
    written paths."""
    path = Path(path)
    state = {
        "format": FORMAT,
        "model_state_dict": model.state_dict(),
        "trainable_flags": trainable_flags(model),
        "optimizer_state_dict": optimizer.state_dict() if optimizer is not None else None,
        "scheduler_state_dict": scheduler.state_dict() if scheduler is not None else None,
        "classifier_state_dict": classifier.state_dict() if classifier is not None else None,
        "prompt_learner_state_dict": prompt_learner.state_dict() if prompt_learner is not None else None,
        "extra_state_dicts": {k: m.state_dict() for k, m in (extra_modules or {}).items()},
        "extra_optimizer_state_dicts": {k: o.state_dict() for k, o in (extra_optimizers or {}).items()},
        "metadata": metadata or {},
        "rng_state": rng_state(generator),
        "epoch": int(epoch),
        "train_loss": None if train_loss is None else float(train_loss),
        "val_metrics": {k: float(v) for k, v in (val_metrics or {}).items()},
        "tag": tag,
    }
    written = [atomic_torch_save(state, path)]
    if prompt_learner is not None and prompt_file:
        prompt_path = path.with_name(path.stem + "_prompt.pth")
        written.append(atomic_torch_save({"prompt_learner_state_dict": prompt_learner.state_dict(),
                                          "metadata": metadata or {}}, prompt_path))
    if log is not None:
        log(f"saved {tag or 'checkpoint'} -> {path}")
    return written


def _load_module(module: nn.Module, state: dict, what: str, log: Callable[[str], None]) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        message = f"{what}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}"
        warnings.warn(message)
        log(message)
        raise CheckpointMismatch(message)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise CheckpointMismatch(f"{what}: {' '.join(lines[:2])[:400]}") from None


def check_readable(path: Path) -> None:
    """A cheap look at a checkpoint before a resume commits to it: a torch archive whose index is
    intact (a truncated or foreign file fails here, without reading the weights)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                raise zipfile.BadZipFile("no data.pkl")
    except (OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file): "
                              f"{err}") from None


def read_checkpoint(path: Path) -> dict:
    """The checkpoint dict in ``path`` (on the CPU, ``weights_only``: nothing in it is executed),
    or a CheckpointError saying what the file is instead: missing, truncated or not a torch
    file, a prompt-only file, a plain tensor or state dict, another workbench format."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a corrupt, truncated or foreign file: report, never execute
        text = str(err)
        code = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if code:  # torch's advice to load it with weights_only=False would run that code
            reason = f"it holds pickled code ({code.group(1)}), which workbench never runs"
        elif "Weights only load failed" in text:
            reason = "not a PyTorch file"
        else:
            reason = (text.strip().splitlines() or [type(err).__name__])[0][:300]
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, corrupt or not a torch file): "
                              f"{reason}") from None
    expected = "expected a workbench BEST/FINAL/LAST .pth (a dict with model_state_dict)"
    if isinstance(state, torch.Tensor):
        raise CheckpointError(f"{path} holds a single tensor, not a workbench checkpoint; {expected}")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a workbench checkpoint; {expected}")
    if "model_state_dict" not in state:
        if "prompt_learner_state_dict" in state:
            raise CheckpointError(f"{path} is a prompt-only file (*_prompt.pth); {expected}, such as the file "
                                  f"beside it without _prompt")
        if state and all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path} is a plain state dict (model weights, e.g. for pretrained:), not a "
                                  f"workbench checkpoint; {expected}")
        raise CheckpointError(f"{path} is not a workbench checkpoint (keys {sorted(map(str, state))[:5]}); {expected}")
    if state.get("format", 1) > FORMAT:
        raise CheckpointError(f"{path} was written by a newer workbench (checkpoint format {state['format']}, this "
                              f"one reads {FORMAT}); upgrade workbench")
    return state


def load_checkpoint(path: str | Path, *, model: nn.Module, device: torch.device | str = "cpu",
                    optimizer=None, scheduler=None, classifier: nn.Module | None = None,
                    prompt_learner: nn.Module | None = None, extra_modules: dict[str, nn.Module] | None = None,
                    extra_optimizers: dict | None = None, restore_rng: bool = True,
                    metadata_expected: dict | None = None, log: Callable[[str], None] = lambda _: None) -> dict:
    """Restore what ``save_checkpoint`` wrote into the given objects, strictly (a mismatch raises
    CheckpointError after a warning naming the keys). Returns the raw checkpoint dict
    (``metadata``, ``epoch``, ``val_metrics``, ...)."""
    path = Path(path)
    state = read_checkpoint(path)
    found = state.get("metadata", {})
    for key, want in (metadata_expected or {}).items():
        if found.get(key) is not None and found[key] != want:
            what = {"architecture": "model_type", "stage": "stage"}.get(key, key)
            raise CheckpointMismatch(f"{path} is from {what} {found[key]}, expected {what} {want}")
    _load_module(model, state["model_state_dict"], "model", log)
    for name, p in model.named_parameters():
        if name in state.get("trainable_flags", {}):
            p.requires_grad_(state["trainable_flags"][name])
    pairs = [(classifier, "classifier_state_dict"), (prompt_learner, "prompt_learner_state_dict")]
    for module, key in pairs:
        if module is not None:
            if state.get(key) is None:
                raise CheckpointError(f"{path} holds no {key}")
            _load_module(module, state[key], key, log)
    for name, module in (extra_modules or {}).items():
        _load_module(module, state["extra_state_dicts"][name], name, log)
    if optimizer is not None and state.get("optimizer_state_dict") is not None:
        optimizer.load_state_dict(state["optimizer_state_dict"])
    if scheduler is not None and state.get("scheduler_state_dict") is not None:
        scheduler.load_state_dict(state["scheduler_state_dict"])
    for name, opt in (extra_optimizers or {}).items():
        opt.load_state_dict(state["extra_optimizer_state_dicts"][name])
    if restore_rng:
        set_rng_state(state["rng_state"])
    log(f"loaded checkpoint {path} (epoch {state['epoch']})")
    return state
