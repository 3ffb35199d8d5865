#!/usr/bin/env bash
# The GPU check: the cuda tests, HAFA-vs-baseline timings on the GPU (eager in fp32 and bf16, and under
# CUDA graphs, which take the launch cost away), the Triton kernels against the PyTorch path, SIA's
# operations at the detection size, a CUDA kernel profile, and short training runs (one under torchrun
# with the NCCL backend and SyncBatchNorm). Everything it prints and measures goes to OUT_DIR.
#
#   bash benchmarks/gpu_check.sh [--quick] [OUT_DIR]          (default: gpu_check/)
#
# --quick: at most 300 s on an H100 / H200 (the step limits add up to 300 s): a fast subset of the cuda
# tests, bench eager in bf16 at batch 1 and 64 with the training step, bench compiled by inductor in bf16 at
# batch 64 (inference and the training step, one step per pair so that a slow compile loses one pair only),
# Triton against PyTorch for each kernel, and one epoch of torchrun --nproc_per_node=1 -m hafa train (NCCL,
# SyncBatchNorm). One lent machine can measure, change and measure again within 15 minutes.
# Without --quick: everything, about 12 minutes.
#
# It uses the python3 on PATH and the CUDA build of torch already there; hafa is used from src/ without
# touching torch. On a machine without internet, put wheels of what is missing (e.g. pycocotools,
# mlxtend, timm) in a folder and set WHEELS=that/folder.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=0
if [ "${1:-}" = "--quick" ]; then
    QUICK=1
    shift
fi
OUT=$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HAFA_LOG_INTERVAL=10
LOG="$OUT/gpu_check.log"
failed=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log everything, go on if it fails
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%T), limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

if [ -n "${WHEELS:-}" ]; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/hafa-site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/hafa-site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PAIRS=(hafa_pvt_tiny hafa_pvt_v2_b1 hafa_swin_tiny_patch4_window7_224)
BENCH=("$PY" -m hafa bench --device cuda --models "${PAIRS[@]}" --batch-sizes 1 64 --no-memory)
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m hafa train --model hafa_pvt_v2_b0
    --device cuda --amp bf16 --sync-bn --workers 4 --epochs 1 --output /tmp/hafa-gpu-torchrun)

step environment 15 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    $PY -c 'import sys, torch, torchvision, timm, triton, hafa; print(sys.version.split()[0], torch.__version__, \
torchvision.__version__, timm.__version__, triton.__version__, torch.cuda.get_device_name())'"
if [ "$QUICK" -eq 1 ]; then
    rm -rf /tmp/hafa-gpu-torchrun
    step cuda-tests 50 "$PY" -m pytest -q -m cuda tests/test_kernels.py tests/test_cuda.py -p no:cacheprovider \
        -k "not trains_on_cuda and not export" --durations=5
    step bench-bf16 35 "${BENCH[@]}" --amp bf16 --reps 5 --warmup 2 --json "$OUT/bench_bf16.json"
    for pair in "${PAIRS[@]}"; do
        step "bench-inductor-bf16-$pair" 50 "$PY" -m hafa bench --device cuda --models "$pair" --batch-sizes 64 64 \
            --no-memory --amp bf16 --compile default --reps 5 --warmup 1 --json "$OUT/bench_inductor_bf16_$pair.json"
    done
    step kernels 20 "$PY" benchmarks/bench_kernels.py --reps 10 --warmup 3 --json "$OUT/kernels.json"
    step torchrun-nccl 30 "${TORCHRUN[@]}"
else
    rm -rf /tmp/hafa-gpu-runs /tmp/hafa-gpu-torchrun
    step cuda-tests 300 "$PY" -m pytest -q -m cuda tests/test_kernels.py tests/test_cuda.py -p no:cacheprovider \
        --durations=8
    step bench-fp32 75 "${BENCH[@]}" --reps 10 --warmup 3 --json "$OUT/bench_fp32.json"
    step bench-bf16 75 "${BENCH[@]}" --amp bf16 --reps 10 --warmup 3 --json "$OUT/bench_bf16.json"
    step bench-cudagraphs 120 "$PY" -m hafa bench --device cuda --compile cudagraphs --models hafa_pvt_tiny \
        hafa_pvt_v2_b1 --batch-sizes 1 64 --reps 10 --warmup 3 --no-train --json "$OUT/bench_cudagraphs.json"
    step bench-inductor-bf16 240 "${BENCH[@]}" --amp bf16 --compile default --reps 10 --warmup 1 \
        --json "$OUT/bench_inductor_bf16.json"
    step kernels 60 "$PY" benchmarks/bench_kernels.py --json "$OUT/kernels.json"
    step bench-modules 45 "$PY" -m hafa bench --device cuda --modules --models hafa_pvt_v2_b1 --reps 10 --warmup 3 \
        --json "$OUT/bench_modules.json"
    step train-bf16 75 "$PY" -m hafa train --model hafa_pvt_v2_b0 --baseline --device cuda --amp bf16 --epochs 2 \
        --workers 4 --output /tmp/hafa-gpu-runs
    step torchrun-nccl 60 "${TORCHRUN[@]}"
    step profile 60 bash -c "$PY benchmarks/profile_cuda.py --models hafa_pvt_tiny --batch 1 > '$OUT/profile_b1.txt' && \
        $PY benchmarks/profile_cuda.py --models hafa_pvt_tiny --batch 64 --amp bf16 > '$OUT/profile_b64_bf16.txt'"
fi
echo "== done: $failed step(s) failed; outputs in $OUT" | tee -a "$LOG"
exit "$failed"
