#!/usr/bin/env bash
# The whole GPU path in one run of at most about 9 minutes, on a machine with a CUDA GPU:
#   1. the test suite on CUDA (KDZOO_TEST_DEVICE=cuda), tests/test_cuda.py included: every method
#      eager and compiled with a partial last batch, no host synchronisation in steps 2-49, the
#      fast path against fp32 eager, bit-exact --deterministic resume, a CPU run resumed on CUDA,
#      and NCCL torchrun where there are 2+ GPUs
#   2. benchmarks/speed.py: both pipelines, seconds per 50,000-image epoch; then the teacher cache:
#      KD steps with it against the baseline's, and its build time
#   3. a short real run on cifar10-mini: a resnet56 teacher, then an ST resnet20 student, --compile,
#      with the teacher cache built on the GPU
# Every step has its own time limit, so the run ends whatever fails; figures and logs go to
# $OUT (default ./gpu-check): report.txt, cuda_tests.txt, tests.txt, speed.txt, cache_speed.txt,
# real_run.txt.
#
#   mkdir -p local && cp -r ../shared/data/cifar10-mini local/    # the data, git-ignored
#   bash benchmarks/gpu_check.sh [DATA_ROOT]                       # default: local/cifar10-mini
set -uo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-local/cifar10-mini}
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export CUBLAS_WORKSPACE_CONFIG=:4096:8  # --deterministic in the tests; older PyTorch reads it once
REPORT="$OUT/report.txt"
: > "$REPORT"

step() {  # step NAME LOG SECONDS COMMAND...: runs it under a time limit, logs it, records its status
    local name=$1 log=$2 limit=$3
    shift 3
    local start=$SECONDS
    echo "== $name (limit ${limit}s)" | tee -a "$REPORT"
    timeout "$limit" "$@" > "$log" 2>&1
    local status=$?
    tail -n 25 "$log" | tee -a "$REPORT"
    echo "== $name: exit $status after $((SECONDS - start))s" | tee -a "$REPORT"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
} 2>&1 | tee -a "$REPORT"

# pytest-xdist, where installed, runs the tests in parallel: compiling dominates, and it is CPU-bound
PARALLEL=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
step "CUDA tests" "$OUT/cuda_tests.txt" 180 env KDZOO_TEST_DEVICE=cuda python3 -m pytest -q $PARALLEL tests/test_cuda.py
step "the suite on CUDA" "$OUT/tests.txt" 90 \
    env KDZOO_TEST_DEVICE=cuda python3 -m pytest -q $PARALLEL tests --ignore tests/test_cuda.py
# the rows of the fast path's goal (at most 1.0 s per 50,000-image epoch) first; each row compiles
step "speed" "$OUT/speed.txt" 75 python3 benchmarks/speed.py --workers 8 \
    --rows base-resnet20 kd-st base-resnet110 kd-at kd-fitnet kd-rkd --cache-rows
step "teacher cache speed" "$OUT/cache_speed.txt" 60 python3 benchmarks/speed.py --workers 8 \
    --rows base-resnet20 --cache-rows st rkd --cache-build-images 2048

if [ -d "$DATA/cifar-10-batches-py" ]; then
    RUNS="$OUT/runs"
    step "real run" "$OUT/real_run.txt" 120 bash -c "
        python3 train_base.py --data-root $DATA --output-dir $RUNS/teacher --model resnet56 --epochs 10 --compile &&
        python3 train_kd.py --data-root $DATA --output-dir $RUNS/st --teacher $RUNS/teacher/last.pt \
            --student resnet20 --method st --epochs 10 --compile --teacher-cache on"
    rm -rf "$RUNS"
else
    echo "== real run: skipped, no $DATA/cifar-10-batches-py (copy ../shared/data/cifar10-mini to local/)" | tee -a "$REPORT"
fi
