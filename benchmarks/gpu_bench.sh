#!/usr/bin/env bash
# Issue 17's GPU check (benchmarks/gpu_bench.py on one GPU). All sections take ~18 minutes on an H200
# (the sum of gpu_bench.py's COST_S), more than one device call (10 minutes) or a session's device time (15), so
# a call runs the sections its session needs (SECTIONS). The first figures (2026-12-04) are in
# benchmarks/results/gpu_bench_h200*.json; what they lack (the compiled rows at batch 16 with the
# compiled UNet and decoder latencies, and the profiles behind the goals they miss) is one call:
#   SECTIONS="forward generate profiles" BUDGET_S=540 bash benchmarks/gpu_bench.sh run   # timeout_s 600
# (a call's `goals` covers its own rows; `generate`'s compiled latencies need `forward` beside them).
#
# The GPU machine's image has torch, transformers and accelerate but not diffusers, pydantic or
# open-clip-torch (whose CLIP BPE merges the text stand-ins read; the package itself is not imported), and
# it cannot download: their wheels travel with the working tree in .whl/ (ignored by git).
#
#   here, once, in the repo root (needs pip's index):   bash benchmarks/gpu_bench.sh fetch
#   there (the device tool's run, carry [".whl"]):       bash benchmarks/gpu_bench.sh run
#
# `run` writes gpu_bench_<gpu>.json and the log under $OUT (else benchmarks/results/); copy the JSON
# into benchmarks/results/ afterwards. BUDGET_S (default 450) bounds the benchmark's own time; SECTIONS
# (default: all) names the sections to run.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-run}" in
fetch)
    exclude="$(git rev-parse --git-common-dir)/info/exclude"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
    # Python 3.12 on x86-64 there; the versions this repo is tested with here.
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
        typing-extensions==4.16.0 open-clip-torch==3.3.0
    ls -l .whl
    ;;
run)
    out="${OUT:-benchmarks/results}"
    mkdir -p "$out"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, diffusers, transformers, pydantic; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'pydantic', pydantic.__version__)"
    gpu=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace('NVIDIA ', '').replace(' ', '_').lower())")
    # shellcheck disable=SC2086 # SECTIONS is a word list
    python3 benchmarks/gpu_bench.py --budget-s "${BUDGET_S:-450}" ${SECTIONS:+--sections $SECTIONS} \
        --out "$out/gpu_bench_$gpu.json" \
        2> >(tee "$out/gpu_bench.log" >&2) > /dev/null
    echo "wrote $out/gpu_bench_$gpu.json"
    ;;
*)
    echo "usage: bash benchmarks/gpu_bench.sh fetch|run" >&2
    exit 2
    ;;
esac
