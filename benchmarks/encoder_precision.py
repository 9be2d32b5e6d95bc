"""How far torch-cuda's reduced-precision encoder is from its fp32 encoder, per encoder option, on a real image.

    python -m benchmarks.encoder_precision --model vit_b            # torch-cpu autocast (CUDA if --device cuda)
    python -m benchmarks.encoder_precision --image data/sample/kvasir-sessile/images/X.jpg

The embedding of the random-weight (seed 0) model through ``TorchBackend`` in bf16 (or fp16) against the same
backend in fp32: relative L2 and max abs difference, with the encoder's attention as explicit GEMMs or as one
SDPA call, and with torch-cuda's lean encoder (``imedsam_export.encoder_rewrites``; its fp32 row: how far the
rewrites alone move the embedding).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "kvasir-sessile" / "images"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--input-size", type=int, default=384)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--image", type=Path, default=None, help="an RGB image (default: the first bundled sample)")
    a = ap.parse_args(argv)
    from imedsam_deploy.backends.torch_cuda import TorchBackend
    from imedsam_deploy.preprocess import to_model_input
    from imedsam_deploy.video import read_image
    from imedsam_train.build import build

    path = a.image or sorted(SAMPLE.glob("*.jpg"))[0]
    x = to_model_input(read_image(path), a.input_size)[None]
    torch.manual_seed(0)
    model, _ = build(a.model, input_size=a.input_size)
    model = model.eval()
    print(f"{a.model} at {a.input_size}², {path.name}, {a.precision} against the plain fp32 encoder on {a.device}:")
    print(f"{'encoder':<16} {'attention':<10} {'rel L2 %':>9} {'max abs':>9}")

    def embed(precision: str, fused: bool, lean: bool) -> torch.Tensor:
        be = TorchBackend(model, a.device, precision, cuda_graphs=False, fused_attention=fused, lean_encoder=lean)
        return be.encode(x)[0].float()

    ref = embed("fp32", False, False)
    for precision, fused, lean in (("fp32", True, True), (a.precision, False, False), (a.precision, True, False),
                                   (a.precision, True, True)):
        diff = embed(precision, fused, lean) - ref
        rel, mx = float(diff.norm() / ref.norm()), float(diff.abs().max())
        form = f"{'lean' if lean else 'plain'} {precision}"
        print(f"{form:<16} {'SDPA' if fused else 'GEMMs':<10} {100 * rel:>9.4f} {mx:>9.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
