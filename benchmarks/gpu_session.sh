#!/usr/bin/env bash
# The whole GPU check in one device call (H100 / H200 lent by the device tool; no network there).
#
# The device image has torch, torchvision, numpy and OpenCV but not segment-anything, which the model code
# imports: carry its wheel. Here, once, from the repository root (.whl/ is git-ignored):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_17_x86_64 -d .whl segment-anything==1.0
# then run this script with carry [".whl"] and a timeout of 600 s:
#     bash benchmarks/gpu_session.sh                 # extra arguments go to benchmarks/gpu_check.py
#     BENCH_S=0 bash benchmarks/gpu_session.sh --compile only  # a second call, if the first ran out of budget
# It prints gpu_check's table, then imedsam-bench's (torch-cuda tuned on this card with --tune, then against the
# reference, as a user runs it), and leaves gpu_check.json/.log, gpu.txt, bench.json/.log, bench/bench.{csv,png}
# and the tuning (cache/tuning/*.json) under $OUT.
set -o pipefail
OUT="${OUT:-runs/gpu_session}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true; \
  python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"; } | tee "$OUT/gpu.txt"
python3 -m benchmarks.gpu_check --out "$OUT" --budget-s "${BUDGET_S:-390}" "$@" 2>&1 | tee "$OUT/gpu_check.log"
rc=$?
# the product's own benchmark, as a user runs it (torch-cuda alone: the model in process, nothing exported), its
# switchable options first tuned on this card (--tune: on full 384² frames; the tuning is kept under $OUT/cache);
# BENCH_S=0 leaves it out (a second, short call)
if [ "${BENCH_S:-140}" -gt 0 ]; then
    IMEDSAM_CACHE="$OUT/cache" timeout "${BENCH_S:-140}" python3 -c 'from imedsam_deploy.cli_bench import main; main()' \
        --model "${MODEL:-vit_b}" --backend torch-cuda --tune --reference --batch 1 --out-size 384 --out-size 896 \
        --query full --query sparse --warmup 3 --repeat 20 --out "$OUT/bench" --json "$OUT/bench.json" 2>&1 \
        | tail -n 45 | tee "$OUT/bench.log"
fi
exit $rc
