#!/usr/bin/env bash
# Every GPU check of fastllm in one command, for a machine with a CUDA GPU, its own
# python3/PyTorch/Triton/nvcc and no network (DESIGN.md, "The GPU machine"):
#
#   bash bench/gpu_check.sh [OUTDIR]        (OUTDIR defaults to $OUT, else bench/results/gpu-DATE)
#
# 1. builds fastllm._C in place with this machine's nvcc (FASTLLM_CUDA_ARCHS, default 90a here)
# 2. fastllm doctor
# 3. the `gpu`-marked tests (real sizes, every backend forced in turn, the unverified cuda
#    backend included), then the rest of the suite on the GPU as time allows
# 4. compute-sanitizer memcheck over small calls of every CUDA kernel (bench/sanitize.py)
# 5. the benchmarks at sizes that fill an H200, kernels first, the model last (rows written
#    after each family, so a run cut by the time limit keeps what it measured)
# It writes build.log, doctor.txt, tests.log, junit.xml (the gpu tests), sanitizer.log,
# bench.log, results.json and results.md into OUTDIR, and prints a short table last.
# The whole run is held to GPU_CHECK_BUDGET seconds (default 450): each step gets at most
# its own limit and what is left of the budget.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M)}}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-450}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FASTLLM_CUDA_ARCHS="${FASTLLM_CUDA_ARCHS:-90a}"
unset TRITON_INTERPRET
failed=()
t0=$SECONDS
step() { echo "== [$((SECONDS - t0))s] $*"; }
# limit N: N seconds, or what is left of the budget if less (at least 5)
limit() { local left=$((BUDGET - (SECONDS - t0))); local n=$(( $1 < left ? $1 : left )); echo $(( n > 5 ? n : 5 )); }

step "build fastllm._C (FASTLLM_CUDA_ARCHS=$FASTLLM_CUDA_ARCHS)"
b0=$SECONDS
if ! timeout "$(limit 150)" "$PY" setup.py build_ext --inplace >"$OUTDIR/build.log" 2>&1; then
    tail -40 "$OUTDIR/build.log"
    echo "BUILD FAILED (see build.log)"
    failed+=(build)
fi
echo "build: $((SECONDS - b0)) s" | tee -a "$OUTDIR/build.log"

step "doctor"
timeout 60 "$PY" -m fastllm doctor 2>&1 | tee "$OUTDIR/doctor.txt" || failed+=(doctor)

pytest_timeout=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo --timeout=90)
# Triton compiles on the CPU: with pytest-xdist, 8 test processes share the GPU
xdist=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8")
step "gpu tests (pytest -m gpu)"
timeout "$(limit 170)" "$PY" -m pytest -q -m gpu $pytest_timeout $xdist -p no:cacheprovider \
    --junitxml="$OUTDIR/junit.xml" >"$OUTDIR/tests.log" 2>&1 || { [ $? -eq 124 ] && echo "(time limit)"; failed+=(gpu-tests); }
grep -E "^(FAILED|ERROR)" "$OUTDIR/tests.log" | head -40
tail -1 "$OUTDIR/tests.log"

step "other tests, on the GPU"
timeout "$(limit 80)" "$PY" -m pytest -q -m "not gpu" $pytest_timeout $xdist -p no:cacheprovider \
    >>"$OUTDIR/tests.log" 2>&1 || { [ $? -eq 124 ] && echo "(time limit)" | tee -a "$OUTDIR/tests.log"; failed+=(other-tests); }
grep -E "^(FAILED|ERROR)" "$OUTDIR/tests.log" | tail -n +41 | head -20
tail -1 "$OUTDIR/tests.log"; echo

step "compute-sanitizer memcheck"
if command -v compute-sanitizer >/dev/null; then
    timeout "$(limit 60)" compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" bench/sanitize.py \
        >"$OUTDIR/sanitizer.log" 2>&1 || failed+=(sanitizer)
    tail -5 "$OUTDIR/sanitizer.log"
else
    echo "compute-sanitizer not found" | tee "$OUTDIR/sanitizer.log"
fi

step "benchmarks"
timeout "$(limit 170)" "$PY" -m fastllm bench quant attention int8 sparse models norm overhead launches --out "$OUTDIR" >"$OUTDIR/bench.log" 2>&1 || failed+=(bench)
grep -E "bench_.*: [0-9.]+ s|differs|failed" "$OUTDIR/bench.log" | tail -20

step "done in $((SECONDS - t0))s; failed steps: ${failed[*]:-none}"
[ -f "$OUTDIR/results.md" ] && tail -n +7 "$OUTDIR/results.md" | cut -c1-160 | tail -45
[ ${#failed[@]} -eq 0 ]
