"""Segmentation loss (the paper's): 0.5·BCE + 0.5·soft Dice on the coarse and the fine (UGS-merged) logits,
total = (1 − a)·L_coarse + a·L_fine with a = min((epoch + 1) / 5, 1) (released code's schedule)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fine_weight(epoch: int, ramp_epochs: int = 5) -> float:
    return min((epoch + 1) / ramp_epochs, 1.0)


def ce_dice(logits: torch.Tensor, target: torch.Tensor, ce_weight: float = 0.5, eps: float = 1.0) -> torch.Tensor:
    """logits, target (B, N) -> 0.5·BCE + 0.5·(1 − soft Dice), Dice per item then averaged."""
    logits = logits.float()
    ce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = (2 * (p * target).sum(-1) + eps) / (p.sum(-1) + target.sum(-1) + eps)
    return ce_weight * ce + (1 - ce_weight) * (1 - dice).mean()


def select_class(values: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
    """(B, K, N) and the prompted class per item (B,) -> (B, N)."""
    return values.gather(1, cls.view(-1, 1, 1).expand(-1, 1, values.shape[-1]))[:, 0]


def imedsam_loss(
    coarse: torch.Tensor, fine: torch.Tensor, target: torch.Tensor, cls: torch.Tensor, epoch: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (total, coarse loss, fine loss)."""
    a = fine_weight(epoch)
    lc = ce_dice(select_class(coarse, cls), target)
    lf = ce_dice(select_class(fine, cls), target)
    return (1 - a) * lc + a * lf, lc.detach(), lf.detach()
