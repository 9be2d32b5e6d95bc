"""Fourier encoding of query coordinates (NeRF style, the paper's 2-D form)."""

from __future__ import annotations

import math

import torch


def fourier_dim(levels: int, include_input: bool, coord_dim: int = 2) -> int:
    return coord_dim * (2 * levels + (1 if include_input else 0))


def fourier_encode(p: torch.Tensor, levels: int, include_input: bool = True) -> torch.Tensor:
    """gamma(p) = [p, sin(2^k pi p), cos(2^k pi p)]_{k<L} for p (..., 2) in [-1, 1].

    Always computed in float32: at 2^9 pi the phase error of fp16/bf16 inputs is of order 1 radian.
    """
    p = p.float()
    with torch.autocast(device_type=p.device.type, enabled=False):
        freqs = (2.0 ** torch.arange(levels, device=p.device, dtype=torch.float32)) * math.pi
        ang = (p[..., None, :] * freqs[:, None]).flatten(-2)  # (..., L*2): level-major
        parts = [torch.sin(ang), torch.cos(ang)]
        if include_input:
            parts.insert(0, p)
        return torch.cat(parts, dim=-1)
