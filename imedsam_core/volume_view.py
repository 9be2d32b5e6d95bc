"""How slice z of a volume becomes the picture a model sees: declared once for training and evaluation on NIfTI
volumes (``imedsam-train bcv``, ``imedsam-eval``) and for the runtime (``imedsam-infer`` on a .nii/.nii.gz).

- View: ``data[:, :, z].T`` in the stored voxel order (columns = the first voxel axis, rows = the second), no
  reorientation. A box ``x0,y0,x1,y1`` on slice z is then voxels i in [x0, x1), j in [y0, y1), and the view is
  MedSAM's own (its CT slices are SimpleITK arrays, the same order), which every shipped model starts from.
- Window: MedSAM's CT soft-tissue window (level 40, width 400 HU) when the volume holds values below -500 (HU),
  else its 0.5-99.5 percentile range; mapped onto 0..255 by ``imedsam_core.pixels.window_to_uint8`` in float32.

Training used to reorient to RAS with a radiological flip and TransUNet's [-125, 275] HU window, so a model
trained on BCV saw each slice rotated and windowed otherwise than ``imedsam-infer`` later showed it.
"""

from __future__ import annotations

import numpy as np

from imedsam_core.pixels import window_to_uint8

CT_LEVEL, CT_WIDTH = 40.0, 400.0
CT_WINDOW = (CT_LEVEL - CT_WIDTH / 2, CT_LEVEL + CT_WIDTH / 2)  # (-160, 240) HU
HU_BELOW = -500.0  # a volume with values under this is taken to be CT in Hounsfield units


def auto_window(data: np.ndarray) -> tuple[float, float]:
    """(low, high) for a whole volume: the CT window for HU data, else its 0.5-99.5 percentiles."""
    if float(np.min(data)) < HU_BELOW:
        return CT_WINDOW
    lo, hi = np.percentile(data, [0.5, 99.5])
    return float(lo), float(hi) if hi > lo else float(lo) + 1.0


def axial(data: np.ndarray, z: int) -> np.ndarray:
    """Slice z of an (X, Y, Z) array as (Y, X): the view above (labels too)."""
    return np.ascontiguousarray(data[:, :, z].T)


def slice_rgb(data: np.ndarray, z: int, window: tuple[float, float]) -> np.ndarray:
    """(Y, X, 3) uint8 RGB of slice z under ``window`` (grey replicated)."""
    # the transposed view, not axial()'s contiguous copy: the window makes a new array anyway
    g = window_to_uint8(data[:, :, z].T.astype(np.float32, copy=False), window)
    return np.repeat(g[:, :, None], 3, axis=2)
