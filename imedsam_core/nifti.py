"""Reading a NIfTI volume (nibabel), declared once for training (``imedsam-train bcv``), the runtime
(``imedsam-infer`` on a .nii/.nii.gz) and the benchmarks: the same checks and the same one-line errors.

What to do with non-finite voxels is the caller's: the runtime sets them to the volume's minimum and reports the
slices, training refuses the volume (no HU to window, no label to learn).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from imedsam_core.errors import UserError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


@dataclass(frozen=True)
class Nifti:
    data: np.ndarray  # (X, Y, Z) in the stored voxel order
    affine: np.ndarray
    header: Any  # nibabel's header, kept to write a label volume on the same grid

    @property
    def axis_codes(self) -> tuple[str, ...]:
        """The voxel axes' directions, e.g. ('R', 'A', 'S')."""
        import nibabel as nib

        return tuple(nib.aff2axcodes(self.affine))


def read_nifti(path: str | Path, float32: bool = True) -> Nifti:
    """The volume at ``path``: voxels as float32 (intensities, scaled by the header's slope and intercept) or as
    stored (labels); a 4-D file with one frame is taken as 3-D. UserError for a missing, unreadable or
    non-3-D file."""
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: file does not exist")
    try:
        img: Any = nib.load(str(p))  # a Nifti1Image; typed as the base class, which has no dataobj
        data = np.asarray(img.dataobj, dtype=np.float32) if float32 else np.asarray(img.dataobj)
        affine = np.asarray(img.affine)
    except Exception as e:  # nibabel raises many types for corrupt files
        raise UserError(f"{p}: not a readable NIfTI volume ({type(e).__name__}: {e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 1:
        raise UserError(f"{p}: expected a 3-D volume, got shape {data.shape}")
    return Nifti(data, affine, img.header)
