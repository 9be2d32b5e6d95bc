"""What a tracked object looks like, in the encoder's own features: a check on each tracked mask and a search
for a lost object.

A box fed back frame after frame cannot tell the object from whatever the box slid onto: on the shared
colonoscopy clip the lite model's box slid onto the colon fold beside the polyp and reported the fold as
``tracked`` for 180 frames, while the polyp was in view elsewhere. The image embedding the decoder reads
(C x G x G, each cell a patch of the model input) does tell them apart. On the frame where the user gives the
box, the object's prototype is the mean of the unit feature vectors under its mask, the background's the mean
over the cells the mask does not touch. A cell's score is its cosine to the object's prototype minus its
cosine to the background's; a mask's *likeness* is its cells' mean score, weighted by how much of each cell it
covers. A likeness under 0 means the mask looks more like that frame's background than like the object: on the
clip, every frame tracked on the polyp scored 0.04-0.26, every frame on the fold -0.28 to -0.09
(benchmarks/RESULTS.md). A lost object is searched for on the score map: the connected cells scoring over a
fraction of the given mask's own likeness, the group with the largest total score, make the next prompt. (With
several look-alike objects in view, such as two polyps, the search may pick up the other one; only the mask checks
stand in its way.)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from imedsam_deploy._cv import cv2
from imedsam_deploy.preprocess import Preprocessing

_EPS = 1e-6
_FULL_CELL = 0.5  # the object's prototype is learnt from the cells its mask covers at least this much
# an object whose own mask scores less does not stand out from its frame: no check (on the shared clip the
# given polyp scored 0.20 with the lite model's features, 0.12 with the tiny model's)
MIN_REFERENCE = 0.01


@dataclass(frozen=True)
class Appearance:
    """An object's prototype and its background's (unit vectors, C) and the given mask's own likeness."""

    object: np.ndarray
    background: np.ndarray
    reference: float

    def scores(self, features: np.ndarray) -> np.ndarray:
        """(C, h, w) unit features -> (h, w) cosine to the object minus cosine to the background."""
        return np.tensordot(self.object - self.background, features, axes=1)


def _unit(v: np.ndarray) -> np.ndarray | None:
    n = float(np.linalg.norm(v))
    return v / n if n > _EPS else None


class FrameFeatures:
    """One frame's embedding as unit vectors on the cells the image occupies, with the map between cells and
    image pixels (the artifact's preprocessing: stretched, or letterboxed into the top-left corner)."""

    def __init__(self, embedding: np.ndarray, image_hw: tuple[int, int], pre: Preprocessing) -> None:
        emb = np.asarray(embedding, dtype=np.float32)
        if emb.ndim == 4:
            emb = emb[0]
        if emb.ndim != 3 or emb.shape[1] != emb.shape[2]:
            raise ValueError(f"expected a (C, G, G) embedding, got {emb.shape}")
        self.image_hw, self.size, self.grid = image_hw, pre.size, int(emb.shape[1])
        self.valid = pre.valid(image_hw)  # (h, w) model-input pixels the image fills
        self.cells = tuple(min(self.grid, int(np.ceil(v * self.grid / self.size))) for v in self.valid)
        self._raw = emb[:, : self.cells[0], : self.cells[1]]  # a view: cells are normalised where they are read

    @cached_property
    def features(self) -> np.ndarray:
        """(C, h, w) unit vectors of every cell: only learning and the search read them all (a tracked frame's
        check reads the cells under its mask, ``likeness``)."""
        return _unit_cells(self._raw)

    def cover(self, mask: np.ndarray) -> np.ndarray:
        """(H, W) bool mask at the image size -> (h, w) fraction of each cell it covers."""
        vh, vw = self.valid
        canvas = np.zeros((self.size, self.size), np.float32)
        canvas[:vh, :vw] = cv2.resize(mask.astype(np.float32), (vw, vh), interpolation=cv2.INTER_AREA)
        cells = cv2.resize(canvas, (self.grid, self.grid), interpolation=cv2.INTER_AREA)
        return cells[: self.cells[0], : self.cells[1]]

    def learn(self, mask: np.ndarray) -> Appearance | None:
        """The object under ``mask`` (the given frame's): None when the mask is empty, covers every cell, or
        does not stand out from the rest of the frame (its own likeness under ``MIN_REFERENCE``)."""
        cover = self.cover(mask)
        weight = np.where(cover >= _FULL_CELL, 1.0, 0.0) if (cover >= _FULL_CELL).any() else cover
        outside = (cover == 0).astype(np.float32)
        if not weight.any() or not outside.any():
            return None
        obj, bg = _unit(np.tensordot(self.features, weight, axes=2)), _unit(np.tensordot(self.features, outside, axes=2))
        if obj is None or bg is None:
            return None
        ref = self._scored(Appearance(obj, bg, 0.0), cover)[0]
        return Appearance(obj, bg, ref) if ref >= MIN_REFERENCE else None

    def likeness(self, app: Appearance, mask: np.ndarray) -> float:
        """The mask's cells' mean score (weighted by cover); -1 for an empty mask."""
        return self._scored(app, self.cover(mask))[0]

    def judge(self, app: Appearance, mask: np.ndarray) -> tuple[float, np.ndarray]:
        """``likeness`` and the mask's part that looks like the object: its pixels on cells scoring >= 0
        ((H, W) bool; empty for an empty mask). One scoring of the cells under the mask serves both."""
        lk, under, scores = self._scored(app, self.cover(mask))
        if scores is None:
            return lk, np.zeros(mask.shape, bool)
        like = np.zeros(under.shape, np.uint8)
        like[under] = scores >= 0
        return lk, mask & self.cells_to_pixels(like)

    def _scored(self, app: Appearance, cover: np.ndarray) -> tuple[float, np.ndarray, np.ndarray | None]:
        """(cover-weighted mean score, the cells under the mask, their scores); (-1, ., None) for no cell.
        Only the cells under the mask are normalised and scored (once per tracked frame)."""
        under = cover > 0
        if not under.any():
            return -1.0, under, None
        scores = np.asarray((app.object - app.background) @ _unit_cells(self._raw[:, under]))
        return float(scores @ cover[under] / cover[under].sum()), under, scores

    def cells_to_pixels(self, cells: np.ndarray) -> np.ndarray:
        """(h, w) per-cell values (uint8) -> (H, W) bool at the image size, each pixel its cell's (nearest)."""
        (vh, vw), g = self.valid, self.grid
        canvas = np.zeros((g, g), np.uint8)
        canvas[: cells.shape[0], : cells.shape[1]] = cells
        px = cv2.resize(canvas, (self.size, self.size), interpolation=cv2.INTER_NEAREST)[:vh, :vw]
        return cv2.resize(px, (self.image_hw[1], self.image_hw[0]), interpolation=cv2.INTER_NEAREST).astype(bool)

    def search(self, app: Appearance, fraction: float) -> np.ndarray | None:
        """The box (image pixels, x0, y0, x1, y1) of the 8-connected cells scoring over ``fraction`` x the
        given mask's likeness with the largest total score; None when no cell does."""
        s = app.scores(self.features)
        hot = (s > fraction * app.reference).astype(np.uint8)
        n, labels, stats, _ = cv2.connectedComponentsWithStats(hot, connectivity=8)
        if n <= 1:
            return None
        mass = np.bincount(labels.ravel(), weights=s.ravel(), minlength=n)[1:]
        x, y, w, h = (int(stats[1 + int(np.argmax(mass)), k]) for k in
                      (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
        return self.cells_to_box(x, y, x + w, y + h)

    def cells_to_box(self, c0: int, r0: int, c1: int, r1: int) -> np.ndarray:
        """Cell edges (columns c0..c1, rows r0..r1) -> image pixels, clipped to the image."""
        (h, w), (vh, vw) = self.image_hw, self.valid
        cell = self.size / self.grid
        sx, sy = cell * w / vw, cell * h / vh
        return np.array([c0 * sx, r0 * sy, min(c1 * sx, w), min(r1 * sy, h)], dtype=np.float64)


def _unit_cells(x: np.ndarray) -> np.ndarray:
    """(C, ...) -> each cell's C-vector at unit length."""
    return x / (np.linalg.norm(x, axis=0, keepdims=True) + _EPS)
