"""Frequency adapter: the image spectrum as a token grid, refined block by block."""

from __future__ import annotations

import torch
from torch import nn


def spectrum(image: torch.Tensor, channel: int = 0, mode: str = "amplitude", eps: float = 1e-8) -> torch.Tensor:
    """Centred 2-D spectrum of one image channel, min-max normalised per image.

    image: (B, 3, H, W) in [0, 1]. Returns (B, 1, H, W) in [0, 1]. Released code: amplitude (``abs``) of
    ``fftshift(fft2(.))``, no log. Computed with torch.fft on the image's device, in float32 whatever the
    autocast state (fp16 FFT magnitudes overflow).
    """
    x = image[:, channel].float()
    with torch.autocast(device_type=x.device.type, enabled=False):
        f = torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))
        s = f.abs() if mode == "amplitude" else torch.angle(f)
        return minmax_normalise(s, eps)[:, None]


def minmax_normalise(s: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-image min-max normalisation of (B, H, W)."""
    lo = s.amin(dim=(-2, -1), keepdim=True)
    hi = s.amax(dim=(-2, -1), keepdim=True)
    return (s - lo) / (hi - lo + eps)


class FrequencyAdapter(nn.Module):
    """One block's adapter: f <- z + up(gelu(down(z))), z = LayerNorm(f). Bottleneck width ``hidden``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.down = nn.Linear(dim, hidden)
        self.up = nn.Linear(hidden, dim)
        self.act: nn.Module = nn.GELU()  # a module, so the exporter can swap in its fusable twin

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        z = self.norm(f)
        return z + self.up(self.act(self.down(z)))
