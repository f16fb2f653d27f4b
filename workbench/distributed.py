"""Multi-process training with PyTorch DistributedDataParallel, launched by torchrun.

``torchrun --nproc-per-node N -m workbench run exp.yaml`` starts N processes (ranks); ``setup``
joins them into one process group (NCCL on GPUs, gloo on the CPU). Every rank builds the same
model from the same seed; DDP averages the gradients of what trains.

How a step stays the single-process step: each rank encodes its share of the global P x K
batch (different identities per rank), ``gather_rows`` joins the shares into the global batch
on every rank, and every rank computes the losses on the whole batch (batch-hard triplet,
SupCon, ID, center loss and BNNeck statistics see the same samples as in one process).
``gather_rows``' backward sums the batch's gradient over the ranks and hands each rank its
rows, so after DDP's average every parameter gets the gradient of the global-batch loss.

Only rank 0 logs to MLflow, writes files and prints; validation and feature caching extract
each split in contiguous shards and gather them. With one process every function here is the
identity and nothing changes.
"""
from __future__ import annotations

import datetime
import os
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import RankLost, UsageError

TIMEOUT = datetime.timedelta(minutes=30)


def env_world_size() -> int:
    """The world size torchrun announced (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def is_main() -> bool:
    return rank() == 0


def setup(device_name: str) -> None:
    """Join torchrun's process group when WORLD_SIZE > 1 (a no-op otherwise): NCCL when the
    run's device is a GPU (each rank on ``cuda:LOCAL_RANK``), gloo on the CPU."""
    if env_world_size() <= 1 or active():
        return
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise UsageError(f"WORLD_SIZE is set but {', '.join(missing)} is not: start multi-process runs with "
                         f"torchrun --nproc-per-node N -m workbench run ... (or workbench run --nproc N)")
    cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        if torch.cuda.device_count() <= int(os.environ["LOCAL_RANK"]):
            raise UsageError(f"rank {os.environ['RANK']} wants GPU {os.environ['LOCAL_RANK']} but "
                             f"{torch.cuda.device_count()} are visible; lower --nproc-per-node")
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)


def lost_peer(err: BaseException) -> RankLost | None:
    """A collective that failed because another rank went away (its process ended: an error, a
    kill, out of memory) as a one-line RankLost; None for any other error."""
    if env_world_size() <= 1 or not isinstance(err, RuntimeError) or isinstance(err, RankLost):
        return None
    text = str(err)
    markers = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "gloo", "NCCL",
               "ProcessGroup", "Socket Timeout")
    if not (isinstance(err, getattr(dist, "DistError", ())) or any(m in text for m in markers)):
        return None
    return RankLost(f"another process of this {env_world_size()}-process run stopped (its message is above, "
                    f"unless it was killed)")


def sync_buffers(module: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: what a checkpoint holds is
    then what every rank validates with (on the CPU each rank's BatchNorm ran on its share)."""
    if active():
        for buffer in module.buffers():
            dist.broadcast(buffer.data, 0)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def device_for(device: torch.device) -> torch.device:
    """This rank's device: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank())
    return device


def shard_bounds(total: int, ranks: int | None = None, which: int | None = None) -> tuple[int, int]:
    """[start, end) of a rank's contiguous share of ``total`` items (the first ranks get one
    more when it does not divide)."""
    ranks = world_size() if ranks is None else ranks
    which = rank() if which is None else which
    base, extra = divmod(total, ranks)
    start = which * base + min(which, extra)
    return start, start + base + (1 if which < extra else 0)


def shard_sizes(total: int) -> list[int]:
    return [end - start for start, end in (shard_bounds(total, world_size(), r) for r in range(world_size()))]


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order; the gradient of the whole is summed over the
    ranks (every rank computed the same loss from it) and each rank keeps its own rows."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        ctx.sizes = sizes
        longest = max(sizes)
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        start = sum(ctx.sizes[:rank()])
        return grad[start:start + ctx.sizes[rank()]], None


def gather_rows(local: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
    """The rows of every rank in rank order (``local`` itself with one process). ``sizes``: the
    row count of each rank when every rank knows them; otherwise they are exchanged first.
    Differentiable: see ``_GatherRows``."""
    if not active():
        return local
    if sizes is None:
        shapes: list = [None] * world_size()
        dist.all_gather_object(shapes, tuple(local.shape))
        sizes = [s[0] for s in shapes]
        width = next((s[1:] for s in shapes if s[0] > 0), tuple(local.shape[1:]))
        if local.shape[0] == 0 and tuple(local.shape[1:]) != tuple(width):
            local = local.new_zeros((0, *width))
    if local.requires_grad:
        return _GatherRows.apply(local, tuple(sizes))
    with torch.no_grad():
        return _GatherRows.apply(local, tuple(sizes))


def batch_gather(share: int, global_batch: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """The gather of a training step whose ranks each hold ``share`` rows: ``gather_rows`` into
    the global batch, or (``global_batch`` off: per-rank losses, as the official CLIP-ReID) the
    identity."""
    if not (active() and global_batch):
        return lambda rows: rows
    sizes = [share] * world_size()
    return lambda rows: gather_rows(rows, sizes)


def broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank (in place)."""
    if active():
        dist.broadcast(tensor, 0)
    return tensor


def broadcast_object(value):
    """Rank 0's ``value`` (picklable) on every rank."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


class _Step(nn.Module):
    """The modules that train in one stage; its forward runs the stage's step function, so DDP
    sees one forward (and one backward) per step."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(modules)

    def forward(self, step: Callable, *args):
        return step(*args)


def data_parallel(modules: Sequence[nn.Module | None], device: torch.device) -> Callable:
    """``run(step, *args)``: ``step(*args)`` inside DDP over ``modules`` (gradients of their
    trainable parameters averaged over the ranks), or called as it is with one process. DDP's
    static graph allows parameters that train but get no gradient in a step function."""
    if not active():
        return lambda step, *args: step(*args)
    holder = _Step([m for m in modules if m is not None])
    return nn.parallel.DistributedDataParallel(holder, device_ids=[device.index] if device.type == "cuda" else None,
                                               static_graph=True)


def batch_norm_over_ranks(norm: nn.Module, x: torch.Tensor, global_batch: bool = True) -> torch.Tensor:
    """``norm(x)`` (a BatchNorm of rows) with training statistics over the global batch: the
    ranks' rows (equal shares) are gathered, normalised together, and each rank keeps its own.
    Exact, gradients included (see ``_GatherRows``), and on gloo too, where SyncBatchNorm does
    not run. Without ``global_batch``, over this rank's rows."""
    if not (active() and norm.training and global_batch):
        return norm(x)
    start = rank() * len(x)
    return norm(gather_rows(x, [len(x)] * world_size()))[start:start + len(x)]


def sync_batchnorm(module: nn.Module, device: torch.device, log: Callable[[str], None]) -> nn.Module:
    """BatchNorm layers inside ``module`` (a ResNet's) compute their statistics over the whole
    global batch on GPUs (SyncBatchNorm). On the CPU, which SyncBatchNorm does not support,
    each rank normalises over its share, and ``log`` says so."""
    if not active() or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module
    if device.type != "cuda":
        log("note: BatchNorm layers of the image encoder use each rank's share of the batch (SyncBatchNorm "
            "needs GPUs)")
        return module
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)


class ShardSampler(torch.utils.data.Sampler[int]):
    """This rank's contiguous share of ``total`` items in order (all of them with one process);
    ``evaluation.extract_features`` gathers the shares back into the full order."""

    def __init__(self, total: int, ranks: int = 1, which: int = 0):
        self.total, self.ranks, self.which = total, ranks, which
        self.start, self.end = shard_bounds(total, ranks, which)

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        return iter(range(self.start, self.end))

    def sizes(self) -> list[int]:
        return [end - start for start, end in (shard_bounds(self.total, self.ranks, r) for r in range(self.ranks))]
