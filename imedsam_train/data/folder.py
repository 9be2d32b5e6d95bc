"""Image/mask folder pairs: ``DIR/images/<stem>.<ext>`` and ``DIR/masks/<stem>.<ext>`` (jpg, png, tif).

Also covers Kvasir-Sessile, Kvasir-SEG (plus its official ``kavsir_bboxes.json``) and CVC-ClinicDB
(``Original/`` + ``Ground Truth/`` TIFFs, or the PNG release).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from imedsam_core.errors import UserError
from imedsam_train.data.io import IMAGE_SUFFIXES, find_image
from imedsam_train.data.records import Dataset, Record, apply_split


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def pair_records(images: Path, masks: Path) -> list[Record]:
    """One record per image; an image without a mask is an error naming it."""
    if not images.is_dir():
        raise UserError(f"{images}: image folder not found")
    if not masks.is_dir():
        raise UserError(f"{masks}: mask folder not found")
    records = []
    for img in _image_files(images):
        m = find_image(masks, img.stem)
        if m is None:
            raise UserError(f"{img}: has no mask named '{img.stem}.*' in {masks}")
        records.append(Record(img.stem, img, [(0, m)]))
    if not records:
        raise UserError(f"{images}: no images (.jpg/.png/.tif) found")
    return records


def read_pair(root: Path, stem: str) -> tuple[np.ndarray, np.ndarray]:
    """``stem``'s RGB image and boolean mask under ``root/images`` and ``root/masks``, read by ``Record.load`` as
    training and evaluation read them (pixels over 127, specks dropped, sizes checked): a stray pixel would
    otherwise stretch the tight box to the image's corner. A missing, unreadable or mismatched file is a
    UserError naming it."""
    img_p, msk_p = find_image(root / "images", stem), find_image(root / "masks", stem)
    if img_p is None or msk_p is None:
        raise UserError(f"{root / ('images' if img_p is None else 'masks')}: no file for the stem {stem!r}")
    s = Record(stem, img_p, [(0, msk_p)]).load()
    return s.image, s.masks[0][1]


def folder_dataset(root: str | Path, split: str | Path | None = None, name: str = "foreground") -> Dataset:
    """``root/images`` + ``root/masks`` with matching stems; ``split`` a stem-list file (optional)."""
    r = Path(root)
    if not r.is_dir():
        raise UserError(f"{r}: data folder not found")
    return Dataset(apply_split(pair_records(r / "images", r / "masks"), split), [name], str(r))


def split_path(root: str | Path, split: str | Path | None) -> Path | None:
    """A split given as a name ('train') means ``root/splits/<name>.txt``; a path is used as is."""
    if split is None:
        return None
    s = Path(split)
    if s.suffix or s.parent != Path("."):
        return s
    return Path(root) / "splits" / f"{s}.txt"


def kvasir_dataset(root: str | Path, split: str | Path | None = None) -> Dataset:
    """Kvasir-Sessile or Kvasir-SEG: the folder layout with ``splits/<name>.txt`` stem lists."""
    return folder_dataset(root, split_path(root, split), name="polyp")


def read_kvasir_boxes(path: str | Path) -> dict[str, list[np.ndarray]]:
    """Kvasir-SEG's official ``kavsir_bboxes.json``: stem -> list of (x0, y0, x1, y1) boxes."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{p}: box file not found") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{p}: unreadable box file ({e})") from None
    out: dict[str, list[np.ndarray]] = {}
    try:
        for stem, entry in data.items():
            out[stem] = [np.array([b["xmin"], b["ymin"], b["xmax"], b["ymax"]], dtype=np.float64)
                         for b in entry["bbox"]]
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{p}: not a Kvasir-SEG box file (missing {e})") from None
    return out


CVC_LAYOUTS = (("Original", "Ground Truth"), ("PNG/Original", "PNG/Ground Truth"),
               ("TIF/Original", "TIF/Ground Truth"), ("images", "masks"))


def cvc_dataset(root: str | Path, split: str | Path | None = None) -> Dataset:
    """CVC-ClinicDB: ``Original/`` and ``Ground Truth/`` (TIFF or PNG release), or images/masks."""
    r = Path(root)
    for img_dir, mask_dir in CVC_LAYOUTS:
        if (r / img_dir).is_dir() and (r / mask_dir).is_dir():
            recs = pair_records(r / img_dir, r / mask_dir)
            return Dataset(apply_split(recs, split_path(r, split)), ["polyp"], str(r))
    raise UserError(f"{r}: no CVC-ClinicDB layout found (expected 'Original/' and 'Ground Truth/')")


def seeded_split(
    root: str | Path, train: str | Path | None, val: str | Path | None, seed: int, out_dir: str | Path,
    val_fraction: float = 0.15,
) -> tuple[Path, Path]:
    """Train/val stem lists for a plain folder: given ones, ``root/splits/{train,val}.txt``, or else a
    seeded 85/15 split written to ``out_dir`` (the run's folder: evaluation can name the same stems)."""
    r = Path(root)
    tr, va = split_path(r, train or "train"), split_path(r, val or "val")
    assert tr is not None and va is not None
    if tr.is_file() and va.is_file():
        return tr, va
    if train is not None or val is not None:
        missing = tr if not tr.is_file() else va
        raise UserError(f"{missing}: split file not found")
    stems = [rec.stem for rec in pair_records(r / "images", r / "masks")]
    if len(stems) < 2:
        raise UserError(f"{r}: needs at least 2 image/mask pairs to split into train and val")
    order = np.random.default_rng(seed).permutation(len(stems))
    n_val = max(1, round(val_fraction * len(stems)))
    from imedsam_core.atomic import atomic_write_text

    tr, va = Path(out_dir) / "train.txt", Path(out_dir) / "val.txt"
    atomic_write_text(va, "\n".join(stems[i] for i in sorted(order[:n_val])) + "\n")
    atomic_write_text(tr, "\n".join(stems[i] for i in sorted(order[n_val:])) + "\n")
    return tr, va
