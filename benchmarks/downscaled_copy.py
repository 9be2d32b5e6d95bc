"""A copy of a Kvasir-style data folder at a lower resolution, to score models on smaller frames.

    python -m benchmarks.downscaled_copy ../shared/data/Kvasir-Sessile --out /tmp/ks320 \
        [--max-side 320] [--split test]
    imedsam-eval --data /tmp/ks320 --box-jitter 10 --baseline litemedsam

The bundled sample's recipe (data/sample/kvasir-sessile/README.md), applied to a whole split: each image
resized so its long side is --max-side (INTER_AREA), written as JPEG quality 90; each mask resized the same
way and thresholded at half (PNG, 0/255); that split's stem list copied (only it: another split's list
would name images the copy does not have). Kvasir-Sessile's test images have long sides of
469-720 px (median 621), so at 320 px a box jittered by 0-10 px covers about what 0-20 px does at their own
size. Frames from video are often this small (the shared colonoscopy clip is 470 x 410).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path, help="folder with images/, masks/ and splits/")
    ap.add_argument("--out", type=Path, required=True, help="the new folder (must not exist)")
    ap.add_argument("--max-side", type=int, default=320, help="long side of every image, px")
    ap.add_argument("--split", default="test", help="which split's images to copy (a name under splits/)")
    a = ap.parse_args(argv)

    from imedsam_core.errors import UserError
    from imedsam_deploy.infer import out_shape
    from imedsam_train.data.folder import kvasir_dataset, split_path

    try:
        if a.out.exists():
            raise UserError(f"{a.out}: exists; name a new folder")
        if a.max_side < 16:
            raise UserError(f"--max-side {a.max_side}: expected at least 16")
        ds = kvasir_dataset(a.data, a.split)
        tmp = a.out.with_name(a.out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        (tmp / "masks").mkdir()
        (tmp / "splits").mkdir()
        src = split_path(a.data, a.split)
        assert src is not None  # --split always has a value
        shutil.copyfile(src, tmp / "splits" / src.name)
        for rec in ds.records:
            s = rec.load()
            h, w = s.image.shape[:2]
            size = out_shape((h, w), a.max_side)[::-1]  # (W, H), cv2's order
            img = cv2.resize(s.image, size, interpolation=cv2.INTER_AREA)
            cv2.imwrite(str(tmp / "images" / f"{s.stem}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 90])
            # one class (polyp), its mask files already OR-ed by Record.load; none: an empty mask
            gt = s.masks[0][1] if s.masks else np.zeros((h, w), bool)
            m = cv2.resize(gt.astype(np.float32), size, interpolation=cv2.INTER_AREA) >= 0.5
            cv2.imwrite(str(tmp / "masks" / f"{s.stem}.png"), m.astype(np.uint8) * 255)
        tmp.rename(a.out)  # a folder appears whole or not at all
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(ds.records)} images ({a.split}) at {a.max_side} px long side to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
