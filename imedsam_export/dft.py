"""The frequency adapter's centred 2-D FFT as matrix products (no ONNX ``DFT`` node), in fp32.

TensorRT up to 11.1 cannot parse ``DFT`` and ONNX Runtime's CUDA provider has no kernel for it, so the
exported encoder computes ``fftshift(fft2(x))`` as ``F_H x F_W^T`` with fixed cos/sin matrices whose rows
are pre-shifted (fftshift folded in). With ``F = C - iS`` and a real image x:
``Re = C x C^T - S x S^T`` and ``Im = -(S x C^T + C x S^T)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from imedsam_train.model.frequency import minmax_normalise


def shifted_dft_matrices(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) (size, size) float32 of the DFT matrix F = cos - i sin, rows fftshift-ed."""
    n = torch.arange(size, dtype=torch.float64)
    # k*n mod size keeps the angle small, so float64 sin/cos stay exact before the fp32 cast
    ang = 2.0 * math.pi * torch.remainder(n[:, None] * n[None, :], size) / size
    cos = torch.fft.fftshift(torch.cos(ang), dim=0)
    sin = torch.fft.fftshift(torch.sin(ang), dim=0)
    return cos.float(), sin.float()


class DFTSpectrum(nn.Module):
    """Drop-in for ``ImageEncoder.frequency_spectrum``: (B, 3, S, S) -> (B, 1, S, S) normalised spectrum.

    Same result as ``imedsam_train.model.frequency.spectrum`` (amplitude or phase of the centred FFT of one
    channel, min-max normalised per image) to ~1e-6, built only from MatMul / elementwise ops. A precision
    island: the fp16 converter keeps every node of this module in fp32 (DC terms reach 0.5*S^2).
    """

    def __init__(self, size: int, channel: int = 0, mode: str = "amplitude", eps: float = 1e-8) -> None:
        super().__init__()
        if mode not in ("amplitude", "phase"):
            raise ValueError(f"unknown spectrum mode '{mode}'")
        self.channel, self.mode, self.eps = channel, mode, eps
        cos, sin = shifted_dft_matrices(size)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image[:, self.channel].float()  # (B, H, W)
        xc = x @ self.cos.t()  # x F_W^T, real and imaginary halves
        xs = x @ self.sin.t()
        re = self.cos @ xc - self.sin @ xs
        im = -(self.sin @ xc + self.cos @ xs)
        s = torch.sqrt(re * re + im * im) if self.mode == "amplitude" else torch.atan2(im, re)
        return minmax_normalise(s, self.eps)[:, None]
