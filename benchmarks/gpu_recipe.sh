#!/usr/bin/env bash
# Lite training variants on a lent GPU, in parallel, then every best.pt scored, in one device call.
#
# Why on a GPU: an end-to-end lite epoch on Kvasir-Sessile train takes about 3 min on the 2-core CPU and a few
# seconds on an H200, so a recipe search (augmentation, epochs, learning rates) fits one call there.
# Carry the wheels (.whl, see gpu_lite.sh) and Kvasir-Sessile (copied from ../shared/data to .gpudata/, which
# git-ignored), about 50 MB:  carry [".whl", ".gpudata"], timeout about 560 s:
#     bash benchmarks/gpu_recipe.sh
# Each variant selects its best.pt on Kvasir-Sessile val (jittered boxes, as every lite run); each best.pt is
# then scored on val and on test (jittered 0-20 px seed 0 and tight boxes, at 256 and 896 px), the shipped model
# and zero-shot LiteMedSAM beside them. Pick on val; test is reported for all, never used to choose.
# $OUT/results.tgz: logs, eval JSONs and CSVs, every best.pt; $OUT/summary.txt: the tables.
set -o pipefail
OUT="${OUT:-runs/gpu_recipe}"
RES="${RES:-/tmp/gpu_recipe_res}"
DATA="${DATA:-.gpudata/Kvasir-Sessile}"
TRAIN_S="${TRAIN_S:-240}"
EVAL_S="${EVAL_S:-160}"
. benchmarks/gpu_env.sh  # S: the summary file
SHIP=imedsam_train/weights/imedsam_lite_kvasir.pt
BASE=(kvasir "$DATA" --model lite --batch-size 8 --points 2048 --device cuda --workers 0)
declare -A VARIANTS=(
    [aug]="--init-from $SHIP --decoder-epochs 0 --epochs 12 --lr-rest 1e-4 --augment"
    [plain]="--init-from $SHIP --decoder-epochs 0 --epochs 12 --lr-rest 1e-4 --no-augment"
    [aug-lo]="--init-from $SHIP --decoder-epochs 0 --epochs 12 --lr 3e-4 --lr-rest 5e-5 --augment"
    [aug24]="--init-from $SHIP --decoder-epochs 0 --epochs 24 --lr-rest 1e-4 --augment"
    [sess-aug]="--decoder-epochs 4 --epochs 12 --lr-rest 1e-4 --augment"
)
t0=$SECONDS
for v in "${!VARIANTS[@]}"; do
    # shellcheck disable=SC2086  # the variant's options are words
    timeout "$TRAIN_S" python3 -m imedsam_train.cli "${BASE[@]}" --name "$v" ${VARIANTS[$v]} >"$RES/train_$v.log" 2>&1 &
done
wait
echo "== training: $((SECONDS - t0)) s" | tee -a "$S"
for v in "${!VARIANTS[@]}"; do
    { echo "-- $v: ${VARIANTS[$v]}"; grep -E "^(epoch|done|Error|error)" "$RES/train_$v.log" | tail -n 30; } | tee -a "$S"
    mkdir -p "$RES/ck/$v" && cp "runs/$v/checkpoints/best.pt" "$RES/ck/$v/" 2>/dev/null
    cp "runs/$v/log.csv" "$RES/ck/$v/" 2>/dev/null
done
scores() {  # name, checkpoint, extra args: val and the four test settings, one after another
    local name=$1 ck=$2; shift 2
    local cfg sp jit size
    for cfg in "val 20 256" "test 20 256" "test 0 256" "test 20 896" "test 0 896"; do
        read -r sp jit size <<<"$cfg"
        timeout "$EVAL_S" python3 -m imedsam_train.eval_cli "$ck" --data "$DATA" --split "$DATA/splits/$sp.txt" \
            --box-jitter "$jit" --seed 0 --out-size "$size" --device cuda "$@" \
            --json "$RES/eval/${name}_${sp}_j${jit}_${size}.json" >"$RES/eval/${name}_${sp}_j${jit}_${size}.log" 2>&1
    done
}
mkdir -p "$RES/eval"
t0=$SECONDS
scores shipped "$SHIP" --baseline litemedsam &
for v in "${!VARIANTS[@]}"; do
    [ -f "$RES/ck/$v/best.pt" ] && scores "$v" "$RES/ck/$v/best.pt" &
done
wait
echo "== scoring: $((SECONDS - t0)) s" | tee -a "$S"
python3 - "$RES/eval" <<'PY' | tee -a "$S"
import json, sys
from pathlib import Path

rows = {}
for p in sorted(Path(sys.argv[1]).glob("*.json")):
    name, rest = p.stem.split("_", 1)
    s = json.loads(p.read_text())
    m = s["metrics"]
    rows.setdefault(name, {})[rest] = f"{m['dice']['mean']:.2f}/{m['hd95']['mean']:.2f}"
    if "litemedsam" in s.get("baseline_metrics", {}):
        b = s["baseline_metrics"]["litemedsam"]
        rows.setdefault("LiteMedSAM", {})[rest] = f"{b['dice']['mean']:.2f}/{b['hd95']['mean']:.2f}"
cols = ["val_j20_256", "test_j20_256", "test_j0_256", "test_j20_896", "test_j0_896"]
print("Dice/HD95 | " + " | ".join(cols))
for name, r in rows.items():
    print(f"{name} | " + " | ".join(r.get(c, "-") for c in cols))
PY
tar czf "$OUT/results.tgz" --exclude=cache -C "$(dirname "$RES")" "$(basename "$RES")"
cp "$S" "$OUT/summary.txt"
