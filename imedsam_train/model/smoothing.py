"""A fixed Gaussian over a logit map: the lite model's base logit, before its points read it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def gaussian_taps(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian of standard deviation ``sigma`` pixels, radius ceil(3 sigma) (at least 1)."""
    if not sigma > 0:
        raise ValueError(f"sigma {sigma}: must be > 0")
    r = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).float()


class LogitSmoothing(nn.Module):
    """(B, C, H, W) -> the same, each channel convolved with a separable Gaussian; edges replicated, so a map
    that is constant near the border stays so (zero padding would pull the border's logits towards 0).
    Exports as Pad (edge) and two depthwise Conv nodes; the taps are a non-persistent buffer (no weights in
    a state dict: the checkpoint's config rebuilds them)."""

    taps: torch.Tensor

    def __init__(self, sigma: float) -> None:
        super().__init__()
        self.sigma = sigma
        self.register_buffer("taps", gaussian_taps(sigma), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        r = (self.taps.numel() - 1) // 2
        k = self.taps.to(x.dtype)
        x = F.pad(x, (r, r, r, r), mode="replicate")
        x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
