#!/usr/bin/env bash
# The GPU run of the benchmarks (docs/benchmarks.md), meant to be run once, from the repository root:
#
#     bash bench/gpu_run.sh        # results in $OUT/bench (bench/results/bench without $OUT)
#
# It uses the machine's own python3 and torch (no .venv there). Packages dad_core needs that are missing (or a timm
# older than open_clip accepts) are installed with --no-deps at the versions pinned in requirements.lock.txt, into
# a scratch folder put on PYTHONPATH: from bench/wheels when that folder came along (the GPU machines reach no
# package index; fill it as docs/benchmarks.md says), else from the index. Then bench/run_all.py --full, with the
# torch.compile rows while the budget lasts; every step rewrites the JSONs and summary.md, so a run stopped at the
# hard limit keeps what it finished; bench/throughput.py (issue 15's rows) runs before it. $OUT/bench gets 8 files,
# the device tool's most: versions.txt, log.txt, throughput.json, the three benchmark JSONs, summary.json and
# summary.md. Knobs: BUDGET_S (default 240), HARD_LIMIT_S (330), COMPILE (1; 0 = no compile rows), FULL (1; 0 =
# tiny configurations, to try the script on a CPU), RUN_ALL_ARGS (appended), PYTHON (python3), RESULTS (the output
# folder, default $OUT/bench), THROUGHPUT (1; 0 = skip bench/throughput.py), THROUGHPUT_ARGS (replace its default
# --shards 50), THROUGHPUT_LIMIT_S (180), RUN_ALL (1; 0 = skip run_all: a later command runs single benchmarks with
# PYTHONPATH=/tmp/dad-bench-site).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS="${RESULTS:-${OUT:-$PWD/bench/results}/bench}"
SITE=/tmp/dad-bench-site
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RESULTS"

missing=$("$PY" - <<'EOF'
import importlib.metadata as md
import re

from packaging.version import Version

pins = {}
for line in open("requirements.lock.txt"):
    m = re.match(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
    if m:
        pins[m.group(1).lower().replace("-", "_")] = m.group(2)
# what `import dad_core` + the benchmarks need beyond torch/torchvision, and the lowest version that works
need = {"open_clip_torch": None, "diffusers": None, "ftfy": None, "wcwidth": None, "importlib_metadata": None,
        "timm": "1.0.17", "huggingface_hub": "1.32.0", "safetensors": "0.8.0", "pyyaml": None, "tqdm": None,
        "regex": None}
out = []
for name, lowest in need.items():
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        have = None
    if have is None or (lowest and Version(have) < Version(lowest)):
        out.append(f"{name}=={pins[name]}")
print(" ".join(out))
EOF
)
if [ -n "$missing" ]; then
    echo "installing (--no-deps, lock pins): $missing"
    if [ -d bench/wheels ] && ls bench/wheels/*.whl >/dev/null 2>&1; then
        src=(--no-index --find-links bench/wheels)
    else
        src=()
    fi
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-deps --no-compile --no-cache-dir --target "$SITE" "${src[@]}" $missing \
        || { echo "error: could not install $missing (carry bench/wheels: see docs/benchmarks.md)"; exit 2; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PY" - <<'EOF' | tee "$RESULTS/versions.txt"
import platform

import torch

print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| cudnn", torch.backends.cudnn.version())
print("gpu", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NONE")
for name in ("timm", "open_clip", "diffusers", "numpy"):
    try:
        module = __import__(name)
        print(name, module.__version__, module.__file__)
    except Exception as err:  # keep going: run_all records which benchmark fails and why
        print(name, "IMPORT FAILED:", type(err).__name__, err)
EOF

# Issue 15's before/after rows first (cache open lazy vs full, loader CPU per image without and with RandAugment,
# quantizer) with the view replay (and the tensor RandAugment) timed on the GPU: about a minute on 50 shards, and the
# rows no earlier GPU run measured. THROUGHPUT=0 skips it, THROUGHPUT_LIMIT_S bounds it.
if [ "${THROUGHPUT:-1}" = "1" ]; then
    # shellcheck disable=SC2086
    timeout -s INT "${THROUGHPUT_LIMIT_S:-180}" "$PY" bench/throughput.py ${THROUGHPUT_ARGS:---shards 50} \
        --json "$RESULTS/throughput.json" 2>&1 | tee "$RESULTS/log.txt"
    throughput_rc=${PIPESTATUS[0]}
    [ "$throughput_rc" = "0" ] || echo "bench/throughput.py exit code $throughput_rc (124 or 130: stopped at its limit)"
fi

[ "${RUN_ALL:-1}" = "0" ] && exit "${throughput_rc:-0}"
flags=(--full --compile)
[ "${FULL:-1}" = "0" ] && flags=("${flags[@]/--full}")
[ "${COMPILE:-1}" = "0" ] && flags=("${flags[@]/--compile}")
# shellcheck disable=SC2086
timeout -s INT "${HARD_LIMIT_S:-330}" "$PY" -m bench.run_all ${flags[*]} --budget-s "${BUDGET_S:-240}" \
    --json-dir "$RESULTS" ${RUN_ALL_ARGS:-} 2>&1 | tee -a "$RESULTS/log.txt"
rc=${PIPESTATUS[0]}
echo "run_all exit code $rc (124 or 130: stopped at the hard limit; finished steps are in $RESULTS)"
cat "$RESULTS/summary.md" 2>/dev/null
exit "$rc"
