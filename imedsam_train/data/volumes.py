"""CT volumes (BCV / Synapse, NIfTI) as 2-D axial slices: HU window, one mask per organ present.

Slices are shown in the radiological view of the RAS-reoriented volume (anterior up, the patient's right
on the image left), windowed to [-125, 275] HU (TransUNet's Synapse preprocessing) and replicated to RGB.
A slice with no labelled organ is skipped and counted (``Dataset.skipped['empty_slice']``).
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import numpy as np

from imedsam_core.errors import UserError
from imedsam_train.data.folder import split_path
from imedsam_train.data.records import Dataset, Record, Sample, read_split

# BCV "Multi-Atlas Labeling Beyond the Cranial Vault" abdomen labels 1..13 (label value = index + 1).
BCV_CLASSES = [
    "spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior_vena_cava", "portal_splenic_vein", "pancreas", "adrenal_gland_right", "adrenal_gland_left",
]
HU_WINDOW = (-125.0, 275.0)
NIFTI = (".nii.gz", ".nii")


def window(hu: np.ndarray, lo: float = HU_WINDOW[0], hi: float = HU_WINDOW[1]) -> np.ndarray:
    return (np.clip((hu.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@lru_cache(maxsize=2)  # slices of one volume are read together; keep memory bounded
def _load_volume(path: str) -> np.ndarray:
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for corrupt files
        raise UserError(f"{path}: unreadable NIfTI volume ({type(e).__name__}: {e})") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise UserError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    if np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():  # no HU to window, no label
        raise UserError(f"{path}: {int((~np.isfinite(data)).sum())} NaN or infinite voxels")
    return data


def axial(vol: np.ndarray, z: int) -> np.ndarray:
    """(X, Y, Z) RAS volume -> axial slice z in the radiological view (rows: anterior first)."""
    return np.ascontiguousarray(vol[::-1, ::-1, z].T)


def volume_records(
    image: str | Path, label: str | Path, class_values: dict[int, int], case: str,
    skipped: dict[str, int] | None = None,
) -> list[Record]:
    """One record per axial slice with at least one organ. class_values: label value -> class index."""
    lab = _load_volume(str(label))
    img_shape = _load_volume(str(image)).shape
    if img_shape != lab.shape:
        raise UserError(f"{label}: label volume {lab.shape} does not match image {Path(image).name} {img_shape}")
    wanted = np.array(sorted(class_values))
    records = []
    for z in range(lab.shape[2]):
        present = np.intersect1d(np.unique(lab[:, :, z]), wanted)
        if present.size == 0:
            if skipped is not None:
                skipped["empty_slice"] = skipped.get("empty_slice", 0) + 1
            continue

        def reader(z: int = z, present: np.ndarray = present) -> Sample:
            hu = axial(_load_volume(str(image)), z)
            lz = axial(_load_volume(str(label)), z)
            rgb = np.repeat(window(hu)[:, :, None], 3, axis=2)
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
            labels = {_case_id(p.name): p for p in lab.iterdir() if p.name.endswith(NIFTI)}
            pairs = []
            for p in sorted(i.iterdir()):
                if not p.name.endswith(NIFTI):
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
