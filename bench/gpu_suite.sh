#!/usr/bin/env bash
# Every GPU measurement of issue 10 (goals 2-4) in one prepared run, for a lent GPU machine whose
# time is short (BENCHMARKS.md, "GPU: the prepared run"). Here, once: `bash bench/gpu_wheels.sh`.
# Then one device call: command `bash bench/gpu_suite.sh`, carry [".whl"], timeout_s 600 (the most
# a call may have). Each part has its own time limit (100 + 210 + 90 + 180 s) and writes its
# numbers as soon as it ends, so a part that runs out of time loses only itself. What comes back
# from $OUT (at most 8 files):
#   gpu_suite.log            everything printed, with nvidia-smi's card, driver and memory
#   train_step.json          goals 2-3: stage-1 and stage-2 steps, workbench vs the baseline, eager
#   gpu_check.json           goal 4: the run's image stage (data + validation) vs the bare step;
#                            bf16 vs fp32; the quickstart on the GPU
#   train_step_compile.json  goals 2-3 with compile: true
# The log also holds `pytest -m gpu`: what only CUDA runs (fused Adam, channels-last, bf16, compile,
# a run moved from the GPU to the CPU) computes what the plain path does.
# DRY_RUN=1 runs the same scripts on the CPU with the tiny model (tests/test_bench.py does);
# PYTHON names the interpreter (default python3). Exit 1 when a part failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ ${DRY_RUN:-0} != 1 ]] && compgen -G ".whl/*.whl" > /dev/null; then  # the packages the GPU image lacks
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "gpu_suite: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if [[ ${DRY_RUN:-0} == 1 ]]; then  # the same code paths on the CPU with the tiny model, in a minute
    step=(--device cpu --model wb-tiny --batch 16 --classes 8 --steps 2 --warmup 1)
    check=(--device cpu --model wb-tiny --image-size 64 32 --batch 16 --identities 8 --val-identities 4 --images 4
           --epochs 2 --workers 0 --steps 2 --warmup 1 --no-quickstart --no-fp32)
else
    "$py" -c "import torch, open_clip; assert torch.cuda.is_available(), 'no CUDA device'" \
        || { echo "gpu_suite: needs CUDA and open_clip (run bench/gpu_wheels.sh here, carry .whl)" >&2; exit 1; }
    step=(--device cuda --model ViT-B-16 --image-size 256 128 --batch 64 --steps 50 --warmup 5)
    check=(--workers "$(( $(nproc) / 2 ))")
fi
failed=0
part() {  # part NAME SECONDS COMMAND...
    local name=$1 limit=$2 code=0
    shift 2
    echo "== $name (limit ${limit} s) $(date -u +%H:%M:%S)"
    timeout "$limit" "$@" || code=$?
    echo "== $name: exit $code $(date -u +%H:%M:%S)"
    [[ $code == 0 ]] || failed=1
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    "$py" -c "import torch, open_clip; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'open_clip', open_clip.__version__)"
    nproc
    part train_step 100 "$py" bench/train_step.py "${step[@]}" --out "$out/train_step.json"
    part gpu_check 210 "$py" bench/gpu_check.py "${check[@]}" --out "$out/gpu_check.json"
    if [[ ${DRY_RUN:-0} != 1 ]]; then  # compiling takes minutes on a CPU
        part gpu_tests 90 "$py" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_model.py
        part train_step_compile 180 "$py" bench/train_step.py "${step[@]}" --compile --out "$out/train_step_compile.json"
    fi
    exit $failed
} 2>&1 | tee "$out/gpu_suite.log"
