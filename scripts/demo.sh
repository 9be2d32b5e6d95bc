#!/usr/bin/env bash
# The main job on the bundled real sample (data/sample/kvasir-sessile: 40 Kvasir-Sessile pairs):
# install; train a tiny model for a few epochs (to show the loop); evaluate (beside zero-shot LiteMedSAM),
# export, infer and benchmark the shipped trained lite model (I-MedSAM on LiteMedSAM) on real images. Everything lands in runs/demo*/. Runs in a virtual
# environment (scripts/venv.sh: the active one, else ./.venv).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
python "${PIP_INSTALL[@]}" -e '.[train]'

SAMPLE=data/sample/kvasir-sessile
SHIPPED=$(python -c "from imedsam_train.weights import shipped_checkpoint; print(shipped_checkpoint())")
OUT=runs/demo
mkdir -p "$OUT"

echo "== 1/5 train: tiny model, 3 epochs on the sample (a demonstration of the loop, not a result)"
# Trained from inside runs/demo, so the run lands in runs/demo/runs/demo-train: outside ./runs/<name>/, where the
# commands look for a default model, so this throwaway never becomes one.
TRAIN_RUN=runs/demo/runs/demo-train
# a run folder from an earlier demo is the likely cause of a failure only if it was there before this step
HAD_RUN=$([ -e "$TRAIN_RUN" ] && echo 1 || true)
(cd "$OUT" && imedsam-train folder "$OLDPWD/$SAMPLE" --name demo-train --model tiny --input-size 128 --epochs 3 \
  --batch-size 4 --points 1024 --seed 0 --threads 2 ${DEMO_RESUME:+--resume}) || {
  rc=$?
  if [ -n "$HAD_RUN" ] && [ -z "${DEMO_RESUME:-}" ]; then
    echo "($TRAIN_RUN exists from an earlier demo: rerun with DEMO_RESUME=1 or remove it)"
  fi
  exit $rc; }

# 8 images downscaled to 320 px: a demonstration. The paired line says whether a margin is one the cases establish;
# benchmarks/RESULTS.md has the full test set, at its own resolution and at 320 px.
echo "== 2/5 evaluate the shipped model on the sample's test split, jittered boxes, beside the baselines"
imedsam-eval "$SHIPPED" --data "$SAMPLE" --split "$SAMPLE/splits/test.txt" --box-jitter 20 --seed 0 \
  --baseline litemedsam --json "$OUT/eval.json"

echo "== 3/5 export the shipped model (ONNX, fp32 + fp16, verified against PyTorch on real images)"
imedsam-export "$SHIPPED" --out "$OUT/export" --fp16 --max-points 65536 --batch 4 --force

echo "== 4/5 infer on the sample's test images (boxes from their masks, as a detector would give)"
python - "$SAMPLE" "$OUT/boxes.json" <<'PY'
import json, sys
from pathlib import Path
import cv2
import numpy as np
root, out = Path(sys.argv[1]), Path(sys.argv[2])
boxes = {}
for stem in (root / "splits" / "test.txt").read_text().split():
    m = cv2.imread(str(root / "masks" / f"{stem}.png"), cv2.IMREAD_GRAYSCALE) > 127
    ys, xs = np.nonzero(m)
    boxes[f"{stem}.jpg"] = [[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]]
out.write_text(json.dumps(boxes, indent=1))
PY
mkdir -p "$OUT/test-images"
for f in $(cat "$SAMPLE/splits/test.txt"); do cp "$SAMPLE/images/$f.jpg" "$OUT/test-images/"; done
# the default backend (auto: the fastest this machine has), as a user would run it
imedsam-infer "$OUT/test-images" --boxes "$OUT/boxes.json" --artifact "$OUT/export" --out "$OUT/infer" --force

echo "== 5/5 benchmark the exported model (every available backend)"
imedsam-bench "$OUT/export" --repeat 5 --out "$OUT/bench"

echo "done: $TRAIN_RUN/ (the training loop), $OUT/eval.json, $OUT/export/, $OUT/infer/ (masks, overlays, results.csv), $OUT/bench/"
