#!/usr/bin/env bash
# Every GPU measurement of issue 10 (goals 2-4) in one prepared run, for a lent GPU machine whose
# time is short (BENCHMARKS.md, "GPU: the prepared run"). Here, once: `bash bench/gpu_wheels.sh`.
# Then one device call: command `bash bench/gpu_suite.sh`, carry [".whl"], timeout_s 600.
#
# The run stays within BUDGET seconds (default 540, under a call's 600): each part is given what
# is left, at most its own limit, and a part that no longer fits is skipped. Each part writes its
# numbers as they come, so a part stopped by its limit loses only what it had not measured yet.
# What comes back from $OUT (at most 8 files):
#   gpu_suite.log            everything printed: the card, driver, memory, /dev/shm; each part's exit
#   train_step.json          goals 2-3: stage-1 and stage-2 steps, workbench vs the baseline, eager
#   gpu_check.json           goal 4: the run's image stage (data + validation) vs the bare step;
#                            the quickstart on the GPU; bf16 vs fp32
#   train_step_compile.json  goals 2-3 with compile: true (against the eager run's baseline)
# The log also holds `pytest -m gpu`: what only CUDA runs (fused Adam, channels-last, bf16, compile,
# a run moved from the GPU to the CPU) computes what the plain path does.
#
# DRY_RUN=1 runs every part but the compiled one on the CPU with the tiny model (tests/test_bench.py
# does); PYTHON names the interpreter (default python3). Exit 1 when a part failed, ran out of
# time or was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
budget=${BUDGET:-540}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ ${DRY_RUN:-0} != 1 ]] && compgen -G ".whl/*.whl" > /dev/null; then  # the packages the GPU image lacks
    site=$(mktemp -d)
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || { echo "gpu_suite: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="$PYTHONPATH:$site"
fi
if [[ ${DRY_RUN:-0} == 1 ]]; then  # the same code paths on the CPU with the tiny model, in a minute
    step=(--device cpu --model wb-tiny --batch 16 --classes 8 --steps 2 --warmup 1)
    check=(--device cpu --model wb-tiny --image-size 64 32 --batch 16 --identities 8 --val-identities 4 --images 4
           --epochs 2 --workers 0 --steps 2 --warmup 1 --no-quickstart --no-fp32)
else
    "$py" -c "import torch, open_clip; assert torch.cuda.is_available(), 'no CUDA device'" \
        || { echo "gpu_suite: needs CUDA and open_clip (run bench/gpu_wheels.sh here, carry .whl)" >&2; exit 1; }
    step=(--device cuda --model ViT-B-16 --image-size 256 128 --batch 64 --steps 50 --warmup 5)
    check=(--workers auto)  # cores - 1, at most 8 (data.loader_workers)
fi
failed=0
part() {  # part NAME SECONDS COMMAND...: at most SECONDS, and never past the budget
    local name=$1 limit=$2 code=0
    shift 2
    local left=$(( budget - SECONDS ))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then
        echo "== $name: skipped, ${left} s of the ${budget} s budget left"
        failed=1
        return
    fi
    echo "== $name (limit ${limit} s) $(date -u +%H:%M:%S)"
    timeout "$limit" "$@" || code=$?
    echo "== $name: exit $code $(date -u +%H:%M:%S)"
    [[ $code == 0 ]] || failed=1
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    "$py" -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'open_clip', open_clip.__version__)"
    echo "cores $(nproc)"
    df -h /dev/shm | tail -n 1
    part train_step 90 "$py" bench/train_step.py "${step[@]}" --out "$out/train_step.json"
    part gpu_check 200 "$py" bench/gpu_check.py "${check[@]}" --out "$out/gpu_check.json"
    part gpu_tests 120 "$py" -m pytest -v -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_model.py
    if [[ ${DRY_RUN:-0} != 1 ]]; then  # compiling takes minutes on a CPU
        part train_step_compile 180 "$py" bench/train_step.py "${step[@]}" --compile \
            --baseline-from "$out/train_step.json" --out "$out/train_step_compile.json"
    fi
    exit $failed
} 2>&1 | tee "$out/gpu_suite.log"
