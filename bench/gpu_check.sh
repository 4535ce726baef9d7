#!/usr/bin/env bash
# Every GPU check of fastllm in one command, for a machine with a CUDA GPU, its own
# python3/PyTorch/Triton/nvcc and no network (DESIGN.md, "The GPU machine"):
#
#   bash bench/gpu_check.sh [OUTDIR]        (OUTDIR defaults to $OUT, else bench/results/gpu-DATE)
#
# 1. builds fastllm._C in place with this machine's nvcc (sm_90a by default here)
# 2. fastllm doctor
# 3. the whole test suite on the GPU (the `gpu`-marked tests at real sizes included)
# 4. compute-sanitizer memcheck over small calls of every CUDA kernel (bench/sanitize.py)
# 5. the benchmarks at sizes that fill an H200
# and writes build.log, doctor.txt, tests.log, junit.xml, sanitizer.log, bench.log,
# results.json and results.md into OUTDIR, then prints a short table. Budget: well under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${1:-${OUT:-bench/results/gpu-$(date +%Y%m%d-%H%M)}}"
mkdir -p "$OUTDIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export FASTLLM_CUDA_ARCHS="${FASTLLM_CUDA_ARCHS:-90a}"
unset TRITON_INTERPRET
failed=()
t0=$SECONDS
step() { echo "== [$((SECONDS - t0))s] $*"; }

step "build fastllm._C (FASTLLM_CUDA_ARCHS=$FASTLLM_CUDA_ARCHS)"
if ! timeout 300 "$PY" setup.py build_ext --inplace >"$OUTDIR/build.log" 2>&1; then
    tail -40 "$OUTDIR/build.log"
    echo "BUILD FAILED (see build.log)"
    failed+=(build)
fi

step "doctor"
timeout 120 "$PY" -m fastllm doctor 2>&1 | tee "$OUTDIR/doctor.txt" || failed+=(doctor)

step "tests (all, on the GPU)"
pytest_timeout=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo --timeout=120)
timeout 330 "$PY" -m pytest -q $pytest_timeout -p no:cacheprovider --junitxml="$OUTDIR/junit.xml" \
    >"$OUTDIR/tests.log" 2>&1 || { failed+=(tests); grep -E "^(FAILED|ERROR)|Error" "$OUTDIR/tests.log" | head -30; }
tail -3 "$OUTDIR/tests.log"

step "compute-sanitizer memcheck"
if command -v compute-sanitizer >/dev/null; then
    timeout 240 compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" bench/sanitize.py \
        >"$OUTDIR/sanitizer.log" 2>&1 || failed+=(sanitizer)
    tail -5 "$OUTDIR/sanitizer.log"
else
    echo "compute-sanitizer not found" | tee "$OUTDIR/sanitizer.log"
fi

step "benchmarks"
timeout 300 "$PY" -m fastllm bench --out "$OUTDIR" >"$OUTDIR/bench.log" 2>&1 || failed+=(bench)
grep -E "^  |differs" "$OUTDIR/bench.log" | tail -60

step "done in $((SECONDS - t0))s; failed steps: ${failed[*]:-none}"
[ -f "$OUTDIR/results.md" ] && tail -n +7 "$OUTDIR/results.md" | cut -c1-160 | tail -40
[ ${#failed[@]} -eq 0 ]
