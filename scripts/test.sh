#!/usr/bin/env bash
# Install everything the tests need, then lint, type-check and run the test suite (CPU only).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -e '.[train,test]'
python -m ruff check .
python -m mypy
python -m pytest -q "$@"
