"""Decoded pixel arrays to 8 bits: one rule for training, evaluation and the runtime.

Training and evaluation read images with Pillow/tifffile, the runtime with OpenCV; both hand the decoded array,
at its own depth, to ``to_uint8`` so a 16-bit or float file gives the model the same pixels either way. The rule:
8-bit as it is; booleans to 0/255; floats within [0, 1] times 255; anything else that leaves 0..255 is stretched
over its own range (divided by its maximum, or min-max scaled when it holds negative values such as signed
Hounsfield units). A 12-bit CT slice stored in 16 bits thus keeps its grey levels instead of the 4 to 7 that
OpenCV's own 8-bit conversion (the top byte) leaves it. An explicit window (``window_to_uint8``) replaces the
rule where the user gives one.
"""

from __future__ import annotations

import numpy as np


def nonfinite_count(a: np.ndarray) -> int:
    """Pixels without a sensible 8-bit value (NaN or infinite floats); 0 for integer arrays."""
    return int((~np.isfinite(a)).sum()) if np.issubdtype(a.dtype, np.floating) else 0


def window_to_uint8(a: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Values from ``window``'s low to its high end mapped linearly onto 0..255 (rounded), clipped outside it: an
    intensity window (``imedsam-infer --window``, a volume's CT window) in the array's own units."""
    lo, hi = window
    return np.clip((a - lo) / max(hi - lo, 1e-6) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def looks_grey(rgb: np.ndarray) -> bool:
    """An (H, W, 3) image whose channels agree to within compression noise over its lit pixels (mean |R-G| and
    |G-B| under 4 grey levels; a grey MJPG video decodes 2 apart): CT, MR or ultrasound, not a colour endoscopy
    frame (each of the 1196 Kvasir images is 8.6 or more apart in both, each frame of the shared clip 20.8). An
    image with under 5 % lit pixels (a black frame) is not judged grey: too little to tell, and colour input is
    the shipped model's."""
    a = rgb.astype(np.int16)
    lit = a.max(axis=2) > 32
    if lit.mean() < 0.05:
        return False
    return bool(np.abs(a[..., 0] - a[..., 1])[lit].mean() < 4 and np.abs(a[..., 1] - a[..., 2])[lit].mean() < 4)


def to_uint8(a: np.ndarray) -> np.ndarray:
    """The array's values as uint8 by the rule above; the shape is kept. Expects finite values."""
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    floating = np.issubdtype(a.dtype, np.floating)
    a = a.astype(np.float64)
    lo = float(a.min()) if a.size else 0.0
    hi = float(a.max()) if a.size else 0.0
    if floating and lo >= 0.0 and hi <= 1.0:  # float images in [0, 1]
        a = a * 255.0
    elif lo < 0.0:  # signed data (e.g. HU): its own range
        a = (a - lo) / max(hi - lo, 1e-12) * 255.0
    elif hi > 255:  # 16-bit / large-range images: scaled by their own maximum
        a = a / hi * 255.0
    return np.clip(a + 0.5 if floating or lo < 0.0 else a, 0, 255).astype(np.uint8)
