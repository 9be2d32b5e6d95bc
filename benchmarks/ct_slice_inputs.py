"""One artifact on a CT volume's organ sections, each slice reaching the model by a different road.

    python -m benchmarks.ct_slice_inputs --artifact runs/zero-shot/export \
        [--volume ../shared/data/ct-volume-totalseg/images/example_ct_sm.nii.gz] \
        [--labels ../shared/data/ct-volume-totalseg/masks/example_seg.nii.gz] [--min-area 50] [--limit N] \
        [--backend ort-cpu] [--query sparse] [--threads 2] [--json FILE]

Roads (every organ of at least ``--min-area`` voxels on every slice, its tight box, the mask at the slice's size):
- ``nifti``: the volume as ``imedsam-infer`` reads it (``imedsam_core.volume_view``: CT window 40,400);
- ``png16 top byte``: the slice written as a 16-bit PNG (HU + 1024, clipped at 0) and decoded with OpenCV's
  IMREAD_COLOR, as ``imedsam-infer`` read images before session 64 (the top byte: a handful of grey levels);
- ``png16``: that PNG through the runtime's reader now (its own range, the rule training reads it by);
- ``png16 --window 1064,400``: that PNG with the CT window given in its stored units;
- ``rot180`` and ``transunet window``: the view and the window ``imedsam-train bcv`` used before session 64 (an RAS
  volume turned 180 degrees; [-125, 275] HU), alone and together, to see what the model makes of each.
Prints mean and median Dice per road against the labels; every case's Dice goes to --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ct-volume-totalseg"
OFFSET = 1024.0  # the usual unsigned storage of HU: value = HU + 1024
TRANSUNET_WINDOW = (-125.0, 275.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--volume", type=Path, default=DATA / "images" / "example_ct_sm.nii.gz")
    ap.add_argument("--labels", type=Path, default=DATA / "masks" / "example_seg.nii.gz")
    ap.add_argument("--min-area", type=int, default=50)
    ap.add_argument("--limit", type=int, default=None, help="at most this many slices with organs (the first)")
    ap.add_argument("--backend", default="ort-cpu")
    ap.add_argument("--query", default="sparse", choices=("sparse", "box", "full"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    import cv2

    from benchmarks.ct_organs import labelled_slices
    from imedsam_core.atomic import atomic_write_text
    from imedsam_core.volume_view import CT_LEVEL, CT_WIDTH, axial, slice_rgb
    from imedsam_deploy.runtime import open_segmenter
    from imedsam_deploy.video import read_image
    from imedsam_deploy.volume import load_volume
    from imedsam_train.data.boxes import mask_box
    from imedsam_train.metrics import dice

    seg, how = open_segmenter(a.artifact, a.backend, None, None, a.threads, query=a.query)
    print(f"{a.artifact}: {how}", file=sys.stderr)
    vol = load_volume(a.volume)
    window16 = (CT_LEVEL + OFFSET - CT_WIDTH / 2, CT_LEVEL + OFFSET + CT_WIDTH / 2)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "slice.png"
        for z, organs in labelled_slices(vol, a.labels, a.min_area)[: a.limit]:
            hu = axial(vol.data, z)
            assert cv2.imwrite(str(png), np.clip(hu + OFFSET, 0, 65535).astype(np.uint16))
            top = cv2.cvtColor(cv2.imdecode(np.fromfile(str(png), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            nifti, transunet = vol.slice_rgb(z), slice_rgb(vol.data, z, TRANSUNET_WINDOW)
            roads: dict[str, tuple[np.ndarray, bool]] = {  # (picture, turned 180 degrees)
                "nifti": (nifti, False),
                "png16 top byte": (top, False),
                "png16": (read_image(png), False),
                "png16 --window 1064,400": (read_image(png, window16), False),
                "rot180": (nifti[::-1, ::-1], True),
                "transunet window": (transunet, False),
                "rot180 + transunet window": (transunet[::-1, ::-1], True),
            }
            for road, (rgb, turned) in roads.items():
                gts = [m[::-1, ::-1] if turned else m for _, m in organs]
                res = seg.segment(np.ascontiguousarray(rgb), np.stack([mask_box(m) for m in gts]), rgb.shape[:2])
                for (organ, _), o, gt in zip(organs, res.objects, gts, strict=True):
                    rows.append({"road": road, "slice": z, "organ": organ, "dice": dice(o.mask(), gt)})
    print(f"{'road':<28}{'n':>5}{'mean Dice':>11}{'median':>9}")
    summary: dict[str, Any] = {"artifact": str(a.artifact), "backend": a.backend, "query": a.query}
    for road in dict.fromkeys(r["road"] for r in rows):
        d = [r["dice"] for r in rows if r["road"] == road]
        summary[road] = {"n": len(d), "mean": statistics.mean(d), "median": statistics.median(d)}
        print(f"{road:<28}{len(d):>5}{statistics.mean(d):>11.2f}{statistics.median(d):>9.2f}")
    if a.json:
        atomic_write_text(a.json, json.dumps({"summary": summary, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
