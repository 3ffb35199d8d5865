#!/usr/bin/env bash
# The GPU check: the cuda tests, HAFA-vs-baseline timings on the GPU (fp32 and bf16, and under CUDA
# graphs, which take the launch cost away), SIA's operations at the detection size, a CUDA kernel
# profile, and a short bf16 training run on the embedded data. About 8 minutes on an H100.
# Everything it prints and measures goes to OUT_DIR.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default: gpu_check/)
#
# It uses the python3 on PATH and the CUDA build of torch already there; hafa is installed
# without touching torch. On a machine without internet, put wheels of what is missing
# (e.g. pycocotools, mlxtend, timm) in a folder and set WHEELS=that/folder.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(mkdir -p "${1:-gpu_check}" && cd "${1:-gpu_check}" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
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
step environment 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    $PY -c 'import sys, torch, torchvision, timm, hafa; print(sys.version.split()[0], torch.__version__, \
torchvision.__version__, timm.__version__, torch.cuda.get_device_name())'"
step cuda-tests 300 "$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider --durations=8
step bench-fp32 75 "$PY" -m hafa bench --device cuda --models hafa_pvt_tiny hafa_pvt_v2_b1 \
    hafa_swin_tiny_patch4_window7_224 --batch-sizes 1 64 --reps 10 --warmup 3 --json "$OUT/bench_fp32.json"
step bench-bf16 75 "$PY" -m hafa bench --device cuda --amp bf16 --models hafa_pvt_tiny hafa_pvt_v2_b1 \
    hafa_swin_tiny_patch4_window7_224 --batch-sizes 1 64 --reps 10 --warmup 3 --json "$OUT/bench_bf16.json"
step bench-cudagraphs 120 "$PY" -m hafa bench --device cuda --compile cudagraphs --models hafa_pvt_tiny hafa_pvt_v2_b1 \
    --batch-sizes 1 64 --reps 10 --warmup 3 --no-train --json "$OUT/bench_cudagraphs.json"
step bench-modules 45 "$PY" -m hafa bench --device cuda --modules --models hafa_pvt_v2_b1 --reps 10 --warmup 3 \
    --json "$OUT/bench_modules.json"
step train-bf16 75 "$PY" -m hafa train --model hafa_pvt_v2_b0 --baseline --device cuda --amp bf16 --epochs 2 \
    --workers 4 --output /tmp/hafa-gpu-runs
step profile 60 bash -c "$PY benchmarks/profile_cuda.py --models hafa_pvt_tiny --batch 1 > '$OUT/profile_b1.txt' && \
    $PY benchmarks/profile_cuda.py --models hafa_pvt_tiny --batch 64 --amp bf16 > '$OUT/profile_b64_bf16.txt'"
echo "== done: $failed step(s) failed; outputs in $OUT" | tee -a "$LOG"
exit "$failed"
