#!/usr/bin/env bash
# What a short GPU lease runs, in one go (~7 minutes on an H200 after the machine's start):
# the GPU tests, the constraint step's GPU figures at Gemma's 262k vocabulary, the step
# against a baseline revision in one process (bench/constraint_ab.py --device cuda), and
# the device-DP probe. Results land in bench/results/ as usual; logs and copies of the
# results in $OUT (the lease tool's folder) or runs/gpu_checks.
#
#   bench/gpu_checks.sh            # baseline ad5e67a: the chunked atom reduction, before the tiles
#   bench/gpu_checks.sh HEAD~3
#
# Needs the gemma3-262k tokenizer (bench/tokenizers_offline.py: the bench extra's wheel,
# or its cached tokenizer.json in $AGENTLOOP_CACHE_DIR) and git (the baseline is exported
# from the repository). PYTHON picks the interpreter (default python3).
set -o pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-runs/gpu_checks}
mkdir -p "$out"
base=${1:-ad5e67a}
py=${PYTHON:-python3}
timeout 150 "$py" -m pytest -q -o addopts="" -m gpu tests/test_device_passes.py 2>&1 | tee "$out/gpu_tests.log"
timeout 240 "$py" bench/constraint.py --tokenizers gemma3-262k --outlines-tools 0 --cuda-only 2>&1 \
    | tee "$out/constraint_cuda.log"
timeout 300 "$py" bench/constraint_ab.py --baseline "$base" --device cuda --tokenizer gemma3-262k --tools 1 5 \
    --repeats 15 --out bench/results/constraint_ab_cuda.md 2>&1 | tee "$out/constraint_ab_cuda.log"
timeout 150 "$py" bench/gpu_dp_probe.py 2>&1 | tee "$out/gpu_dp_probe.log"
cp bench/results/constraint_cuda.md bench/results/constraint_cuda.json bench/results/constraint_ab_cuda.md \
    bench/results/gpu_dp_probe.md "$out/" 2>/dev/null
exit 0
