"""Masks and Dice of each exported precision (fp32, fp16, int8 encoder) against PyTorch fp32, on real images.

    python -m benchmarks.precision_agreement CHECKPOINT --data ../shared/data/Kvasir-Sessile \\
        --split ../shared/data/Kvasir-Sessile/splits/test.txt [--limit 39] [--json out.json]

Exports the checkpoint (fp32, ``--fp16``, ``--int8``) into a temporary folder and runs the exporter's own
real-image check (``imedsam_export.verify.verify_real``: full output grid at the input size, tight mask boxes,
UGS merge) over every listed image instead of the bundled sample's first four. ONNX Runtime CPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from imedsam_export.api import export_artifact
from imedsam_export.verify import load_real_samples, verify_real
from imedsam_train.checkpoint import load_checkpoint


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--data", type=Path, required=True, help="folder with images/, masks/ and splits/")
    ap.add_argument("--split", type=Path, default=None, help="split file (default DATA/splits/test.txt)")
    ap.add_argument("--limit", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    model, _ = load_checkpoint(a.checkpoint)
    model = model.eval()
    size = model.cfg.input_size
    samples = load_real_samples(size, a.limit, root=a.data, split=a.split)
    if not samples:
        raise SystemExit(f"{a.data}: no image/mask pairs found")
    with tempfile.TemporaryDirectory() as tmp:
        art = export_artifact(a.checkpoint, Path(tmp) / "art", fp16=True, int8=True, verify=False)
        manifest = json.loads((art / "manifest.json").read_text())
        graphs = {p: (art / g["encoder"], art / g["decoder"]) for p, g in manifest["graphs"].items()}
        with torch.no_grad():
            res = verify_real(model, graphs, manifest["max_points"], samples=samples)
    res["source"] = str(a.data)
    print(f"{len(samples)} images, {size} px, PyTorch fp32 Dice {res['dice_pytorch']:.2f}")
    for prec in ("fp32", "fp16", "int8"):
        r = res[prec]
        print(f"{prec:5s} masks agree {100 * r['mask_agreement']:.3f}%  Dice {r['dice']:.2f} "
              f"(fp32 graphs {r['dice_fp32_same_images']:.2f})  max |logit diff| {r['logit_max_abs_diff']:.1e}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
