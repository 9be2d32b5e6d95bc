"""Box-only baselines: the box filled, and the ellipse inscribed in the box (no image used at all)."""

from __future__ import annotations

import numpy as np


def box_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixels whose centre lies inside the box (x0, y0, x1, y1) in pixel-edge coordinates."""
    x0, y0, x1, y1 = box
    xs = np.arange(width) + 0.5
    ys = np.arange(height) + 0.5
    return ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]


def ellipse_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pixels whose centre lies inside the axis-aligned ellipse inscribed in the box."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    rx, ry = max((x1 - x0) / 2, 1e-6), max((y1 - y0) / 2, 1e-6)
    xs = (np.arange(width) + 0.5 - cx) / rx
    ys = (np.arange(height) + 0.5 - cy) / ry
    return ys[:, None] ** 2 + xs[None, :] ** 2 <= 1.0


BASELINES = {"box": box_mask, "ellipse": ellipse_mask}
