"""Fourier encoding of query coordinates (NeRF style, the paper's 2-D form)."""

from __future__ import annotations

import math

import torch


def fourier_dim(levels: int, include_input: bool, coord_dim: int = 2) -> int:
    return coord_dim * (2 * levels + (1 if include_input else 0))


def fourier_freqs(levels: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(L,) float32 frequencies 2^k pi, k < L."""
    return (2.0 ** torch.arange(levels, device=device, dtype=torch.float32)) * math.pi


def fourier_encode(p: torch.Tensor, levels: int, include_input: bool = True,
                   freqs: torch.Tensor | None = None) -> torch.Tensor:
    """gamma(p) = [p, sin(2^k pi p), cos(2^k pi p)]_{k<L} for p (..., 2) in [-1, 1].

    Always computed in float32: at 2^9 pi the phase error of fp16/bf16 inputs is of order 1 radian.
    ``freqs``: ``fourier_freqs(levels)`` made once by the caller (on a GPU, three kernels fewer per call).
    """
    p = p.float()
    with torch.autocast(device_type=p.device.type, enabled=False):
        if freqs is None:
            freqs = fourier_freqs(levels, p.device)
        ang = (p[..., None, :] * freqs[:, None]).flatten(-2)  # (..., L*2): level-major
        parts = [torch.sin(ang), torch.cos(ang)]
        if include_input:
            parts.insert(0, p)
        return torch.cat(parts, dim=-1)
