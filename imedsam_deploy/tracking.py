"""Box following for video: each object's box on frame t+1 comes from its mask on frame t.

The next box is the bounding box of the mask's largest connected component grown by a margin. A mask that is
empty, too small or low-confidence (mean foreground probability under ``min_confidence``) marks the object
``lost``: its box stays at the last confident one (no drift onto whatever the bad mask covered) and the
mask is not reported, until a confident mask (or a box from ``--boxes``) picks it up again.

A box prompt feeds back: a model that fills its box, or runs past it along a similar-looking structure, makes
the next box larger, and so on. The shipped tiny model, prompted on the shared colonoscopy clip, stretched its
box from the polyp to the frame's full height by frame 16 and reported that as tracked. So the object may
grow to at most ``max_growth`` times the width and height of its last given box; a larger component is no
evidence of the object and marks it ``lost`` like a low-confidence mask (box kept, mask not reported); so does
one under 1/``max_growth`` of either side: a box that has slid off the object onto a strip beside it (the lite
model's, on that clip, once the polyp moved out of the box faster than the box followed) is not the object,
unless the short side is cut by the frame's edge (the object leaving the view).
The shipped lite model, on the same clip, follows the polyp but adds a thin spike up the fold above it; the box
fed back from it stretched and the object was lost on 131 of the first 400 frames. So the next box is taken from
the mask's core (``core``): the largest component opened by a disc whose radius is a fraction of its size, which
drops protrusions narrower than the disc; the reported mask is the model's, untouched.
Size and confidence cannot tell the object from a confident mask of something beside it: on that clip the box
later slid onto the fold and reported it as tracked while the polyp sat elsewhere in view. So, where the
backend hands its embedding to the host, a tracked mask must also look like the object (``appearance.py``:
its likeness, against the frame where the box was given, at least ``min_likeness``), and a lost object is
searched for on the whole frame by that likeness (``search``) and picked up again where the search's box
gives a mask that passes every check (``follow``). A mask can pass the checks and still spill onto the fold
beside the polyp (its mean likeness stays over 0): the next box then comes from the core of the mask's part
that looks like the object (``like_part``), so the spill does not widen the next prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np

from imedsam_deploy._cv import cv2
from imedsam_deploy.appearance import Appearance, FrameFeatures

Status = Literal["given", "tracked", "lost"]


@dataclass(frozen=True)
class TrackConfig:
    margin: float = 0.15  # fraction of the mask's box size added on each side
    min_margin_px: float = 4.0
    min_area_px: int = 16
    min_confidence: float = 0.6
    # the mask's box may reach this many times the given box's width / height, and 1/this of them (0: no limit)
    max_growth: float = 2.0
    # the next box is the mask's core: its largest component opened by a disc of this fraction of the square root
    # of its area, so a thin spike along a fold does not stretch the prompt (0: the whole component). 0.1: on the
    # shared clip with the shipped lite model, 0.1, 0.15 and 0.2 kept the polyp on all of the first 400 frames (131
    # lost with 0; 0.3 shrank the box onto part of it), 0.2 lost it earlier over the whole clip (RESULTS.md)
    core: float = 0.1
    # a tracked mask's likeness to the object (appearance.py) at least this, and a lost object searched for on the
    # frame. 0: it looks more like the object than like the given frame's background. On the shared clip: the
    # frames on the polyp scored 0.04-0.26, those on the fold -0.28 to -0.09 (RESULTS.md)
    appearance: bool = True
    min_likeness: float = 0.0
    # the search's cells score over this fraction of the given mask's own likeness (0: no search). On the clip
    # 0.3 and 0.5 both picked the polyp up again; 0.3 sooner (RESULTS.md)
    search: float = 0.3
    # the next box from the core of the mask's part that looks like the object (its pixels on cells scoring >= 0),
    # not of the whole mask: a mask that spills onto the fold beside the polyp still passes the checks (its mean
    # likeness stays over 0), but its spill no longer widens the next prompt. On the clip: frames over 1.5x the
    # given mask's area before the cross-fade 69 -> 0 (RESULTS.md)
    like_part: bool = True


def _largest_component(mask: np.ndarray) -> tuple[int, int, np.ndarray, np.ndarray] | None:
    """The largest 8-connected component of ``mask``: its crop's offset (x, y), the component in that crop (bool)
    and its stats row (OpenCV's); None if the mask is empty. Only the mask's bounding box is labelled: every
    component lies inside it."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    r0, c0 = int(rows[0]), int(cols[0])
    m = np.ascontiguousarray(mask[r0 : rows[-1] + 1, c0 : cols[-1] + 1], dtype=np.uint8)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(m, connectivity=8)
    i = 1 + int(np.argmax(stats[1:n, cv2.CC_STAT_AREA]))
    return c0, r0, labels == i, stats[i]


def _stats_box(x0: int, y0: int, st: np.ndarray) -> np.ndarray:
    x, y, w, h = (int(st[k]) for k in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    return np.array([x0 + x, y0 + y, x0 + x + w, y0 + y + h], dtype=np.float64)


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """(x0, y0, x1, y1) pixel-edge box of the largest connected component of ``mask``, or None if empty."""
    comp = _largest_component(mask)
    return None if comp is None else _stats_box(comp[0], comp[1], comp[3])


def core_box(mask: np.ndarray, fraction: float) -> np.ndarray | None:
    """``mask_box`` of the mask's largest component after a morphological opening by a disc of radius
    ``fraction`` x sqrt(its area): protrusions narrower than the disc do not count. The component's own box when
    the opening leaves nothing."""
    comp = _largest_component(mask)
    if comp is None:
        return None
    x0, y0, component, st = comp
    box = _stats_box(x0, y0, st)
    r = int(round(fraction * np.sqrt(st[cv2.CC_STAT_AREA])))
    if r < 1:
        return box
    # zero border of r: the opening sees background beyond the crop, not the constant OpenCV pads with
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    opened = cv2.morphologyEx(np.pad(component.astype(np.uint8), r), cv2.MORPH_OPEN, disc)
    core = mask_box(opened[r:-r, r:-r].astype(bool))
    return box if core is None else core + np.array([x0, y0, x0, y0], dtype=np.float64)


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
    look: Appearance | None = None  # learnt on the last frame a box was given (None: no appearance check)

    def give(self, box: np.ndarray) -> None:
        """A box from the user for the current frame."""
        self.box = np.asarray(box, dtype=np.float64)
        self.given_size = (float(self.box[2] - self.box[0]), float(self.box[3] - self.box[1]))
        self.status = "given"

    def observe(self, mask: np.ndarray, mean_probability: float, given: bool, likeness: float | None = None,
                searched: bool = False, like_part: np.ndarray | None = None) -> Status:
        """Update from this frame's mask (image size) and, where known, its likeness to the object (not checked on
        a given frame); ``searched``: the mask of a search's box, held to the shrink bound even at the frame's
        edge; ``like_part``: the mask's part that looks like the object, whose core (where it has one) gives the
        next box instead of the whole mask's (not on a given frame). Returns this frame's status."""
        area = int(mask.sum())
        if area < self.cfg.min_area_px:
            reason = "empty mask" if area == 0 else f"mask of {area} px"
        elif mean_probability < self.cfg.min_confidence:
            reason = f"low confidence {mean_probability:.2f}"
        elif likeness is not None and not given and likeness < self.cfg.min_likeness:
            reason = f"unlike the object (likeness {likeness:.2f} < {self.cfg.min_likeness:g})"
        else:
            reason = ""
        found = core_box(mask, self.cfg.core) if not reason else None
        if found is not None:
            reason = self._out_of_scale(found, None if searched else mask.shape[:2])
        if reason:
            self.lost_reason = reason
            self.status = "given" if given else "lost"
            return self.status  # keep the last confident box
        assert found is not None
        if like_part is not None and not given:
            part = core_box(like_part, self.cfg.core)
            found = found if part is None else part
        self.box = grow_box(found, mask.shape[:2], self.cfg.margin, self.cfg.min_margin_px)
        self.status = "given" if given else "tracked"
        self.lost_reason = ""
        return self.status

    def _out_of_scale(self, found: np.ndarray, image_hw: tuple[int, int] | None) -> str:
        g, limit = self.given_size, self.cfg.max_growth
        if g is None or limit <= 0:
            return ""
        w, h = float(found[2] - found[0]), float(found[3] - found[1])
        if w > limit * g[0] or h > limit * g[1]:
            return f"mask {w:.0f}x{h:.0f} px, over {limit:g}x the given box ({g[0]:.0f}x{g[1]:.0f})"
        # shrunk onto a part, or onto something beside the object; but not along a side cut by the frame's edge
        # (image_hw given), where a tracked object may be leaving the view (on the shared clip the polyp leaves at
        # the bottom edge). A search's find is held to it: at the clip's end, with the polyp gone, the search
        # found the screen recording's window title in a corner, a sliver cut by two edges
        cut_x = image_hw is not None and (found[0] <= 0 or found[2] >= image_hw[1])
        cut_y = image_hw is not None and (found[1] <= 0 or found[3] >= image_hw[0])
        if (w * limit < g[0] and not cut_x) or (h * limit < g[1] and not cut_y):
            return f"mask {w:.0f}x{h:.0f} px, under 1/{limit:g} of the given box ({g[0]:.0f}x{g[1]:.0f})"
        return ""


R = TypeVar("R")


def follow(tr: Track, decode: Callable[[np.ndarray], tuple[R, np.ndarray, float]], frame: FrameFeatures | None,
           given: bool) -> tuple[R, Status, bool]:
    """One frame of one object: ``decode(box)`` -> (its result, its mask at the image size, the mask's mean
    probability) at the track's box; on a given frame the object's appearance is learnt from that mask. A lost
    object is searched for on ``frame`` (when there is one and the track has an appearance) and decoded again
    there; the search's result is taken only when it passes every check. Returns (the frame's result, its
    status, whether the search picked the object up)."""
    assert tr.box is not None
    res, mask, p = decode(tr.box)
    frame = frame if tr.cfg.appearance else None
    if given and frame is not None:
        tr.look = frame.learn(mask)
    look = tr.look if frame is not None else None

    def judged(m: np.ndarray) -> tuple[float | None, np.ndarray | None]:
        if frame is None or look is None:
            return None, None
        return frame.judge(look, m) if tr.cfg.like_part else (frame.likeness(look, m), None)

    lk, part = judged(mask) if not given else (None, None)  # a given frame's mask is not judged
    st = tr.observe(mask, p, given, lk, like_part=part)
    if st != "lost" or frame is None or look is None or tr.cfg.search <= 0:
        return res, st, False
    cand = frame.search(look, tr.cfg.search)
    if cand is None:
        return res, st, False
    reason = tr.lost_reason
    res2, mask2, p2 = decode(grow_box(cand, frame.image_hw, tr.cfg.margin, tr.cfg.min_margin_px))
    lk2, part2 = judged(mask2)
    if tr.observe(mask2, p2, False, lk2, searched=True, like_part=part2) == "lost":
        tr.lost_reason = reason  # the frame's own reason, not the failed search's
        return res, st, False
    return res2, tr.status, True
