"""A model's preprocessing (``ModelConfig.preprocess``), used alike by training and evaluation.

Frames. An original H x W image becomes an S x S model-frame image: stretched (``stretch``), or its longest side
resized to S and zero-padded at the bottom and right (``letterbox_minmax``), the unpadded region being the
``valid`` (h, w). Outputs are read "at the original aspect ratio": an O_h x O_w output grid spans the valid
region only, as LiteMedSAM's crop-then-resize does, so evaluation's O x O frame (the original stretched to a
square) is answered from the image's own pixels, never from padding.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from imedsam_core.contract import MINMAX_EPS, letterbox_shape
from imedsam_train.config import PreprocessConfig
from imedsam_train.data.boxes import scale_box
from imedsam_train.model import grid_coords

__all__ = ["MINMAX_EPS", "input_boxes", "letterbox_shape", "output_coords", "prepare_image", "prepare_mask",
           "to_input"]


def prepare_image(image: np.ndarray, pre: PreprocessConfig, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """RGB (H, W, 3) uint8 -> ((3, S, S) uint8 model-frame image, valid (h, w))."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if pre.kind == "stretch":
        img = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
        return torch.from_numpy(img).permute(2, 0, 1).contiguous(), (size, size)
    _, nh, nw = letterbox_shape(image.shape[0], image.shape[1], size)
    out = np.zeros((size, size, 3), np.uint8)
    out[:nh, :nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(out).permute(2, 0, 1).contiguous(), (nh, nw)


def prepare_mask(mask: np.ndarray, pre: PreprocessConfig, size: int) -> torch.Tensor:
    """(H, W) bool -> (S, S) bool in the model frame (resized as a fraction, thresholded at 0.5)."""
    m = mask.astype(np.float32)
    if pre.kind == "stretch":
        return torch.from_numpy(cv2.resize(m, (size, size), interpolation=cv2.INTER_LINEAR) >= 0.5)
    _, nh, nw = letterbox_shape(mask.shape[0], mask.shape[1], size)
    out = np.zeros((size, size), bool)
    out[:nh, :nw] = cv2.resize(m, (nw, nh), interpolation=cv2.INTER_LINEAR) >= 0.5
    return torch.from_numpy(out)


def to_input(image: torch.Tensor, pre: PreprocessConfig, valid: tuple[int, int]) -> torch.Tensor:
    """(..., 3, S, S) uint8 model-frame image -> float32 model input."""
    x = image.float()
    if pre.kind == "stretch":
        return x / 255.0
    h, w = valid
    crop = x[..., :h, :w]
    lo, hi = float(crop.min()), float(crop.max())
    out = torch.zeros_like(x)
    out[..., :h, :w] = (crop - lo) / max(hi - lo, MINMAX_EPS)
    return out


def input_boxes(boxes: np.ndarray, pre: PreprocessConfig, orig_hw: tuple[int, int], size: int) -> torch.Tensor:
    """Pixel-edge boxes (K, 4) in original pixels -> (K, 4) float32 in the model frame, the model's convention."""
    h, w = orig_hw
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    if pre.kind == "stretch":
        return torch.from_numpy(np.stack([scale_box(x, size / w, size / h) for x in b])).float()
    scale, _, _ = letterbox_shape(h, w, size)
    # SAM's convention (how LiteMedSAM's training boxes were made): x1/y1 the last covered column/row
    return torch.from_numpy((b - np.array([0.0, 0.0, 1.0, 1.0])) * scale).float()


def output_coords(pre: PreprocessConfig, out_h: int, out_w: int, valid: tuple[int, int], size: int,
                  device: torch.device | None = None) -> torch.Tensor:
    """Query points (out_h * out_w, 2) of an output grid covering the valid region, in the model frame's
    [-1, 1]. Letterbox: the pixel centres of the output mapped into the valid region and clamped to its
    outermost pixel centres, so that bilinear sampling of a S x S map reads what cropping it to the valid
    region and resizing (bilinear, half-pixel centres) would."""
    g = grid_coords(out_h, out_w, device)
    if pre.kind == "stretch":
        return g
    vh, vw = valid
    lim = torch.tensor([vw, vh], dtype=g.dtype, device=g.device)
    p = (g + 1) * lim / size - 1
    lo = 1.0 / size - 1
    return torch.maximum(torch.minimum(p, (2 * lim - 1) / size - 1), torch.full_like(p, lo))
