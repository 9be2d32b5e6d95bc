#!/usr/bin/env bash
# The tests, install included: ruff, mypy and pytest on CPU (two workers), in a virtual environment
# (scripts/venv.sh). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
start=$SECONDS
python -m pip install -q --disable-pip-version-check -e '.[train,test]'
python -m ruff check .
python -m mypy
python -m pytest -q -n "${IMEDSAM_TEST_WORKERS:-2}" --durations=15 "$@"
took=$((SECONDS - start))
echo "scripts/test.sh took $((took / 60)) min $((took % 60)) s (install, ruff, mypy and pytest)"
