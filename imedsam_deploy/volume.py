"""NIfTI volumes (nibabel): axial slices as RGB images for the model, label volumes back out.

Slice z is shown as ``imedsam_core.volume_view`` declares for training too: x = the first voxel axis (columns),
y = the second (rows), so a box ``x0,y0,x1,y1`` on slice z covers voxels i in [x0, x1), j in [y0, y1) of
``data[:, :, z]``; intensities windowed to 8 bits, a CT soft-tissue window (level 40, width 400 HU) when the volume
looks like CT (values below -500), else its 0.5-99.5 percentile range; ``--window L,W`` overrides.

Non-finite voxels (NaN, +-Inf) carry no intensity: a volume with no finite voxel is refused; otherwise they
are set to the volume's finite minimum (background under any window) before the window is chosen, and the
slices that held any are listed in ``Volume.nonfinite`` (their results say status ``nonfinite``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imedsam_core.errors import UserError
from imedsam_core.nifti import read_nifti
from imedsam_core.volume_view import auto_window, slice_rgb


@dataclass
class Volume:
    path: Path
    data: np.ndarray  # (X, Y, Z) float32
    affine: np.ndarray
    header: Any
    window: tuple[float, float]  # (low, high) intensities mapped to 0..255
    nonfinite: dict[int, int] = field(default_factory=dict)  # slice -> voxels that were NaN/Inf (now the minimum)

    @property
    def num_slices(self) -> int:
        return int(self.data.shape[2])

    @property
    def slice_hw(self) -> tuple[int, int]:
        return int(self.data.shape[1]), int(self.data.shape[0])

    def slice_rgb(self, z: int) -> np.ndarray:
        """(Y, X, 3) uint8 RGB of slice z (grey replicated)."""
        return slice_rgb(self.data, z, self.window)


def load_volume(path: Path, window: tuple[float, float] | None = None) -> Volume:
    nii = read_nifti(path)
    data = nii.data
    nonfinite: dict[int, int] = {}
    bad = ~np.isfinite(data)
    if bad.any():
        if bad.all():
            raise UserError(f"{path}: every voxel is NaN or infinite (no intensities to segment)")
        per_slice = bad.sum(axis=(0, 1))
        nonfinite = {int(z): int(n) for z, n in enumerate(per_slice) if n}
        data = np.where(bad, data[~bad].min(), data)  # a new array: the loaded one may be a read-only map
    return Volume(path, data, nii.affine, nii.header, window or auto_window(data), nonfinite)


def save_labels(vol: Volume, labels: np.ndarray, path: Path) -> None:
    """labels (Z, Y, X) uint8 -> a NIfTI label volume with the input's grid (affine and header)."""
    import nibabel as nib

    out = np.ascontiguousarray(labels.transpose(2, 1, 0)).astype(np.uint8)  # back to (X, Y, Z)
    hdr = vol.header.copy()
    hdr.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(out, vol.affine, hdr)
    img.header.set_slope_inter(1, 0)
    nib.save(img, str(path))
