"""Host time of the runtime per frame around a backend that costs nothing: what a GPU frame pays on the CPU.

A stub backend stands in for torch-cuda: its encoder, device planner (``sparse_region``) and device merge
(``decode_merged``) return at once, so what is timed is the runtime's own work per frame through the bench's
FrameRunner (what ``imedsam-infer`` runs): resizing the frame, whatever preprocessing is left on the host,
building query coordinates the backend does not build itself, and pasting the mask. On a GPU this sits between
the kernels of every frame, against a 2 ms budget at 384².

    python -m benchmarks.host_overhead                 # 384x384 and 1920x1080 frames, 384² output
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from imedsam_deploy._cv import cv2
from imedsam_deploy.backends.base import Backend
from imedsam_deploy.bench import BenchOptions, FrameRunner, Inputs, Timings, synthetic_inputs
from imedsam_deploy.manifest import Artifact
from imedsam_deploy.preprocess import resize_to_model


class ZeroCostBackend(Backend):
    """torch-cuda's hooks, answered at once (logits of the right shapes; no device work)."""

    name = "zero-cost"

    def __init__(self) -> None:
        super().__init__(max_batch=8, max_points=65536)

    def encode(self, images: np.ndarray) -> list[Any]:
        return [None] * images.shape[0]

    def encode_pixels(self, pixels: np.ndarray) -> list[Any]:  # torch-cuda converts the uint8 on the device
        return [None] * pixels.shape[0]

    def decode(self, embedding: Any, boxes: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, ...]:
        z = np.zeros((boxes.shape[0], 1, coords.shape[1]), np.float32)
        return z, z, z

    def sparse_region(self, embedding: Any, boxes: np.ndarray, region: tuple[int, int, int, int],
                      out_hw: tuple[int, int], fraction: float, cfg: Any) -> tuple[np.ndarray, int]:
        r0, r1, c0, c1 = region
        return np.ones((1, r1 - r0, c1 - c0), np.float32), 0

    def decode_merged(self, embedding: Any, boxes: np.ndarray, *rest: Any) -> np.ndarray:
        if len(rest) == 3:  # (chunks, n, k): an older runtime that built the coordinates on the host
            for _ in rest[0]:
                pass
            return np.ones((1, rest[1]), np.float32)
        region = rest[0]  # (region, out_hw, chunk, k): the backend builds them
        return np.ones((1, region.size), np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input-size", type=int, default=384)
    ap.add_argument("--out-size", type=int, default=384)
    ap.add_argument("--frames", nargs="+", default=["384x384", "1920x1080"], help="frame sizes WxH")
    ap.add_argument("--repeat", type=int, default=300)
    a = ap.parse_args(argv)
    s = a.input_size
    art = Artifact(path=Path("."), manifest={}, input_size=s, embedding_shape=(256, s // 16, s // 16),
                   num_classes=1, refine_fraction=0.125, max_points=65536, max_batch=8, graphs={})
    print(f"{'frame':>10} {'query':>6} {'resize ms':>10} {'preprocess':>11} {'decoder':>8} {'post':>6} {'total':>7}")
    for frame in a.frames:
        w, h = (int(v) for v in frame.split("x"))
        base = synthetic_inputs(512, 1, seed=2)
        inp = Inputs([cv2.resize(base.images[0], (w, h), interpolation=cv2.INTER_LINEAR)],
                     [base.boxes[0] * np.array([w, h, w, h]) / 512])
        t0 = time.perf_counter()
        for _ in range(50):
            resize_to_model(inp.images[0], s)
        resize_ms = (time.perf_counter() - t0) / 50 * 1e3
        for query in ("sparse", "box", "full"):
            runner = FrameRunner(ZeroCostBackend(), art, query, BenchOptions())  # type: ignore[arg-type]
            t = Timings()
            for _ in range(20):
                runner.run(inp, (a.out_size, a.out_size), None)
            for _ in range(a.repeat):
                runner.run(inp, (a.out_size, a.out_size), t)
            med = {k: float(np.median(v)) for k, v in t.stages.items()}
            print(f"{frame:>10} {query:>6} {resize_ms:>10.3f} {med['preprocess']:>11.3f} {med['decoder']:>8.3f} "
                  f"{med['postprocess']:>6.3f} {float(np.median(t.total)):>7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
