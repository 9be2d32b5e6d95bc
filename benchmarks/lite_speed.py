"""A lite artifact through the runtime against zero-shot LiteMedSAM's eager PyTorch pipeline, same images and
boxes, same run, on the CPU.

    python -m benchmarks.lite_speed --artifact DIR --data ../shared/data/Kvasir-Sessile \
        [--split .../splits/test.txt] [--limit 12] [--threads 2] [--json FILE] [--tta] [--bound] \
        [--backend ort-cpu|ov-cpu] [--precision fp32|bf16|int8]

Per image (its ground-truth mask's tight box, the output at the image's own size), interleaved, the order
alternating per image: LiteMedSAM (``imedsam_train.pretrained.LiteMedSAMBaseline``: preprocess, TinyViT,
prompt encoder and mask decoder, crop and resize, threshold) and ``imedsam-infer``'s ``Segmenter`` on ONNX
Runtime CPU (or ``--backend ov-cpu``: OpenVINO, bf16 where the CPU has AMX) in the ``sparse`` query mode
(resize, min-max, encoder, decoder, planner, mask), each end to end from the RGB array to the mask. Then,
untimed, the artifact in the ``full`` query mode (the export's reference, ONNX Runtime fp32 whatever
``--backend``): the sparse masks' Dice and pixel agreement against it. One warm-up image for each first.
``--tta``: ours (and its full-grid reference) with ``imedsam-infer --tta``'s mirrored average.
Prints a table and writes every per-image figure to --json.

``--bound`` adds what this CPU allows: the encoders' floating-point work (``torch.utils.flop_counter``: LiteMedSAM's
TinyViT, and the lite model's encoder with its frequency adapter and LoRA), the machine's fp32 matrix-multiply
rate on the same threads (the best of 5 2048^3 products), and from them the fastest our frame could be if the
encoder alone ran at that rate, so the highest speed-up over LiteMedSAM's measured frame that fp32 allows here
(with nothing else in our frame, and with the rest of our frame as measured).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True, help="a lite artifact folder (imedsam-export)")
    ap.add_argument("--data", type=Path, required=True, help="folder with images/ and masks/")
    ap.add_argument("--split", type=Path, default=None, help="file of stems (default: data/splits/test.txt)")
    ap.add_argument("--limit", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--bound", action="store_true", help="add the fp32 compute bound of this CPU (see above)")
    ap.add_argument("--tta", action="store_true", help="ours with the mirrored average (imedsam-infer --tta)")
    ap.add_argument("--backend", choices=("ort-cpu", "ov-cpu"), default="ort-cpu", help="ours on this backend")
    ap.add_argument("--precision", default=None, help="ours at this precision (default: the backend's)")
    a = ap.parse_args(argv)

    from imedsam_core import malloc

    malloc.keep_freed_memory()  # LiteMedSAM's eager pipeline as our torch commands run it (a faster reference)
    import torch

    from imedsam_core.atomic import atomic_write_text
    from imedsam_deploy.backends import open_backend
    from imedsam_deploy.backends.ort import OrtBackend
    from imedsam_deploy.manifest import load_artifact
    from imedsam_deploy.runtime import Segmenter
    from imedsam_train.data.boxes import mask_box
    from imedsam_train.data.folder import read_pair
    from imedsam_train.metrics import dice
    from imedsam_train.pretrained import LiteMedSAMBaseline, lite_medsam

    torch.set_num_threads(a.threads)
    art = load_artifact(a.artifact)
    mine: Any = open_backend(a.backend, art, a.precision, threads=a.threads)[0]  # as imedsam-infer opens it
    print(f"ours: {mine.description}", file=sys.stderr)
    ours = Segmenter(mine, art, query="sparse", tta=a.tta)
    full = Segmenter(OrtBackend(art, "cpu", "fp32", threads=a.threads), art, query="full", tta=a.tta)
    base = LiteMedSAMBaseline(lite_medsam())
    split = a.split or a.data / "splits" / "test.txt"
    stems = split.read_text().split()[: a.limit + 1]
    rows = []

    # (LiteMedSAMBaseline reuses an embedding only for the same array: each image here is new)
    def run_base(rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        return (base.logits(rgb, box[None], rgb.shape[:2])[0] > 0).numpy()

    encode_ms: list[float] = []
    warmed_up = False

    def run_ours(rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        res = ours.segment(rgb, box[None])
        encode_ms.append(res.encode_ms)
        return res.objects[0].mask()

    for i, stem in enumerate(stems):
        rgb, gt = read_pair(a.data, stem)
        box = mask_box(gt)
        if box is None:  # no polyp in this case: nothing to prompt
            continue
        times: dict[str, float] = {}
        masks: dict[str, np.ndarray] = {}
        order = [("litemedsam", run_base), ("ours", run_ours)]
        for name, fn in order if i % 2 == 0 else order[::-1]:
            t = time.perf_counter()
            masks[name] = fn(rgb, box)
            times[name] = time.perf_counter() - t
        ref = full.segment(rgb, box[None]).objects[0].mask()
        if not warmed_up:  # the first case run (not stem 0, which may have been skipped) warms both pipelines
            warmed_up = True
            continue
        row = {"stem": stem, "hw": list(rgb.shape[:2]), "seconds": times, "ours_encode_seconds": encode_ms[-1] / 1e3,
               "dice_gt": {k: dice(m, gt) for k, m in masks.items()},
               "ours_vs_full": {"dice": dice(masks["ours"], ref), "pixels": float((masks["ours"] == ref).mean())}}
        rows.append(row)
        print(f"{stem}: litemedsam {times['litemedsam']:.3f}s ours {times['ours']:.3f}s", file=sys.stderr)
    med = {k: statistics.median(r["seconds"][k] for r in rows) for k in ("litemedsam", "ours")}
    summary = {
        "images": len(rows), "threads": a.threads, "artifact": str(a.artifact), "tta": a.tta, "malloc": malloc.state,
        "backend": mine.description,
        "median_seconds": med, "speedup": med["litemedsam"] / med["ours"],
        "ours_encode_median_seconds": statistics.median(r["ours_encode_seconds"] for r in rows),
        "dice_gt_mean": {k: statistics.mean(r["dice_gt"][k] for r in rows) for k in ("litemedsam", "ours")},
        "ours_sparse_vs_full_dice_mean": statistics.mean(r["ours_vs_full"]["dice"] for r in rows),
        "ours_sparse_vs_full_dice_min": min(r["ours_vs_full"]["dice"] for r in rows),
        "ours_sparse_vs_full_pixels_mean": statistics.mean(r["ours_vs_full"]["pixels"] for r in rows),
    }
    if a.bound:
        summary["bound"] = compute_bound(base, med["litemedsam"], med["ours"] - summary["ours_encode_median_seconds"])
    if a.json:
        atomic_write_text(a.json, json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
    print(f"{'pipeline':<34}{'median s/frame':>15}{'Dice vs GT':>12}")
    print(f"{'LiteMedSAM, eager PyTorch':<34}{med['litemedsam']:>15.3f}{summary['dice_gt_mean']['litemedsam']:>12.2f}")
    print(f"{'lite, ' + mine.name + ' ' + mine.precision + ', sparse' + (', tta' if a.tta else ''):<34}{med['ours']:>15.3f}{summary['dice_gt_mean']['ours']:>12.2f}")
    print(f"speed-up {summary['speedup']:.2f}x on {len(rows)} images, {a.threads} threads; sparse vs full: "
          f"Dice {summary['ours_sparse_vs_full_dice_mean']:.3f} (min {summary['ours_sparse_vs_full_dice_min']:.3f}), "
          f"pixels {100 * summary['ours_sparse_vs_full_pixels_mean']:.3f}%; our encoder "
          f"{summary['ours_encode_median_seconds']:.3f} s of our frame")
    if a.bound:
        b = summary["bound"]
        print(f"fp32 bound: encoders {b['litemedsam_encoder_gflop']:.1f} / {b['lite_encoder_gflop']:.1f} GFLOP "
              f"(LiteMedSAM / ours), matmul {b['matmul_gflops']:.0f} GFLOP/s on {a.threads} threads: our encoder "
              f"takes at least {b['lite_encoder_floor_seconds']:.3f} s, so at most {b['max_speedup']:.2f}x; with the "
              f"rest of our frame as measured, at most {b['max_speedup_with_rest']:.2f}x")
    return 0


def compute_bound(base: object, litemedsam_seconds: float, rest_seconds: float) -> dict[str, float]:
    """The encoders' FLOPs and this CPU's fp32 matmul rate (see the module docstring); ``rest_seconds``: the
    measured part of our frame outside the encoder (decoder, planner, pre- and post-processing)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from imedsam_train.build import build

    def gflop(fn: object, x: torch.Tensor) -> float:
        fc = FlopCounterMode(display=False)
        with torch.no_grad(), fc:
            fn(x)  # type: ignore[operator]
        return float(fc.get_total_flops()) / 1e9

    x = torch.rand(1, 3, 256, 256)
    lite, _ = build("lite", input_size=256)
    theirs = gflop(base.model.image_encoder, x)  # type: ignore[attr-defined]
    ours = gflop(lite.eval().encode, x)
    a = torch.rand(2048, 2048)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        torch.mm(a, a)
        best = min(best, time.perf_counter() - t)
    rate = 2 * 2048**3 / best / 1e9
    return {"litemedsam_encoder_gflop": theirs, "lite_encoder_gflop": ours, "matmul_gflops": rate,
            "lite_encoder_floor_seconds": ours / rate, "max_speedup": litemedsam_seconds / (ours / rate),
            "max_speedup_with_rest": litemedsam_seconds / (ours / rate + rest_seconds)}


if __name__ == "__main__":
    sys.exit(main())
