"""Box following for video: each object's box on frame t+1 comes from its mask on frame t.

The next box is the bounding box of the mask's largest connected component grown by a margin. A mask that is
empty, too small or low-confidence (mean foreground probability under ``min_confidence``) marks the object
``lost``: its box stays at the last confident one (no drift onto whatever the bad mask covered) and the
mask is not reported, until a confident mask (or a box from ``--boxes``) picks it up again.

A box prompt feeds back: a model that fills its box, or runs past it along a similar-looking structure, makes
the next box larger, and so on. The shipped tiny model, prompted on the shared colonoscopy clip, stretched its
box from the polyp to the frame's full height by frame 16 and reported that as tracked. So the object may
grow to at most ``max_growth`` times the width and height of its last given box; a larger component is no
evidence of the object and marks it ``lost`` like a low-confidence mask (box kept, mask not reported).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from imedsam_deploy._cv import cv2

Status = Literal["given", "tracked", "lost"]


@dataclass(frozen=True)
class TrackConfig:
    margin: float = 0.15  # fraction of the mask's box size added on each side
    min_margin_px: float = 4.0
    min_area_px: int = 16
    min_confidence: float = 0.6
    max_growth: float = 2.0  # the mask's box may reach this many times the given box's width / height (0: no limit)


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """(x0, y0, x1, y1) pixel-edge box of the largest connected component of ``mask``, or None if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    # every component lies inside the mask's bounding box: label that crop, not the whole frame
    r0, c0 = int(rows[0]), int(cols[0])
    m = np.ascontiguousarray(mask[r0 : rows[-1] + 1, c0 : cols[-1] + 1], dtype=np.uint8)
    n, _, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    i = 1 + int(np.argmax(stats[1:n, cv2.CC_STAT_AREA]))
    x, y, w, h = (int(stats[i, k]) for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    return np.array([c0 + x, r0 + y, c0 + x + w, r0 + y + h], dtype=np.float64)


def grow_box(box: np.ndarray, image_hw: tuple[int, int], margin: float, min_px: float) -> np.ndarray:
    h, w = image_hw
    x0, y0, x1, y1 = box
    mx, my = max(margin * (x1 - x0), min_px), max(margin * (y1 - y0), min_px)
    return np.array([max(0.0, x0 - mx), max(0.0, y0 - my), min(float(w), x1 + mx), min(float(h), y1 + my)])


@dataclass
class Track:
    """One object across frames."""

    obj: int
    cfg: TrackConfig = field(default_factory=TrackConfig)
    box: np.ndarray | None = None  # the box to prompt the next frame with
    given_size: tuple[float, float] | None = None  # (width, height) of the last box the user gave
    status: Status = "lost"
    lost_reason: str = ""

    def give(self, box: np.ndarray) -> None:
        """A box from the user for the current frame."""
        self.box = np.asarray(box, dtype=np.float64)
        self.given_size = (float(self.box[2] - self.box[0]), float(self.box[3] - self.box[1]))
        self.status = "given"

    def observe(self, mask: np.ndarray, mean_probability: float, given: bool) -> Status:
        """Update from this frame's mask (image size). Returns this frame's status."""
        area = int(mask.sum())
        if area < self.cfg.min_area_px:
            reason = "empty mask" if area == 0 else f"mask of {area} px"
        elif mean_probability < self.cfg.min_confidence:
            reason = f"low confidence {mean_probability:.2f}"
        else:
            reason = ""
        found = mask_box(mask) if not reason else None
        if found is not None:
            reason = self._too_large(found)
        if reason:
            self.lost_reason = reason
            self.status = "given" if given else "lost"
            return self.status  # keep the last confident box
        assert found is not None
        self.box = grow_box(found, mask.shape[:2], self.cfg.margin, self.cfg.min_margin_px)
        self.status = "given" if given else "tracked"
        self.lost_reason = ""
        return self.status

    def _too_large(self, found: np.ndarray) -> str:
        g, limit = self.given_size, self.cfg.max_growth
        if g is None or limit <= 0:
            return ""
        w, h = float(found[2] - found[0]), float(found[3] - found[1])
        if w <= limit * g[0] and h <= limit * g[1]:
            return ""
        return f"mask {w:.0f}x{h:.0f} px, over {limit:g}x the given box ({g[0]:.0f}x{g[1]:.0f})"
