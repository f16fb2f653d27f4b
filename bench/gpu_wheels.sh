#!/usr/bin/env bash
# Run HERE (not on the GPU machine), once per checkout, before bench/gpu_suite.sh goes to a lent
# GPU machine: that machine reaches no package registry, and its image has torch, torchvision,
# regex, huggingface_hub and safetensors but not open_clip_torch or ftfy (and a timm perhaps older
# than open_clip needs). This downloads the wheels workbench needs there, at this environment's
# versions, into .whl/ (ignored by git; the device call carries it). About 5 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
version() { "${PYTHON:-python}" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
"${PYTHON:-python}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "open_clip_torch==$(version open_clip_torch)" "ftfy==$(version ftfy)" "wcwidth==$(version wcwidth)" \
    "timm==$(version timm)"
ls .whl
