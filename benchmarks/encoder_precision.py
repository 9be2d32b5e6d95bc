"""How far torch-cuda's reduced-precision encoder is from its fp32 encoder, per encoder option, on a real image.

    python -m benchmarks.encoder_precision --model vit_b            # torch-cpu autocast (CUDA if --device cuda)
    python -m benchmarks.encoder_precision --image data/sample/kvasir-sessile/images/X.jpg
    python -m benchmarks.encoder_precision --model vit_b --repeat 7 --threads 2     # and each row's eager time

The embedding of the random-weight (seed 0) model through ``TorchBackend`` in bf16 (or fp16) against the same
backend in fp32: relative L2 and max abs difference, with the encoder's attention as explicit GEMMs or as one
SDPA call, and with torch-cuda's lean encoder (``imedsam_cuda.encoder_rewrites``; its fp32 row: how far the
rewrites alone move the embedding).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
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
    ap.add_argument("--repeat", type=int, default=0,
                    help="also time each row's encode this many times, interleaved (eager, no CUDA graphs): "
                         "the median in ms")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings
    from imedsam_deploy.preprocess import to_model_input
    from imedsam_deploy.video import read_image
    from imedsam_train.build import build

    path = a.image or sorted(SAMPLE.glob("*.jpg"))[0]
    x = to_model_input(read_image(path), a.input_size)[None]
    torch.manual_seed(0)
    model, _ = build(a.model, input_size=a.input_size)
    model = model.eval()
    print(f"{a.model} at {a.input_size}², {path.name}, {a.precision} against the plain fp32 encoder on {a.device}:")
    rows = [("fp32", False, False), ("fp32", True, True), (a.precision, False, False), (a.precision, True, False),
            (a.precision, True, True)]  # (precision, SDPA attention, lean encoder); the first is the reference
    bes = [TorchBackend(model, a.device, TorchCudaSettings(precision=p, cuda_graphs=False, fused_attention=f,
                                                           lean_encoder=lean))
           for p, f, lean in rows]
    embs = [be.encode(x)[0].float() for be in bes]
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(a.repeat):  # interleaved, row by row, so that a busy machine slows every row alike
        for be, t in zip(bes, times, strict=True):
            t0 = time.perf_counter()
            be.encode(x)
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
            t.append((time.perf_counter() - t0) * 1e3)
    print(f"{'encoder':<16} {'attention':<10} {'rel L2 %':>9} {'max abs':>9}" + (" median ms" if a.repeat else ""))
    ref = embs[0]
    for (precision, fused, lean), emb, t in zip(rows, embs, times, strict=True):
        diff = emb - ref
        rel, mx = float(diff.norm() / ref.norm()), float(diff.abs().max())
        form = f"{'lean' if lean else 'plain'} {precision}"
        print(f"{form:<16} {'SDPA' if fused else 'GEMMs':<10} {100 * rel:>9.4f} {mx:>9.5f}"
              + (f" {float(np.median(t)):>9.1f}" if t else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
