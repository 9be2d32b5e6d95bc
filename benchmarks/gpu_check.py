"""One-call GPU check (H100 / H200): correctness and timing of our PyTorch CUDA path against the reference.

Run from the repository root, in one call, on a machine with a CUDA GPU:

    python -m benchmarks.gpu_check            # vit_b, random weights, 384^2 input; writes $OUT/gpu_check.json

What it does (every figure from this run, reference and ours interleaved on the same inputs):
1. correctness: the reference (released code's compute, eager fp32), our torch-cuda backend in fp32 and in
   bf16 (fp32 islands) and the fused one-graph forward, all at 384^2 on a real-looking image and box:
   pixel agreement inside the box and Dice against the reference;
2. timing, batch 1 / 8 / 32 and output 384^2 / 896^2: the reference (the released code runs batch 1, so a
   batch is a loop of single images), our backend path (encode, then chunked full-grid decode per image,
   CUDA graphs, bf16), and at batch 1 the fused path (encoder + decoder + UGS merge in ONE CUDA graph,
   mask left on the device). Device-side timing: CUDA events around each frame.
Prints a short table last. ``--device cpu --model tiny --quick`` exercises the same code on a CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _need(mod: str) -> None:
    try:
        __import__(mod)
    except ImportError as e:
        sys.exit(f"gpu_check: cannot import {mod} ({e}); install the repo with `pip install -e .[train]`")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--input-size", type=int, default=384)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 896])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--ref-repeat", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="few repeats (CPU dry run)")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    a = ap.parse_args(argv)
    for mod in ("torch", "segment_anything", "imedsam_train", "imedsam_export", "imedsam_deploy"):
        _need(mod)
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.reference import ReferenceIMedSAM
    from imedsam_deploy.backends.torch_cuda import TorchBackend
    from imedsam_deploy.bench import agreement, synthetic_inputs
    from imedsam_deploy.contract import refine_count
    from imedsam_deploy.preprocess import box_to_model, grid_coords, to_model_input
    from imedsam_train.build import build

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible to torch")
    if a.quick:
        a.repeat, a.ref_repeat = 2, 1
    cuda = dev.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the reference's precision)
    torch.backends.cudnn.allow_tf32 = False
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "device": torch.cuda.get_device_name(dev) if cuda else platform.processor(),
                            "model": a.model, "input_size": a.input_size, "weights": "random (seed 0)"}
    print(f"gpu_check: {info}", flush=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def timed(fn: Any) -> tuple[Any, float]:
        sync()
        if cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            out = fn()
            e1.record()
            e1.synchronize()
            return out, e0.elapsed_time(e1)
        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0) * 1e3

    torch.manual_seed(0)
    model, _ = build(a.model, input_size=a.input_size)
    model = model.eval()
    S = a.input_size
    maxb = max(a.batches)
    ours = {p: TorchBackend(model, a.device, p, max_batch=maxb, max_points=65536) for p in ("fp32", "bf16")}
    ref = ReferenceIMedSAM(model.to(dev))
    fraction = model.cfg.decoder.refine_fraction

    def ours_frame(be: TorchBackend, imgs: np.ndarray, boxes: np.ndarray, out: int) -> list[np.ndarray]:
        """Backend path: batched encode, then per image full-grid decode in chunks, global UGS merge."""
        embs = be.encode(imgs)
        coords = grid_coords(out, out)
        k = refine_count(out * out, fraction)
        masks = []
        for i, e in enumerate(embs):
            parts = [be.decode(e, boxes[i : i + 1], coords[None, s : s + be.max_points])
                     for s in range(0, len(coords), be.max_points)]
            c, f, u = (np.concatenate([p[j][0] for p in parts], axis=-1) for j in range(3))
            merged = c.copy()
            idx = np.argpartition(-u, k - 1, axis=1)[:, :k]
            np.put_along_axis(merged, idx, np.take_along_axis(f, idx, axis=1), axis=1)
            masks.append((merged > 0).reshape(-1, out, out))
        return masks

    def ref_frame(imgs: np.ndarray, boxes: np.ndarray, out: int) -> list[np.ndarray]:
        res = []
        for i in range(len(imgs)):  # the released code infers one image at a time
            x = torch.from_numpy(imgs[i : i + 1]).to(dev)
            lg = ref(x, torch.from_numpy(boxes[i : i + 1]).to(dev), (out, out))
            res.append((lg > 0).reshape(-1, out, out).cpu().numpy()[0:1].reshape(-1, out, out))
        return res

    # fused: encoder + full-grid decoder + on-device UGS merge in one CUDA graph (batch 1)
    be16 = ours["bf16"]
    def fused_fn(img: Any, box: Any, coords: Any) -> Any:
        emb = be16.model.encode(img)
        c, f, u = be16.decoder(emb, box, coords)
        k = refine_count(coords.shape[1], fraction)
        idx = u.float().topk(k, dim=-1).indices
        return c.float().scatter(-1, idx, f.float().gather(-1, idx)) > 0

    def fused(img_np: np.ndarray, box_np: np.ndarray, out: int) -> Any:
        coords = torch.from_numpy(grid_coords(out, out))[None].to(dev)
        x, b = torch.from_numpy(img_np).to(dev), torch.from_numpy(box_np).to(dev)
        return be16._run(("fused", out), fused_fn, [x, b, coords])

    results: list[dict[str, Any]] = []
    # ---- 1. correctness at the input size
    inp = synthetic_inputs(S, 1, seed=1)
    imgs = np.stack([to_model_input(im, S) for im in inp.images])
    boxes = np.concatenate([box_to_model(b[None], im.shape[:2], S) for b, im in zip(inp.boxes, inp.images, strict=True)])
    r_mask = ref_frame(imgs, boxes, S)[0]
    checks: dict[str, Any] = {}
    for p, be in ours.items():
        m = ours_frame(be, imgs, boxes, S)[0]
        checks[f"backend_{p}"] = agreement(m, r_mask, inp.boxes[0], inp.images[0].shape[:2])
    fm = fused(imgs, boxes, S).reshape(-1, S, S).cpu().numpy()
    checks["fused_bf16"] = agreement(fm, r_mask, inp.boxes[0], inp.images[0].shape[:2])
    for k, v in checks.items():
        print(f"correctness {k}: in-box agreement {100 * v['pixel_in_box']:.3f}%, all {100 * v['pixel_all']:.3f}%, "
              f"Dice {v['dice']:.4f}", flush=True)

    # ---- 2. timing
    for out in a.sizes:
        for bsz in a.batches:
            inp = synthetic_inputs(S, bsz, seed=2)
            imgs = np.stack([to_model_input(im, S) for im in inp.images])
            boxes = np.concatenate([box_to_model(b[None], im.shape[:2], S)
                                    for b, im in zip(inp.boxes, inp.images, strict=True)])
            row: dict[str, Any] = {"out_size": out, "batch": bsz}
            t_ours: list[float] = []
            t_fused: list[float] = []
            t_ref: list[float] = []
            try:
                for _w in range(2):  # warm-up (graph capture) for ours
                    ours_frame(be16, imgs, boxes, out)
                    if bsz == 1:
                        fused(imgs, boxes, out)
                ref_frame(imgs[:1], boxes[:1], out)
                run_ours = functools.partial(ours_frame, be16, imgs, boxes, out)
                run_fused = functools.partial(fused, imgs, boxes, out)
                run_ref = functools.partial(ref_frame, imgs, boxes, out)
                for i in range(a.repeat):
                    t_ours.append(timed(run_ours)[1])
                    if bsz == 1:
                        t_fused.append(timed(run_fused)[1])
                    if i < a.ref_repeat:
                        t_ref.append(timed(run_ref)[1])
            except torch.OutOfMemoryError as e:  # report, keep going
                row["error"] = f"out of memory: {str(e).splitlines()[0]}"
                torch.cuda.empty_cache()
            for name, ts in (("ours_backend_bf16", t_ours), ("ours_fused_bf16", t_fused), ("reference_fp32", t_ref)):
                if ts:
                    row[name] = {"p50_ms": float(np.median(ts)), "min_ms": float(np.min(ts)),
                                 "per_image_ms": float(np.median(ts)) / bsz, "n": len(ts)}
            if t_ref and t_ours:
                row["speedup_backend"] = row["reference_fp32"]["p50_ms"] / row["ours_backend_bf16"]["p50_ms"]
            if t_ref and t_fused:
                row["speedup_fused"] = row["reference_fp32"]["p50_ms"] / row["ours_fused_bf16"]["p50_ms"]
            if cuda:
                row["gpu_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
            results.append(row)
            print(f"timing {json.dumps(row)}", flush=True)

    report = {"info": info, "correctness": checks, "timing": results,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")

    print(f"\n== gpu_check on {info['device']} ({a.model}, {S}^2 input, random weights) ==")
    print(f"{'out':>5} {'batch':>5} {'reference ms':>13} {'ours ms':>9} {'fused ms':>9} {'x ref':>7} {'x fused':>8}")
    def g(r: dict[str, Any], key: str) -> str:
        return f"{r[key]['p50_ms']:.2f}" if key in r else "-"

    for r in results:
        sb = f"{r['speedup_backend']:.1f}" if "speedup_backend" in r else "-"
        sf = f"{r['speedup_fused']:.1f}" if "speedup_fused" in r else "-"
        print(f"{r['out_size']:>5} {r['batch']:>5} {g(r, 'reference_fp32'):>13} {g(r, 'ours_backend_bf16'):>9} "
              f"{g(r, 'ours_fused_bf16'):>9} {sb:>7} {sf:>8}{'  ' + r['error'] if 'error' in r else ''}")
    for k, v in checks.items():
        print(f"agreement {k}: {100 * v['pixel_in_box']:.3f}% in box, Dice {v['dice']:.4f}")
    print(f"wrote {out_dir / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
