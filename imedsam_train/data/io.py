"""Reading images and masks: Pillow first, tifffile for the TIFFs Pillow cannot open (CVC-ClinicDB).

Every failure is a ``UserError`` naming the file, including headers past Pillow's decompression-bomb limit
and float images holding NaN or Inf (no sensible 8-bit value). Masks are binarised with ``> 127`` (JPEG masks carry
compression noise); 3-channel masks (Kvasir-SEG) are reduced to their first channel.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imedsam_core.errors import UserError

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
    if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
        raise UserError(f"{path}: {int((~np.isfinite(a)).sum())} NaN or infinite pixel values")
    return a


def _pil_array(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as f:
        f.load()
        im: Image.Image = f
        if im.mode not in ("L", "RGB", "RGBA", "1", "I;16", "I", "F"):
            im = im.convert("RGB")  # palette, CMYK, YCbCr ...
        return np.asarray(im)


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    floating = np.issubdtype(a.dtype, np.floating)
    a = a.astype(np.float64)
    hi = float(a.max()) if a.size else 0.0
    if floating and hi <= 1.0:  # float images in [0, 1]
        a = a * 255.0
    elif hi > 255:  # 16-bit / large-range images: scale by their own maximum
        a = a / hi * 255.0
    return np.clip(a + 0.5 if floating else a, 0, 255).astype(np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3)."""
    p = Path(path)
    a = _to_uint8(_read_array(p))
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
    return _to_uint8(a) > 127


def find_image(folder: Path, stem: str) -> Path | None:
    """The file named ``stem`` with an image suffix in ``folder`` (first match), or None."""
    for suf in IMAGE_SUFFIXES:
        for cand in (folder / f"{stem}{suf}", folder / f"{stem}{suf.upper()}"):
            if cand.is_file():
                return cand
    return None
