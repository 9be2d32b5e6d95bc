"""Agreement of the sparse planner (imedsam_deploy/sparse.py) with the full-grid output on real images.

    python -m benchmarks.sparse_agreement CHECKPOINT --data DIR [--split FILE] [--out-size 384] [--limit 39]
    python -m benchmarks.sparse_agreement --artifact DIR --data DIR [--split FILE] [--out-size N]

With ``--artifact`` it measures what ``imedsam-infer`` does instead: the ONNX Runtime CPU backend's
``--query sparse`` and ``box`` against ``--query full`` on whole images at their own size (as the CLI's default), each
image's full mask compared (every pixel, the box's pixels, Dice) and both modes timed (encoder + decoder).

For each image (its ground-truth mask gives the tight box): the exact full-grid output (global UGS top-K),
restricted to the box + margin region the runtime queries, against the sparse planner at several strides.
Reports the pixel agreement inside the box (min / mean over images), the Dice between the two masks and the
fraction of the region's pixels the planner queried. The decoder is the PyTorch model's ``decode_dense``
(the function the exported decoder computes), so this measures the planner, not a backend.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, nargs="?", default=None)
    ap.add_argument("--artifact", type=Path, default=None, help="measure the runtime (ort-cpu) on this artifact")
    ap.add_argument("--data", type=Path, required=True, help="folder with images/ and masks/")
    ap.add_argument("--split", type=Path, default=None, help="file of stems, one a line")
    ap.add_argument("--out-size", type=int, default=None, help="[384; --artifact: each image's own size]")
    ap.add_argument("--strides", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--margin", type=float, default=0.25, help="box margin as a fraction of the box")
    ap.add_argument("--limit", type=int, default=39)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.artifact is not None:
        return runtime_agreement(a)
    if a.checkpoint is None:
        ap.error("give CHECKPOINT or --artifact DIR")
    a.out_size = a.out_size or 384

    import torch

    from imedsam_core.atomic import atomic_write_text
    from imedsam_deploy.preprocess import box_region, box_to_model, to_model_input
    from imedsam_deploy.sparse import SparseConfig, dense_decode, sparse_decode
    from imedsam_train.checkpoint import load_checkpoint
    from imedsam_train.data.boxes import mask_box
    from imedsam_train.data.folder import read_pair
    from imedsam_train.metrics import dice

    torch.set_num_threads(2)
    model, _ = load_checkpoint(a.checkpoint)
    s = model.cfg.input_size
    frac = model.cfg.decoder.refine_fraction
    stems = _stems(a)
    osz = a.out_size
    rows = []
    for stem in stems:
        rgb, gt = read_pair(a.data, stem)
        box = mask_box(gt)
        if box is None:
            continue
        h, w = gt.shape
        with torch.no_grad():
            emb = model.encode(torch.from_numpy(to_model_input(rgb, s))[None])
        mbox = torch.from_numpy(box_to_model(box[None], (h, w), s))

        def decode(coords: np.ndarray, emb: torch.Tensor = emb, mbox: torch.Tensor = mbox
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            with torch.no_grad():
                c, f, u = model.decode_dense(emb, mbox, torch.from_numpy(coords)[None])
            return c[0].numpy(), f[0].numpy(), u[0].numpy()

        reg = box_region(box, (h, w), (osz, osz), a.margin)
        region = (reg.r0, reg.r1, reg.c0, reg.c1)
        dense = dense_decode(decode, (osz, osz), frac, region)
        ib = _in_box(box, (h, w), (osz, osz))
        row = {"stem": stem, "box_fraction": float((box[2] - box[0]) * (box[3] - box[1]) / (h * w)),
               "region_fraction": reg.size / osz**2}
        for st in a.strides:
            res = sparse_decode(decode, (osz, osz), frac, region, SparseConfig(stride=st))
            row[f"s{st}"] = {
                "in_box": float((res.mask[(..., *ib)] == dense[(..., *ib)]).mean()),
                "dice": dice(res.mask, dense) / 100,  # a fraction here, as the planner's other figures
                "queried_of_region": res.queried / max(1, reg.size),
                "queried_of_image": res.queried / osz**2,
            }
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {"checkpoint": str(a.checkpoint), "images": len(rows), "out_size": osz, "margin": a.margin}
    for st in a.strides:
        ib = np.array([r[f"s{st}"]["in_box"] for r in rows])
        summary[f"s{st}"] = {
            "in_box_mean": float(ib.mean()), "in_box_min": float(ib.min()),
            "images_below_99.5": int((ib < 0.995).sum()),
            "dice_mean": float(np.mean([r[f"s{st}"]["dice"] for r in rows])),
            "queried_of_region_mean": float(np.mean([r[f"s{st}"]["queried_of_region"] for r in rows])),
            "queried_of_image_mean": float(np.mean([r[f"s{st}"]["queried_of_image"] for r in rows])),
        }
    summary["region_fraction_mean"] = float(np.mean([r["region_fraction"] for r in rows]))
    print(json.dumps(summary, indent=1))
    if a.json:
        atomic_write_text(a.json, json.dumps({"summary": summary, "images": rows}, indent=1) + "\n")
    return 0


def _stems(a: argparse.Namespace) -> list[str]:
    return (a.split.read_text().split() if a.split else sorted(p.stem for p in (a.data / "images").iterdir()))[: a.limit]


def _in_box(box: np.ndarray, image_hw: tuple[int, int], out_hw: tuple[int, int]) -> tuple[slice, slice]:
    """The output rows and columns the box (image pixels) covers: the runtime's query region without a margin."""
    from imedsam_deploy.preprocess import box_region

    r = box_region(box, image_hw, out_hw, margin=0.0, min_margin_px=0.0)
    return slice(r.r0, r.r1), slice(r.c0, r.c1)


def runtime_agreement(a: argparse.Namespace) -> int:
    """``--query sparse`` vs ``--query full`` through the deploy runtime (ort-cpu), whole images."""
    import time

    from imedsam_core.atomic import atomic_write_text
    from imedsam_deploy import backends as bk
    from imedsam_deploy.infer import out_shape
    from imedsam_deploy.manifest import load_artifact
    from imedsam_deploy.runtime import Segmenter
    from imedsam_train.data.boxes import mask_box
    from imedsam_train.data.folder import read_pair
    from imedsam_train.metrics import dice

    art = load_artifact(a.artifact)
    be, how = bk.open_backend("ort-cpu", art, None)
    print(how, flush=True)
    modes = ("full", "sparse", "box")  # full is the reference the others are compared with
    segs = {q: Segmenter(be, art, query=q, margin=a.margin) for q in modes}
    rows = []
    secs = dict.fromkeys(modes, 0.0)
    for stem in _stems(a):
        rgb, gt = read_pair(a.data, stem)
        box = mask_box(gt)
        if box is None:
            continue
        h, w = gt.shape
        ohw = out_shape((h, w), a.out_size)
        masks = {}
        for q, seg in segs.items():
            t = time.perf_counter()
            res = seg.segment(rgb, box[None], ohw)
            secs[q] += time.perf_counter() - t
            masks[q] = res.objects[0].mask()
        f = masks["full"]
        ib = _in_box(box, (h, w), ohw)
        row: dict = {"stem": stem, "out_hw": list(ohw)}
        for q in modes[1:]:
            m = masks[q]
            row[q] = {"all": float((f == m).mean()), "in_box": float((f[ib] == m[ib]).mean()),
                      "dice": dice(m, f) / 100}
        rows.append(row)
        print(json.dumps(row), flush=True)
    n = len(rows)
    summary: dict = {"artifact": str(a.artifact), "backend": be.description, "images": n,
                     "out_size": a.out_size or "input", "margin": a.margin,
                     "s_per_image": {q: secs[q] / max(n, 1) for q in modes}}
    for q in modes[1:]:
        summary[q] = {**{f"{k}_{fn.__name__}": float(fn([r[q][k] for r in rows]))
                         for k in ("all", "in_box", "dice") for fn in (np.mean, np.min)},
                      "identical_images": sum(r[q]["all"] == 1.0 for r in rows),
                      "speedup_vs_full": secs["full"] / max(secs[q], 1e-9)}
    print(json.dumps(summary, indent=1))
    if a.json:
        atomic_write_text(a.json, json.dumps({"summary": summary, "images": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
