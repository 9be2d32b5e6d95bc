#!/usr/bin/env bash
# The main job on the bundled real sample: install, then model report (training, export, inference and
# benchmarks join as they land).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -e '.[train]'
imedsam-train info tiny
