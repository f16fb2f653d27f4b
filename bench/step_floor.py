"""Where the image stage's training step spends its time on this CPU, against what the same
operations cost when each runs alone: how far the step is from its floor.

The step is bench/train_step.py's workbench stage-2 step (the quickstart's wb-tiny CLIP at 64x32,
batch 32, BNNeck and ArcFace, all five losses, Adam) on one thread by default, as each trial of a
two-at-a-time study runs it. Printed, and written as JSON with --out:
- the step: its FLOPs (torch.utils.flop_counter), its time, its GFLOP/s;
- its time by kind of operation (torch.profiler's self time per step): matrix products,
  attention, GELU, layer norm, copies and fills, the rest (Adam's and the losses' element-wise
  work, autograd's bookkeeping);
- the step's matrix products again, each shape timed alone on operands that stay in cache: the
  time its products would take if nothing else ran (the floor), and their GFLOP/s;
- GELU the same way, and the step's attention (forward and backward) under SDPA's flash and
  math kernels;
- the minor page faults per timed step: memory the step allocates and the kernel has to map
  again. ``--keep-freed-memory`` asks glibc's malloc to keep freed memory in the process (no
  trimming of the heap top, buffers up to 32 MiB from the heap) to see what those faults cost.

    python bench/step_floor.py                 # one thread, 40 steps
    python bench/step_floor.py --threads 2
    python bench/step_floor.py --keep-freed-memory
"""
from __future__ import annotations

import argparse
import ctypes
import json
import resource
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from train_step import stage2_step, timed

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")
KINDS = (  # (kind, whether an op's name belongs to it), first match wins
    ("matrix products", lambda name: name in MATMULS),
    ("attention", lambda name: "scaled_dot_product" in name or name in ("aten::_softmax", "aten::_softmax_backward_data")),
    ("GELU", lambda name: name in ("aten::gelu", "aten::gelu_backward")),
    ("layer norm", lambda name: "layer_norm" in name),
    ("copies and fills", lambda name: name in ("aten::copy_", "aten::fill_", "aten::zero_", "aten::cat", "aten::clone",
                                               "aten::_to_copy", "aten::contiguous")),
)


def kind_of(name: str) -> str:
    return next((kind for kind, belongs in KINDS if belongs(name)), "rest")


def alone_ms(fn, reps: int) -> float:
    """Milliseconds per call of ``fn`` run ``reps`` times in a row (after two warm-up calls)."""
    for _ in range(2):
        fn()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - started) / reps * 1e3


def matmul_alone(name: str, shapes: list, reps: int) -> tuple[float, float]:
    """(ms per call, FLOPs per call) of one of the step's matrix products on fresh operands."""
    if name == "aten::addmm":
        bias, a, b = (torch.randn(s) for s in shapes[:3])
        return alone_ms(lambda: torch.addmm(bias, a, b), reps), 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    a, b = (torch.randn(s) for s in shapes[:2])
    op = torch.mm if name == "aten::mm" else torch.bmm
    return alone_ms(lambda: op(a, b), reps), 2.0 * a.shape[:-1].numel() * a.shape[-1] * b.shape[-1]


def attention_ms(shape: list[int], reps: int) -> dict[str, float]:
    """Forward and backward of SDPA on (batch, heads, tokens, head width) under each CPU kernel."""
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))
    grad = torch.randn(shape)
    out = {}
    for label, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("math", SDPBackend.MATH)):
        with sdpa_kernel(backend):
            out[label] = alone_ms(lambda: F.scaled_dot_product_attention(q, k, v).backward(grad), reps)
    return out


def keep_freed_memory() -> None:
    """glibc's mallopt: buffers below 32 MiB from the heap, and a freed heap top kept (up to 256
    MiB, with 64 MiB of padding) instead of handed back to the kernel."""
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    for option, value in ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 256 << 20), (m_top_pad, 64 << 20)):
        if libc.mallopt(option, value) != 1:
            raise SystemExit(f"mallopt({option}, {value}) refused")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads (a study's trial has 1)")
    parser.add_argument("--steps", type=int, default=40, help="steps timed without the profiler")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--profile-steps", type=int, default=10)
    parser.add_argument("--reps", type=int, default=50, help="calls per shape when timing an operation alone")
    parser.add_argument("--keep-freed-memory", action="store_true", help="glibc malloc keeps freed memory (Linux)")
    parser.add_argument("--out", help="write the numbers as JSON here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    shapes = argparse.Namespace(model="wb-tiny", image_size=(64, 32), batch=32, classes=60, n_ctx=4, log_every=20,
                                compile=False)
    device = torch.device("cpu")
    step = stage2_step(shapes, device, fast=True)
    for _ in range(args.warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step_ms = timed(step, args.steps, 0, device) / args.steps * 1e3
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / args.steps

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(args.profile_steps):
            step()
    everything = prof.key_averages(group_by_input_shape=True)
    events = [e for e in everything if e.self_cpu_time_total > 0]
    per_step = lambda us: us / 1e3 / args.profile_steps  # noqa: E731 - µs over the profiled steps -> ms per step
    by_kind = {kind: 0.0 for kind, _ in KINDS} | {"rest": 0.0}
    for e in events:
        by_kind[kind_of(e.key)] += per_step(e.self_cpu_time_total)
    profiled_ms = sum(by_kind.values())

    floor_ms = floor_flops = gelu_ms = 0.0
    for e in events:
        calls = e.count / args.profile_steps
        if e.key in MATMULS:
            ms, call_flops = matmul_alone(e.key, e.input_shapes, args.reps)
            floor_ms, floor_flops = floor_ms + calls * ms, floor_flops + calls * call_flops
        elif e.key == "aten::gelu":
            x = torch.randn(e.input_shapes[0])
            gelu_ms += calls * alone_ms(lambda: F.gelu(x), args.reps)
        elif e.key == "aten::gelu_backward":
            g, x = torch.randn(e.input_shapes[0]), torch.randn(e.input_shapes[1])
            gelu_ms += calls * alone_ms(lambda: torch.ops.aten.gelu_backward(g, x), args.reps)
    sdpa = [e for e in everything if e.key == "aten::scaled_dot_product_attention"]  # whichever kernel ran
    attention_shape = sdpa[0].input_shapes[0] if sdpa else None
    layers = sum(e.count for e in sdpa) / args.profile_steps
    attention = attention_ms(attention_shape, args.reps) if attention_shape else {}

    results = {"threads": args.threads, "keep_freed_memory": args.keep_freed_memory,
               "step": {"gflop": flops / 1e9, "ms": step_ms, "gflop_per_s": flops / step_ms / 1e6,
                        "page_faults": faults},
               "profiled_ms_per_step": profiled_ms, "ms_per_step_by_kind": by_kind,
               "matmuls_alone": {"ms_per_step": floor_ms, "gflop_per_s": floor_flops / floor_ms / 1e6 if floor_ms else None,
                                 "in_step_ms": by_kind["matrix products"]},
               "gelu_alone_ms_per_step": gelu_ms, "gelu_in_step_ms": by_kind["GELU"],
               "attention_shape": attention_shape, "attention_calls_per_step": layers,
               "attention_alone_ms_per_step": {k: v * layers for k, v in attention.items()}}
    print(f"step ({args.threads} thread{'s' * (args.threads > 1)}): {flops / 1e9:.2f} GFLOP in {step_ms:.1f} ms, "
          f"{results['step']['gflop_per_s']:.1f} GFLOP/s, {faults:.0f} minor page faults"
          + (" (freed memory kept)" if args.keep_freed_memory else ""))
    print(f"by kind, profiled ({profiled_ms:.1f} ms per step): "
          + ", ".join(f"{kind} {ms:.1f} ms ({ms / profiled_ms:.0%})" for kind, ms in by_kind.items()))
    if floor_ms:
        print(f"matrix products alone: {floor_ms:.1f} ms per step ({results['matmuls_alone']['gflop_per_s']:.1f} GFLOP/s),"
              f" in the step {by_kind['matrix products']:.1f} ms ({by_kind['matrix products'] / floor_ms:.2f}x)")
    print(f"GELU alone: {gelu_ms:.1f} ms per step, in the step {by_kind['GELU']:.1f} ms")
    if attention:
        print(f"attention {attention_shape} forward + backward alone, {layers:g} per step: "
              + ", ".join(f"{k} {v * layers:.1f} ms" for k, v in attention.items()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
