"""Reading images and masks: Pillow first, tifffile for the TIFFs Pillow cannot open (CVC-ClinicDB).

Every failure is a ``UserError`` naming the file, including headers past Pillow's decompression-bomb limit
and float images holding NaN or Inf (no sensible 8-bit value). Masks are binarised with ``> 127`` (JPEG masks carry
compression noise); 3-channel masks (Kvasir-SEG) are reduced to their first channel.
Other depths than 8 bits (16-bit, float) become 8-bit by ``imedsam_core.pixels``' rule, the runtime's too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imedsam_core.errors import UserError
from imedsam_core.pixels import nonfinite_count, to_uint8

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


def _read_array(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        a = _pil_array(path)
    except Image.DecompressionBombError:  # not an OSError: Pillow refuses the header before decoding
        raise UserError(f"{path}: image too large to decode (its header declares more pixels than Pillow's "
                        "limit)") from None
    except (UnidentifiedImageError, OSError, ValueError) as pil_error:
        if path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            try:
                a = np.asarray(tifffile.imread(path))
            except Exception as e:  # tifffile raises several types for corrupt files
                raise UserError(f"{path}: unreadable TIFF ({type(e).__name__}: {e})") from None
        else:
            raise UserError(f"{path}: unreadable image ({pil_error})") from None
    if bad := nonfinite_count(a):
        raise UserError(f"{path}: {bad} NaN or infinite pixel values")
    return a


def _pil_array(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as f:
        f.load()
        im: Image.Image = f
        if im.mode not in ("L", "RGB", "RGBA", "1", "I;16", "I", "F"):
            im = im.convert("RGB")  # palette, CMYK, YCbCr ...
        return np.asarray(im)


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3)."""
    p = Path(path)
    a = to_uint8(_read_array(p))
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    elif a.ndim == 3 and a.shape[0] in (3, 4) and a.shape[2] not in (3, 4):  # planar TIFF
        a = np.moveaxis(a[:3], 0, -1)
    if a.ndim != 3 or a.shape[2] != 3 or min(a.shape[:2]) < 1:
        raise UserError(f"{p}: not an RGB or grey image (shape {a.shape})")
    return np.ascontiguousarray(a)


def read_mask(path: str | Path) -> np.ndarray:
    """Binary mask (H, W) bool: ``value > 127`` (first channel of a colour mask)."""
    p = Path(path)
    a = _read_array(p)
    if a.dtype == bool:
        return a if a.ndim == 2 else a[..., 0]
    if a.ndim == 3:
        a = a[..., 0] if a.shape[2] in (3, 4) else a[0]
    if a.ndim != 2:
        raise UserError(f"{p}: not a 2-D mask (shape {a.shape})")
    if a.dtype != np.uint8 and a.size and a.max() <= 1:  # 0/1 label images
        return a > 0
    return to_uint8(a) > 127


def find_image(folder: Path, stem: str) -> Path | None:
    """The file named ``stem`` with an image suffix in ``folder`` (first match), or None."""
    for suf in IMAGE_SUFFIXES:
        for cand in (folder / f"{stem}{suf}", folder / f"{stem}{suf.upper()}"):
            if cand.is_file():
                return cand
    return None
