"""Box following for video: each object's box on frame t+1 comes from its mask on frame t.

The next box is the bounding box of the mask's largest connected component grown by a margin. A mask that is
empty, too small or low-confidence (mean foreground probability under ``min_confidence``) marks the object
``lost``: its box stays at the last confident one (no drift onto whatever the bad mask covered) and the
mask is not reported, until a confident mask (or a box from ``--boxes``) picks it up again.
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
    status: Status = "lost"
    lost_reason: str = ""

    def give(self, box: np.ndarray) -> None:
        """A box from the user for the current frame."""
        self.box = np.asarray(box, dtype=np.float64)
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
        if reason:
            self.lost_reason = reason
            self.status = "given" if given else "lost"
            return self.status  # keep the last confident box
        found = mask_box(mask)
        assert found is not None
        self.box = grow_box(found, mask.shape[:2], self.cfg.margin, self.cfg.min_margin_px)
        self.status = "given" if given else "tracked"
        self.lost_reason = ""
        return self.status
