"""AMOS / SA-Med2D style slices: ``images/<stem>.png`` with one binary PNG per organ,
``masks/<stem>_<organ>_<k>.png`` (several k of one organ are merged)."""

from __future__ import annotations

import re
from pathlib import Path

from imedsam_core.errors import UserError
from imedsam_train.data.io import IMAGE_SUFFIXES
from imedsam_train.data.records import Dataset, Record, apply_split

_ORGAN_K = re.compile(r".+_\d+")  # the "<organ>_<k>" tail of a mask stem


def looks_like_organ_png(root: str | Path) -> bool:
    """True when some mask is named ``<image stem>_<organ>_<k>`` and no image has a same-stem mask: the
    layout auto-detection must not take a folder dataset missing a mask for an organ-PNG one."""
    r = Path(root)
    stems = {p.stem for p in (r / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = [m.stem for m in (r / "masks").iterdir() if m.suffix.lower() in IMAGE_SUFFIXES]
    if any(m in stems for m in masks):
        return False
    for m in masks:  # every '_' is a candidate end of the image stem (stems and organs may hold '_')
        for i, ch in enumerate(m):
            if ch == "_" and m[:i] in stems and _ORGAN_K.fullmatch(m[i + 1 :]):
                return True
    return False


def organ_png_dataset(root: str | Path, classes: list[str] | None = None, split: str | Path | None = None) -> Dataset:
    """``classes``: organ names in output-channel order (default: every organ found, sorted).
    Organs not in ``classes`` are ignored; an image with none of them has no masks (skipped, counted)."""
    r = Path(root)
    img_dir, mask_dir = r / "images", r / "masks"
    if not img_dir.is_dir() or not mask_dir.is_dir():
        raise UserError(f"{r}: expected images/ and masks/ folders")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"{img_dir}: no images found")
    stems = sorted((p.stem for p in images), key=len, reverse=True)  # longest stem wins a prefix tie
    organs: dict[str, dict[str, list[Path]]] = {p.stem: {} for p in images}
    for m in sorted(mask_dir.iterdir()):
        if m.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        for stem in stems:
            g = re.fullmatch(re.escape(stem) + r"_(.+)_(\d+)", m.stem)
            if g:
                organs[stem].setdefault(g.group(1), []).append(m)
                break
    names = classes or sorted({o for d in organs.values() for o in d})
    if not names:
        raise UserError(f"{mask_dir}: no masks named <image>_<organ>_<k>.png")
    index = {n: i for i, n in enumerate(names)}
    records = []
    for p in images:
        paths = [(index[o], mp) for o, mps in sorted(organs[p.stem].items()) if o in index for mp in mps]
        records.append(Record(p.stem, p, paths))
    ds = Dataset(apply_split(records, split), names, str(r))
    return ds
