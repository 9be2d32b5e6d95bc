"""Numpy twin of the model's preprocessing and query grid (constants from ``contract``).

stretch-resize to S x S with cv2 INTER_LINEAR, RGB, x PIXEL_SCALE, NCHW float32; boxes scaled to the
model-input frame; pixel-centre coordinates in [-1, 1] (align_corners=False), row-major, (x, y).
The lite preset's letterbox (``Preprocessing``, ``contract.LETTERBOX_MODE``) is LiteMedSAM's: the longest side
resized, min-max scaled, zero-padded; its query points are the output grid's mapped into the unpadded region
(``imedsam_train.preprocess`` is the torch side, tested equal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from imedsam_core import contract
from imedsam_deploy._cv import cv2

_INTERP = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


def resize_to_model(rgb: np.ndarray, input_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (S, S, 3) uint8: the stretch-resize, the host's part of preprocessing; into
    ``out`` (a C-contiguous (S, S, 3) uint8 array) when given."""
    if out is None:
        return cv2.resize(rgb, (input_size, input_size), interpolation=_INTERP[contract.RESIZE_INTERPOLATION])
    got = cv2.resize(rgb, (input_size, input_size), dst=out, interpolation=_INTERP[contract.RESIZE_INTERPOLATION])
    if got is not out:  # OpenCV reallocates rather than fail when ``out`` does not fit
        out[...] = got
    return out


def pixels_to_model(pixels: np.ndarray) -> np.ndarray:
    """(..., S, S, 3) uint8 resized RGB -> (..., 3, S, S) float32 x PIXEL_SCALE: the rest of preprocessing, which
    a GPU backend may run on its device instead (``Backend.encode_pixels``: a third of the bytes to upload)."""
    x = pixels.astype(np.float32) * np.float32(contract.PIXEL_SCALE)
    return np.ascontiguousarray(np.moveaxis(x, -1, -3))


def to_model_input(rgb: np.ndarray, input_size: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, S, S) float32 in [0, 1]."""
    return pixels_to_model(resize_to_model(rgb, input_size))


def box_to_model(box: np.ndarray, image_hw: tuple[int, int], input_size: int) -> np.ndarray:
    """(..., 4) boxes in image pixels -> the model-input pixel frame (the stretch's per-axis scale)."""
    h, w = image_hw
    scale = np.array([input_size / w, input_size / h, input_size / w, input_size / h], dtype=np.float64)
    return (np.asarray(box, dtype=np.float64) * scale).astype(np.float32)


def axis_centres(n: int) -> np.ndarray:
    """Pixel-centre coordinates of n samples along one axis, float32, as the torch twin computes them."""
    return (np.float32(2) * np.arange(n, dtype=np.float32) + np.float32(1)) / np.float32(n) - np.float32(1)


def grid_coords(height: int, width: int) -> np.ndarray:
    """(H*W, 2) float32 (x, y) of every output pixel centre, row-major (= imedsam_train.model.grid_coords)."""
    return region_coords(Region(0, 0, height, width), height, width)


@dataclass(frozen=True)
class Region:
    """Rows [r0, r1) and columns [c0, c1) of an output grid."""

    r0: int
    c0: int
    r1: int
    c1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0

    @property
    def size(self) -> int:
        return max(0, self.r1 - self.r0) * max(0, self.c1 - self.c0)


def region_coords(region: Region, height: int, width: int) -> np.ndarray:
    """Coordinates of the pixels of ``region`` of an H x W grid, (n, 2) float32, row-major."""
    xs = axis_centres(width)[region.c0 : region.c1]
    ys = axis_centres(height)[region.r0 : region.r1]
    gx, gy = np.meshgrid(xs, ys, indexing="xy")
    return np.stack([gx, gy], axis=-1).reshape(-1, 2)


def region_chunk_coords(region: Region, height: int, width: int, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of ``region_coords(region, height, width)``, without building the whole array."""
    idx = np.arange(start, stop)
    rw = region.c1 - region.c0
    xs = axis_centres(width)[region.c0 + idx % rw]
    ys = axis_centres(height)[region.r0 + idx // rw]
    return np.stack([xs, ys], axis=-1)


def box_region(box: np.ndarray, image_hw: tuple[int, int], out_hw: tuple[int, int], margin: float,
               min_margin_px: float = 4.0) -> Region:
    """The output pixels within ``box`` (image pixels) grown by ``margin`` x its size (at least min_margin_px)."""
    h, w = image_hw
    oh, ow = out_hw
    x0, y0, x1, y1 = (float(v) for v in box)
    mx = max(margin * (x1 - x0), min_margin_px)
    my = max(margin * (y1 - y0), min_margin_px)
    sx, sy = ow / w, oh / h
    c0 = max(0, math.floor((x0 - mx) * sx))
    c1 = min(ow, math.ceil((x1 + mx) * sx))
    r0 = max(0, math.floor((y0 - my) * sy))
    r1 = min(oh, math.ceil((y1 + my) * sy))
    return Region(r0, c0, max(r0, r1), max(c0, c1))


@dataclass(frozen=True)
class Preprocessing:
    """An artifact's preprocessing (``resize``: one of ``contract.RESIZE_MODES``) at input size ``size``.

    Host steps, in order: ``resize_into`` (uint8, into a reused buffer), ``to_model`` (float32 NCHW), and per
    box ``box`` and per query ``coords``. ``stretch`` leaves ``to_model`` to the backend (``encode_pixels``)."""

    resize: str
    size: int

    @property
    def letterbox(self) -> bool:
        return self.resize == contract.LETTERBOX_MODE

    def valid(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the model-input region the image occupies (the whole input for ``stretch``)."""
        if not self.letterbox:
            return self.size, self.size
        _, nh, nw = contract.letterbox_shape(image_hw[0], image_hw[1], self.size)
        return nh, nw

    def resize_into(self, rgb: np.ndarray, out: np.ndarray) -> None:
        """(H, W, 3) uint8 -> ``out`` (S, S, 3) uint8: stretched, or letterboxed with zeros around."""
        if not self.letterbox:
            resize_to_model(rgb, self.size, out=out)
            return
        nh, nw = self.valid(rgb.shape[:2])
        out[nh:] = 0
        out[:nh, nw:] = 0
        out[:nh, :nw] = cv2.resize(rgb, (nw, nh), interpolation=_INTERP[contract.LETTERBOX_INTERPOLATION])

    def to_model(self, pixels: np.ndarray, image_hws: list[tuple[int, int]]) -> np.ndarray:
        """(B, S, S, 3) uint8 from ``resize_into`` -> (B, 3, S, S) float32 model input."""
        if not self.letterbox:
            return pixels_to_model(pixels)
        x = np.zeros((len(pixels), 3, self.size, self.size), np.float32)
        for i, (px, hw) in enumerate(zip(pixels, image_hws, strict=True)):
            h, w = self.valid(hw)
            crop = px[:h, :w]
            lo, hi = float(crop.min()), float(crop.max())
            x[i, :, :h, :w] = np.moveaxis((crop.astype(np.float32) - np.float32(lo)) /
                                          np.float32(max(hi - lo, contract.MINMAX_EPS)), -1, 0)
        return x

    def box(self, box: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
        """(..., 4) pixel-edge boxes in image pixels -> the model-input frame, the model's convention."""
        if not self.letterbox:
            return box_to_model(box, image_hw, self.size)
        scale, _, _ = contract.letterbox_shape(image_hw[0], image_hw[1], self.size)
        b = np.asarray(box, dtype=np.float64) - np.array([0.0, 0.0, 1.0, 1.0])
        return (b * scale).astype(np.float32)

    def coords(self, coords: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
        """(..., 2) output-grid points in [-1, 1] (over the whole image) -> the model input's [-1, 1]: for the
        letterbox, mapped into the unpadded region and clamped to its outermost pixel centres, so bilinear
        sampling reads what cropping the padding and resizing (half-pixel centres) would."""
        if not self.letterbox:
            return coords
        vh, vw = self.valid(image_hw)
        s = np.float32(self.size)
        lim = np.array([vw, vh], np.float32)
        p = (coords.astype(np.float32) + np.float32(1)) * lim / s - np.float32(1)
        return np.clip(p, np.float32(1) / s - np.float32(1), (np.float32(2) * lim - np.float32(1)) / s - np.float32(1))
