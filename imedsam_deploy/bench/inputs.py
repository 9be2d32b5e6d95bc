"""What the bench runs on: deterministic synthetic images or one image file, each with its box."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imedsam_core.errors import UserError

RANDOM_SEED = 0


@dataclass
class Inputs:
    images: list[np.ndarray]  # RGB uint8
    boxes: list[np.ndarray]  # (4,) image pixels, one per image




def synthetic_inputs(size: int, batch: int, seed: int = 0) -> Inputs:
    """Deterministic smooth RGB images with one bright blob each, and a box around the blob (~14% of the
    image, Kvasir-Sessile's mean box area)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    imgs, boxes = [], []
    for _ in range(batch):
        cx, cy = rng.uniform(0.35, 0.65, 2)
        r = 0.15
        blob = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (r / 1.5) ** 2)))
        base = 0.35 + 0.1 * np.sin(6 * xx + rng.uniform(0, 6)) * np.cos(5 * yy)
        rgb = np.stack([base + 0.5 * blob, base * 0.7 + 0.2 * blob, base * 0.5], axis=-1)
        imgs.append((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
        half = 0.187 * size
        boxes.append(np.array([cx * size - half, cy * size - half, cx * size + half, cy * size + half]))
    return Inputs(imgs, boxes)


def file_inputs(path: Path, box: tuple[float, float, float, float] | None, batch: int) -> Inputs:
    from imedsam_deploy.boxes import fmt_box
    from imedsam_deploy.video import read_image

    rgb = read_image(path)  # the runtime's reader: refuses truncated files (cv2.imread half-decodes them)
    h, w = rgb.shape[:2]
    b = np.array(box if box is not None else (0.3 * w, 0.3 * h, 0.67 * w, 0.67 * h), dtype=np.float64)
    if not (np.all(np.isfinite(b)) and 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h):
        raise UserError(f"{path}: box {fmt_box(b)} is not inside the {w}x{h} image with positive area")
    return Inputs([rgb] * batch, [b] * batch)
