"""Artifacts against zero-shot LiteMedSAM on CT organs, data the shipped polyp model was not tuned on.

    python -m benchmarks.ct_organs --artifact runs/shipped/export --artifact runs/zero-shot/export \
        [--slices ../shared/data/ct-slices-amos-totalseg] \
        [--volume IMAGE.nii.gz --labels LABELS.nii.gz] [--min-area 50] [--limit N] \
        [--backend auto|ort-cpu|ov-cpu] [--query sparse|box|full] [--precision P] [--threads 2] [--json FILE]

Cases: every organ of every labelled slice (``--slices``: AMOS / SA-Med2D style PNGs, one mask per organ, read as
``imedsam-eval`` reads them) and every organ of at least ``--min-area`` voxels on every slice of a volume
(``--volume`` with its label volume, the slice windowed and oriented as ``imedsam-infer`` shows it:
``imedsam_deploy.volume``). Prompt: the organ's tight box. Each artifact runs as ``imedsam-infer`` runs it (its
default ``sparse`` query, the mask at the slice's own size, ``--backend``), all of a slice's organs on one
embedding; LiteMedSAM is its own eager PyTorch pipeline (``imedsam_train.pretrained.LiteMedSAMBaseline``).
Prints Dice against the labels (mean and median per source and model) and the mean per-case difference from
LiteMedSAM; every case's figures go to --json. The volume's labels in ``../shared/data/ct-volume-totalseg`` are
TotalSegmentator's predictions, not manual.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

LITEMEDSAM = "litemedsam"


def slice_cases(folder: Path) -> list[tuple[str, np.ndarray, list[tuple[str, np.ndarray]]]]:
    """(name, RGB, [(organ, mask), ...]) per labelled slice of an organ-PNG folder."""
    from imedsam_train.data.organ_png import organ_png_dataset

    ds = organ_png_dataset(folder)
    out = []
    for rec in ds.records:
        s = rec.load()
        organs = [(ds.class_names[c], m) for c, m in s.masks if m.any()]
        if organs:
            out.append((rec.stem, s.image, organs))
    return out


def labelled_slices(vol: Any, labels: Path, min_area: int) -> list[tuple[int, list[tuple[str, np.ndarray]]]]:
    """(z, [(label, mask), ...]) per slice of ``vol`` (``imedsam_deploy.volume.Volume``) with an organ of
    ``min_area`` voxels; the masks in the view ``slice_rgb`` shows (``imedsam_core.volume_view.axial``)."""
    from imedsam_core.nifti import read_nifti
    from imedsam_core.volume_view import axial

    lab = read_nifti(labels, float32=False).data.astype(np.int64)
    if lab.shape != vol.data.shape:
        raise SystemExit(f"{labels}: shape {lab.shape} is not the volume's {vol.data.shape}")
    out = []
    for z in range(vol.num_slices):
        sl = axial(lab, z)
        organs = [(str(int(v)), sl == v) for v in np.unique(sl) if v != 0 and int((sl == v).sum()) >= min_area]
        if organs:
            out.append((z, organs))
    return out


def volume_cases(image: Path, labels: Path, min_area: int,
                 limit: int | None = None) -> list[tuple[str, np.ndarray, list[tuple[str, np.ndarray]]]]:
    """(slice_<z>, RGB as imedsam-infer shows it, [(label, mask), ...]) per slice with an organ of ``min_area``
    (the first ``limit`` such slices; pictures made for those only)."""
    from imedsam_deploy.volume import load_volume

    vol = load_volume(image)
    return [(f"slice_{z:04d}", vol.slice_rgb(z), organs) for z, organs in labelled_slices(vol, labels, min_area)[:limit]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, action="append", required=True, help="an artifact folder (repeat)")
    ap.add_argument("--slices", type=Path, default=None, help="organ-PNG folder (images/, masks/)")
    ap.add_argument("--volume", type=Path, default=None, help="a NIfTI CT volume")
    ap.add_argument("--labels", type=Path, default=None, help="its label volume (integer per organ)")
    ap.add_argument("--min-area", type=int, default=50, help="volume: smallest organ section scored, in voxels")
    ap.add_argument("--limit", type=int, default=None, help="at most this many slices of each source (the first)")
    ap.add_argument("--backend", default="auto", help="as imedsam-infer's --backend")
    ap.add_argument("--query", default="sparse", choices=("sparse", "box", "full"), help="as imedsam-infer's --query")
    ap.add_argument("--precision", default=None, help="as imedsam-infer's --precision (default: the backend's)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    from imedsam_core.malloc import keep_freed_memory

    keep_freed_memory()  # eager PyTorch (LiteMedSAM, the lite model) as the torch commands run it
    if (a.volume is None) != (a.labels is None):
        ap.error("--volume and --labels go together")
    if a.slices is None and a.volume is None:
        ap.error("give --slices or --volume (or both)")

    import torch

    from imedsam_core.atomic import atomic_write_text
    from imedsam_deploy.runtime import open_segmenter
    from imedsam_train.data.boxes import mask_box
    from imedsam_train.metrics import dice
    from imedsam_train.pretrained import LiteMedSAMBaseline, lite_medsam

    torch.set_num_threads(a.threads)
    models: dict[str, Any] = {}
    for path in a.artifact:
        models[str(path)], how = open_segmenter(path, a.backend, a.precision, None, a.threads, query=a.query)
        print(f"{path}: {how}", file=sys.stderr)
    base = LiteMedSAMBaseline(lite_medsam())
    sources: dict[str, list[Any]] = {}
    if a.slices is not None:
        sources["slices"] = slice_cases(a.slices)[: a.limit]
    if a.volume is not None:
        sources["volume"] = volume_cases(a.volume, a.labels, a.min_area, a.limit)

    rows: list[dict[str, Any]] = []
    for src, cases in sources.items():
        for name, rgb, organs in cases:
            boxes = np.stack([mask_box(m) for _, m in organs])
            hw = rgb.shape[:2]
            masks = {LITEMEDSAM: list((base.logits(rgb, boxes, hw) > 0).numpy())}
            for key, seg in models.items():
                res = seg.segment(rgb, boxes, hw)
                masks[key] = [o.mask() for o in res.objects]
            for i, (organ, gt) in enumerate(organs):
                rows.append({"source": src, "case": name, "organ": organ, "area": int(gt.sum()),
                             "dice": {k: dice(v[i], gt) for k, v in masks.items()}})
        print(f"{src}: {len(cases)} slices", file=sys.stderr)

    names = [LITEMEDSAM, *models]
    summary: dict[str, Any] = {"backend": a.backend, "precision": a.precision, "query": a.query, "threads": a.threads}
    print(f"{'source':<8}{'model':<44}{'n':>5}{'mean Dice':>11}{'median':>9}{'vs LiteMedSAM':>15}")
    for src in sources:
        rs = [r for r in rows if r["source"] == src]
        if not rs:
            continue
        summary[src] = {}
        for k in names:
            d = [r["dice"][k] for r in rs]
            diff = statistics.mean(r["dice"][k] - r["dice"][LITEMEDSAM] for r in rs)
            summary[src][k] = {"n": len(d), "mean": statistics.mean(d), "median": statistics.median(d),
                               "mean_minus_litemedsam": diff}
            label = "LiteMedSAM, zero-shot (its own pipeline)" if k == LITEMEDSAM else k
            print(f"{src:<8}{label[-43:]:<44}{len(d):>5}{statistics.mean(d):>11.2f}{statistics.median(d):>9.2f}"
                  f"{diff:>+15.2f}")
    if a.json:
        atomic_write_text(a.json, json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
