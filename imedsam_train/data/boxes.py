"""Boxes from masks, and the training/evaluation jitter (each side pushed out by 0..J px, seeded)."""

from __future__ import annotations

import hashlib

import numpy as np


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """Tight box (x0, y0, x1, y1) in pixel-edge coordinates (x1 = last column + 1), or None if empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float64)


def jitter_box(box: np.ndarray, max_px: float, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Push each side out by U(0, max_px) pixels, clipped to the image."""
    if max_px <= 0:
        return box.astype(np.float64).copy()
    d = rng.uniform(0.0, max_px, size=4)
    x0, y0, x1, y1 = box
    return np.array(
        [max(0.0, x0 - d[0]), max(0.0, y0 - d[1]), min(float(width), x1 + d[2]), min(float(height), y1 + d[3])]
    )


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from any values (stable across processes, unlike ``hash``)."""
    h = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1


def scale_box(box: np.ndarray, sx: float, sy: float) -> np.ndarray:
    return np.array([box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy])
