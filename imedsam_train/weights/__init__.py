"""The trained checkpoint shipped with the package (see MODEL_CARD.md): the default model of the
README's main job when no finished run exists in the current folder."""

from __future__ import annotations

from pathlib import Path

from imedsam_deploy.errors import UserError
from imedsam_deploy.paths import Choice

SHIPPED_NAME = "imedsam_tiny_kvasir.pt"


def shipped_checkpoint() -> Path:
    """Path of the shipped tiny Kvasir-Sessile checkpoint (research use only)."""
    p = Path(__file__).resolve().parent / SHIPPED_NAME
    if not p.is_file():
        raise UserError(f"{p}: the shipped checkpoint is missing from this installation (reinstall imedsam)")
    return p


def default_checkpoint(root: Path | None = None) -> Path:
    """The newest finished run's best checkpoint under ``root/runs`` (default: the current folder), else the
    shipped one."""
    return default_checkpoint_choice(root).path


def default_checkpoint_choice(root: Path | None = None) -> Choice:
    """``default_checkpoint`` and why, for the commands' "using ..." line."""
    from imedsam_deploy.paths import finished_checkpoint, no_finished_run_reason

    return finished_checkpoint(root) or Choice(shipped_checkpoint(), "the shipped model: " + no_finished_run_reason(root))
