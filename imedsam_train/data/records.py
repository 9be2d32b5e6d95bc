"""A dataset is a list of ``Record``s: one 2-D image with one binary mask per labelled class.

Records are cheap (paths); ``Record.load()`` reads the pixels and checks them, raising a one-line
``UserError`` that names the file for anything unusable (missing mask, size mismatch, unreadable file).
Empty masks are not errors: ``Sample`` keeps them and the training/eval sets skip and count them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imedsam_core.errors import UserError
from imedsam_train.data.io import read_image, read_mask


@dataclass
class Sample:
    stem: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    masks: list[tuple[int, np.ndarray]]  # (class index, (H, W) bool)


@dataclass
class Record:
    stem: str
    image_path: Path | None = None
    mask_paths: list[tuple[int, Path]] = field(default_factory=list)
    # for volume slices and other in-memory sources: returns the Sample directly
    reader: Callable[[], Sample] | None = None

    def load(self) -> Sample:
        if self.reader is not None:
            return self.reader()
        assert self.image_path is not None
        image = read_image(self.image_path)
        masks = []
        for cls, mp in self.mask_paths:
            m = read_mask(mp)
            if m.shape != image.shape[:2]:
                raise UserError(
                    f"{mp}: mask size {m.shape[1]}x{m.shape[0]} does not match its image "
                    f"{self.image_path.name} ({image.shape[1]}x{image.shape[0]})"
                )
            masks.append((cls, remove_specks(m)))
        return Sample(self.stem, image, merge_classes(masks))


@dataclass
class Dataset:
    """Records plus the class names (index = channel of the model's output)."""

    records: list[Record]
    class_names: list[str]
    source: str
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count (e.g. empty slices)


def read_split(path: str | Path) -> list[str]:
    """One stem per line; blank lines and '#' comments ignored; file suffixes stripped."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: split file not found")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: unreadable split file ({e})") from None
    stems = []
    for line in lines:
        s = line.split("#", 1)[0].strip()
        if s:
            stems.append(Path(s).stem if Path(s).suffix.lower() in (".jpg", ".jpeg", ".png", ".tif", ".tiff") else s)
    if not stems:
        raise UserError(f"{p}: split file lists no stems")
    return stems


def apply_split(records: list[Record], split: str | Path | None) -> list[Record]:
    if split is None:
        return records
    by_stem = {r.stem: r for r in records}
    out = []
    for s in read_split(split):
        if s not in by_stem:
            raise UserError(f"{split}: stem '{s}' has no image in the dataset")
        out.append(by_stem[s])
    return out


SPECK_MAX_PX = 4


def remove_specks(mask: np.ndarray, max_px: int = SPECK_MAX_PX) -> np.ndarray:
    """Drop connected components of at most ``max_px`` pixels (8-connectivity).

    About 1 in 10 Kvasir-SEG / Kvasir-Sessile masks carries a stray single pixel (often in a corner) that
    would stretch the tight box over the whole image and dominate the Hausdorff distance.
    """
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1 and mask.sum() > max_px:
        return mask
    sizes = np.bincount(lab.ravel())
    keep = sizes > max_px
    keep[0] = False
    return keep[lab]


def merge_classes(masks: list[tuple[int, np.ndarray]]) -> list[tuple[int, np.ndarray]]:
    """One mask per class (several files of one organ are OR-ed), in class order."""
    out: dict[int, np.ndarray] = {}
    for c, m in masks:
        out[c] = m if c not in out else (out[c] | m)
    return sorted(out.items(), key=lambda t: t[0])


def to_array(masks: list[tuple[int, np.ndarray]]) -> np.ndarray:
    return np.stack([m for _, m in masks]) if masks else np.zeros((0, 1, 1), bool)
