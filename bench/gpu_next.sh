#!/usr/bin/env bash
# The next GPU run (docs/benchmarks.md, "The next GPU run"): what no GPU has measured yet, in one device call that
# fits one session's device time (device tool: carry ["bench/wheels"], timeout_s 590), from the repository root:
#
#     bash bench/gpu_next.sh       # results in $OUT/bench (bench/results/bench without $OUT)
#
# 1. bench/gpu_run.sh with RUN_ALL=0 THROUGHPUT=0: installs what the machine lacks from bench/wheels (pytest too, for
#    the GPU-tier tests) and writes versions.txt;
# 2. the training rows of issue 15's target (plain, cached-replay, cached-replay-randaugment), training.json;
# 3. RandAugment's ops and the whole replay step, with its device ops and its distance from the CPU's pixels, on 9
#    and on 43 images a group (ops9.json, ops43.json);
# 4. the GPU-tier tests of the replay (no sync in the step, the CPU's pixels up to rounding), in log.txt;
# 5. generation with CUDA graphs, then with max-autotune, each beside the naive bf16 step (gen-cudagraphs.json,
#    gen-autotune.json), under what is left of the 565 s.
# Each step has its own limit and JSON, so a step stopped at its limit loses only itself; log.txt has every step's
# output and exit code (124: stopped at its limit; 137: killed 10 s after it). FULL=0 tries the script on a CPU with
# the tiny configurations (the GPU tests then skip); PYTHON picks the interpreter (python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }
R="${RESULTS:-${OUT:-$PWD/bench/results}/bench}"
mkdir -p "$R"
LOG=$R/log.txt
SITE=/tmp/dad-bench-site

echo "== the install (limit 120 s)" >"$LOG"
RUN_ALL=0 THROUGHPUT=0 RESULTS=$R PYTHON=$PY timeout -k 5 120 bash bench/gpu_run.sh >>"$LOG" 2>&1
echo "exit code $?" >>"$LOG"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import pytest" 2>/dev/null && ls bench/wheels/pytest-*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-deps --no-compile --no-cache-dir --target "$SITE" --no-index \
        --find-links bench/wheels pytest pluggy iniconfig pygments >>"$LOG" 2>&1
fi

full=(--full)
ops=()
if [ "${FULL:-1}" = "0" ]; then
    full=()
    ops=(--size 32 --batch 16 --iters 1 --chain 1)
fi
step() {  # step LIMIT_S COMMAND...: run it under its limit, its output and exit code into the log
    local limit=$1
    shift
    echo "== at $(elapsed) s, limit $limit s: $*" >>"$LOG"
    if [ "$limit" -lt 10 ]; then
        echo "skipped: no time left" >>"$LOG"
        return
    fi
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1  # and killed 10 s later if it ignores the signal
    echo "exit code $?" >>"$LOG"
}
step 170 "$PY" bench/training.py "${full[@]}" --rows plain,cached-replay,cached-replay-randaugment \
    --json "$R/training.json"
step 45 "$PY" bench/randaugment_ops.py "${ops[@]}" --json "$R/ops9.json"
step 30 "$PY" bench/randaugment_ops.py "${ops[@]}" --images 43 --json "$R/ops43.json"
step 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "device_replay or device_resize"
step $((330 - $(elapsed))) "$PY" bench/generation.py "${full[@]}" --rows naive-bf16,product-bf16-cudagraphs \
    --json "$R/gen-cudagraphs.json"
step $((565 - $(elapsed))) "$PY" bench/generation.py "${full[@]}" --rows naive-bf16,product-bf16-autotune \
    --json "$R/gen-autotune.json"
echo "== done at $(elapsed) s" >>"$LOG"
grep -E "^== |^exit code|passed|failed|skipped" "$LOG"
