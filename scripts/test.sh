#!/usr/bin/env bash
# The tests, install included: ruff, mypy and pytest on CPU (two workers), in a virtual environment
# (scripts/venv.sh). Then the serving tests in an environment of their own (.venv-serve): the serve extra's
# PyTriton pins numpy < 2, which the training extra's packages do not take. Extra arguments go to the main
# pytest run, and then the serving tests run only if they are named.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
start=$SECONDS
python "${PIP_INSTALL[@]}" -e '.[train,test]'
if [ $# -eq 0 ]; then
  # the serving environment installs while ruff and mypy run (mypy keeps one core busy), after the main
  # install, so the two editable builds never write imedsam.egg-info at once
  [ -x .venv-serve/bin/python ] || python -m venv .venv-serve
  serve_log=$(mktemp)
  .venv-serve/bin/python "${PIP_INSTALL[@]}" -e '.[serve]' 'pytest>=8,<10' > "$serve_log" 2>&1 &
  serve_pid=$!  # pip itself, so a failed run stops it
  trap 'kill "$serve_pid" 2>/dev/null || true; rm -f "$serve_log"' EXIT
fi
python -m ruff check .
python -m mypy
if [ $# -eq 0 ]; then
  python -m pytest -q -n "${IMEDSAM_TEST_WORKERS:-2}" --dist loadscope --durations=15 --ignore=tests/test_serve.py
  main=$((SECONDS - start))
  wait "$serve_pid" || { cat "$serve_log" >&2; echo "scripts/test.sh: installing .venv-serve failed" >&2; exit 1; }
  .venv-serve/bin/python -m pytest -q -p no:cacheprovider tests/test_serve.py
else
  python -m pytest -q -n "${IMEDSAM_TEST_WORKERS:-2}" --dist loadscope "$@"
  main=$((SECONDS - start))
fi
took=$((SECONDS - start))
echo "scripts/test.sh took $((took / 60)) min $((took % 60)) s ($((main / 60)) min $((main % 60)) s to the end of the main run)"
