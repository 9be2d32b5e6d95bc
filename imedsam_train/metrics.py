"""Per-image metrics on binary masks: Dice and IoU (%), HD95 and full Hausdorff distance (pixels).

Surface distances as medpy and MONAI define them: the boundary pixels of each mask are the mask minus its
erosion by the cross-shaped (1-connected) structuring element, with background beyond the image border;
distances to the other boundary come from scipy's exact Euclidean distance transform. HD = max of the two
directed maxima (``medpy.metric.binary.hd``); HD95 = max of the two directed 95th percentiles, MONAI's
``compute_hausdorff_distance(percentile=95)`` (medpy's ``hd95`` instead takes one percentile over both
directions pooled). scipy.ndimage is used directly (already a dependency); the tests check against MONAI.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage, stats


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    s = pred.sum() + gt.sum()
    return 100.0 if s == 0 else float(200.0 * np.logical_and(pred, gt).sum() / s)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    u = np.logical_or(pred, gt).sum()
    return 100.0 if u == 0 else float(100.0 * np.logical_and(pred, gt).sum() / u)


_CROSS = ndimage.generate_binary_structure(2, 1)  # medpy's and MONAI's default connectivity


def _surface(m: np.ndarray) -> np.ndarray:
    return m & ~ndimage.binary_erosion(m, structure=_CROSS, border_value=0)


def surface_distances(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directed distances pred-surface -> gt-surface and gt-surface -> pred-surface (pixels)."""
    sp, sg = _surface(pred), _surface(gt)
    d_to_g = ndimage.distance_transform_edt(~sg)
    d_to_p = ndimage.distance_transform_edt(~sp)
    return d_to_g[sp], d_to_p[sg]


def hausdorff(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """(HD95, HD) in pixels; NaN when either mask is empty (undefined)."""
    if not pred.any() or not gt.any():
        return math.nan, math.nan
    a, b = surface_distances(pred, gt)
    return float(max(np.percentile(a, 95), np.percentile(b, 95))), float(max(a.max(), b.max()))


def all_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    pred, gt = pred.astype(bool), gt.astype(bool)
    hd95, hd = hausdorff(pred, gt)
    return {"dice": dice(pred, gt), "iou": iou(pred, gt), "hd95": hd95, "hd": hd}


def summarise(values: list[float]) -> dict[str, float]:
    """mean ± std (population) over finite values, and how many were undefined."""
    v = np.array([x for x in values if not math.isnan(x)], dtype=np.float64)
    return {
        "mean": float(v.mean()) if v.size else math.nan,
        "std": float(v.std()) if v.size else math.nan,
        "n": int(v.size),
        "undefined": len(values) - int(v.size),
    }


def paired(model: list[float], base: list[float], lower_is_better: bool = False) -> dict[str, object]:
    """The model minus a baseline on the same cases (those where both are defined): the mean difference, its
    95 % confidence interval (paired t, scipy's ``ttest_rel``; NaN with fewer than two cases), and on how many
    cases the model is better and worse. A margin whose interval spans 0 is not one the cases establish."""
    pairs = np.array([(a, b) for a, b in zip(model, base, strict=True) if not (math.isnan(a) or math.isnan(b))],
                     dtype=np.float64).reshape(-1, 2)
    d = pairs[:, 0] - pairs[:, 1]
    mean = float(d.mean()) if d.size else math.nan
    if d.size < 2:
        lo = hi = math.nan
    elif not d.std() > 0:  # every case moved by the same amount: no spread to widen the interval
        lo = hi = mean
    else:
        ci = stats.ttest_rel(pairs[:, 0], pairs[:, 1]).confidence_interval(0.95)
        lo, hi = float(ci.low), float(ci.high)
    gain = -d if lower_is_better else d  # > 0 where the model is better
    return {"mean": mean, "ci95": [lo, hi], "n": int(d.size), "better": int((gain > 0).sum()), "worse": int((gain < 0).sum())}
