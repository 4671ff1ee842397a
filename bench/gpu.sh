#!/usr/bin/env bash
# Every GPU check and benchmark in one run, for a machine with one CUDA GPU:
#   1. the CUDA tests (quantize on CUDA against CPU, Triton dfloat decode and dequantize on the device);
#   2. bench/kernel_speed.py (W4A16 / W4A8 against fp16 cuBLAS and the HBM floor);
#   3. bench/lossless.py --gpu (Triton DFloat11 decode against a device copy);
#   4. bench/scale.py --device cuda (time per block and peak GPU memory, 7B-sized synthetic blocks).
# Each step has its own time limit and writes its results as it goes, so one that fails or runs out of time leaves
# the others' results. Usage: bash bench/gpu.sh [OUT]   (default out/gpu; needs ../shared/assets as the tests do)
# STEPS picks steps (default "tests kernels lossless scale"; "profile" adds a cProfile of one 7B-sized quantization),
# LIMIT_<STEP> their limits in seconds, SCALE_ARGS extra arguments of bench/scale.py.
set -u
OUT=${1:-out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
PY=${PYTHON:-python3}
LOG=$OUT/gpu.log
STEPS=" ${STEPS:-tests kernels lossless scale} "
step() {   # step NAME SECONDS COMMAND...: run with a limit, output appended to $LOG, say how it ended
    local name=$1 limit=$2; shift 2
    [[ $STEPS == *" $name "* ]] || return 0
    local started=$SECONDS
    echo "== $name: $*" >>"$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s (limit $limit s)" | tee -a "$LOG"
}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
step tests "${LIMIT_TESTS:-100}" $PY -m pytest -q -s -p no:cacheprovider tests/test_device.py \
    tests/kernels/test_triton_dfloat.py tests/kernels/test_triton_dequant.py -k "cuda or gpu"
step kernels "${LIMIT_KERNELS:-260}" $PY bench/kernel_speed.py --out "$OUT"
step lossless "${LIMIT_LOSSLESS:-60}" $PY bench/lossless.py --gpu --repeat 1 --out "$OUT/lossless-gpu.md"
step scale "${LIMIT_SCALE:-130}" $PY bench/scale.py --device cuda --results "$OUT" ${SCALE_ARGS:-}
if [[ $STEPS == *" profile "* ]]; then   # where a 7B-sized block's quantization spends its time (cProfile, top functions)
    work=$(mktemp -d)
    $PY bench/synthetic.py "$work/model" --hidden 4096 --intermediate 11008 --layers 2 --heads 32 --kv-heads 32 \
        >/dev/null
    step profile "${LIMIT_PROFILE:-120}" $PY -m cProfile -o "$work/prof" -m bitsmith quantize "$work/model" \
        -o "$work/q" --device cuda --calib ../shared/assets/text/tinystories_calib.txt --nsamples 16 --seqlen 256 --no-mse
    $PY -c "import pstats, sys; p = pstats.Stats('$work/prof', stream=sys.stdout); p.sort_stats('tottime').print_stats(35);
p.sort_stats('cumtime').print_stats(45)" >"$OUT/profile.txt" 2>&1
    rm -rf "$work"
fi
grep -E "passed|failed|error|WRONG|Error" "$LOG" | tail -n 20
