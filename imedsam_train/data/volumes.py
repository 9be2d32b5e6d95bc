"""CT volumes (BCV / Synapse, NIfTI) as 2-D axial slices: HU window, one mask per organ present.

Slices are the pictures ``imedsam-infer`` shows the model for the same volume (``imedsam_core.volume_view``: the
stored voxel order, MedSAM's CT window 40,400 for HU volumes, else the volume's percentiles), replicated to RGB,
so a model trained here meets the same view at inference. (Before, training reoriented to RAS with a radiological
flip and used TransUNet's [-125, 275] HU window: on an RAS volume the runtime's view was this one turned 180 deg.)
A slice with no labelled organ is skipped and counted (``Dataset.skipped['empty_slice']``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from imedsam_core.errors import UserError
from imedsam_core.nifti import Nifti, is_nifti, read_nifti
from imedsam_core.volume_view import auto_window, axial, slice_rgb
from imedsam_train.data.folder import split_path
from imedsam_train.data.records import Dataset, Record, Sample, read_split

# BCV "Multi-Atlas Labeling Beyond the Cranial Vault" abdomen labels 1..13 (label value = index + 1).
BCV_CLASSES = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior_vena_cava", "portal_splenic_vein", "pancreas", "adrenal_gland_right", "adrenal_gland_left",
]


@lru_cache(maxsize=2)  # slices of one volume are read together; keep memory bounded
def _read(path: str, intensities: bool) -> Nifti:
    """``intensities``: voxels as float32, as the runtime loads an image volume (same window, same pixels),
    else as stored (labels)."""
    nii = read_nifti(path, float32=intensities)
    data = nii.data
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():  # no HU to window, no label
        raise UserError(f"{path}: {int((~np.isfinite(data)).sum())} NaN or infinite voxels")
    return nii


@lru_cache(maxsize=2)
def _window(path: str) -> tuple[float, float]:
    """The whole volume's window, as the runtime chooses it by default (computed once per volume)."""
    return auto_window(_read(path, True).data)


def volume_records(
    image: str | Path, label: str | Path, class_values: dict[int, int], case: str,
    skipped: dict[str, int] | None = None,
) -> list[Record]:
    """One record per axial slice with at least one organ. class_values: label value -> class index."""
    img, labels = _read(str(image), True), _read(str(label), False)
    lab = labels.data
    if img.data.shape != lab.shape:
        raise UserError(f"{label}: label volume {lab.shape} does not match image {Path(image).name} {img.data.shape}")
    axes = img.axis_codes, labels.axis_codes
    if axes[0] != axes[1]:  # slices are taken in stored voxel order: both must be stored alike
        raise UserError(f"{label}: stored in {''.join(axes[1])} voxel order, its image {Path(image).name} in "
                        f"{''.join(axes[0])}")
    wanted = np.array(sorted(class_values))
    records = []
    for z in range(lab.shape[2]):
        present = np.intersect1d(np.unique(lab[:, :, z]), wanted)
        if present.size == 0:
            if skipped is not None:
                skipped["empty_slice"] = skipped.get("empty_slice", 0) + 1
            continue

        def reader(z: int = z, present: np.ndarray = present) -> Sample:
            rgb = slice_rgb(_read(str(image), True).data, z, _window(str(image)))
            lz = axial(_read(str(label), False).data, z)
            return Sample(f"{case}_z{z:03d}", rgb, [(class_values[int(v)], lz == v) for v in present])

        records.append(Record(f"{case}_z{z:03d}", reader=reader))
    return records


def _case_id(name: str) -> str:
    m = re.search(r"(\d+)", name)
    return m.group(1) if m else name


def find_volume_pairs(root: Path) -> list[tuple[str, Path, Path]]:
    """(case, image, label) for BCV (img/imgNNNN + label/labelNNNN), nnU-Net (imagesTr/labelsTr) layouts."""
    for img_dir, lab_dir in (("img", "label"), ("imagesTr", "labelsTr"), ("images", "labels"),
                             ("RawData/Training/img", "RawData/Training/label")):
        i, lab = root / img_dir, root / lab_dir
        if i.is_dir() and lab.is_dir():
            labels = {_case_id(p.name): p for p in lab.iterdir() if is_nifti(p)}
            pairs = []
            for p in sorted(i.iterdir()):
                if not is_nifti(p):
                    continue
                cid = _case_id(p.name.replace("_0000.nii", ".nii"))
                if cid not in labels:
                    raise UserError(f"{p}: has no label volume in {lab}")
                pairs.append((cid, p, labels[cid]))
            if pairs:
                return pairs
    raise UserError(f"{root}: no NIfTI volumes found (expected img/ + label/ or imagesTr/ + labelsTr/)")


def bcv_dataset(root: str | Path, split: str | Path | None = None) -> Dataset:
    """BCV/Synapse: 13 organ classes; ``split`` a case list (names or numbers, one a line)."""
    r = Path(root)
    pairs = find_volume_pairs(r)
    sp = split_path(r, split)
    if sp is not None:
        want = [_case_id(s) for s in read_split(sp)]
        have = {c: (i, lab) for c, i, lab in pairs}
        for c in want:
            if c not in have:
                raise UserError(f"{sp}: case '{c}' has no volume in {r}")
        pairs = [(c, *have[c]) for c in want]
    skipped: dict[str, int] = {}
    values = {k + 1: k for k in range(len(BCV_CLASSES))}
    records = [rec for c, i, lab in pairs for rec in volume_records(i, lab, values, f"case{c}", skipped)]
    return Dataset(records, list(BCV_CLASSES), str(r), skipped)
