"""The decoder's per-point input row (both map samples, the Fourier encoding, the alignment zeros) as ONE Triton
kernel (torch-cuda's ``fused_features``, off by default until a GPU has timed it).

Unfused, a decoder call builds each point's first-layer input with ``grid_sample`` on the up map and on the
positional map (each writes a channel-major (C, N) fp32 result that a transpose then reads back strided), the
Fourier encoding (a multiply, ``sin``, ``cos``, a concatenation), a concatenation of the three and the alignment
zeros in fp32, and autocast's cast of that to bf16 for the GEMM: eight kernels (``benchmarks/op_count.py``) and,
for vit_b, about 6 KB written and read back a point besides the taps. On an H200 the two ``grid_sample`` kernels
and the concatenation were ~0.8 ms of a 7 ms sparse frame (benchmarks/HISTORY.md, session 7). Here a program
takes BLOCK_N points and writes their rows ``[up sample (C/8) | positional sample (C) | gamma (F) | zeros]``
once, in the GEMM's dtype (672 bytes a point in bf16).

The same arithmetic as the unfused path, in fp32: the bilinear weights as ``grid_sample(align_corners=False,
padding_mode="zeros")`` computes them (out-of-map taps add nothing), the taps summed in its order, the phases
as the same fp32 products, ``sin`` / ``cos`` as CUDA's (Triton lowers ``tl.sin`` to libdevice's ``__nv_sinf``,
which torch's CUDA kernels call too), then one rounding to the output dtype (tests/test_fused_point_features.py
runs the kernel in Triton's interpreter against the unfused path and compiles it ahead of time for sm_90).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from imedsam_cuda.triton_support import (
    TRITON_DTYPE,
    available,
    compile_ahead,
    on_device,
    pow2,
    ptxas_usage,
    tl,
    triton,
)
from imedsam_train.model.fourier import fourier_dim

__all__ = ["FusedPointFeatures", "available"]

# 16 points a program, 32 channels a step, 4 warps: 96 registers a thread on sm_90, no spills (32 points with the
# positional map's 256 channels unrolled took all 255 and spilled: ``compile_for`` reports it)
BLOCK_N = 16
BLOCK_C = 32
NUM_WARPS = 4


if triton is not None:

    @triton.jit
    def _taps(x, y, H, W, s_h, s_w, ok):
        """grid_sample(bilinear, zeros, align_corners=False)'s four taps at the points' (x, y) on an H x W map with
        row / column strides s_h, s_w, in its arithmetic: the nw tap's offset, then each tap's mask and weight
        (nw, ne, sw, se). Flat values rather than nested tuples indexed in a loop: the plainest form for every
        Triton 3 release (the GPU image had 3.6, the tests here run 3.8)."""
        ix = ((x + 1.0) * W - 1.0) * 0.5  # its "/ 2", exactly (Triton's fp32 "/" is not IEEE-rounded)
        iy = ((y + 1.0) * H - 1.0) * 0.5
        x0f = tl.floor(ix)
        y0f = tl.floor(iy)
        x1f = x0f + 1.0
        y1f = y0f + 1.0
        x0 = x0f.to(tl.int32)
        y0 = y0f.to(tl.int32)
        x_in0 = (x0 >= 0) & (x0 < W)
        x_in1 = (x0 >= -1) & (x0 < W - 1)
        y_in0 = (y0 >= 0) & (y0 < H)
        y_in1 = (y0 >= -1) & (y0 < H - 1)
        off = y0.to(tl.int64) * s_h + x0.to(tl.int64) * s_w
        return (off, ok & y_in0 & x_in0, ok & y_in0 & x_in1, ok & y_in1 & x_in0, ok & y_in1 & x_in1,
                (x1f - ix) * (y1f - iy), (ix - x0f) * (y1f - iy), (x1f - ix) * (iy - y0f), (ix - x0f) * (iy - y0f))

    @triton.jit
    def _sample(base, off, s_h, s_w, m00, m01, m10, m11, w00, w01, w10, w11, c, c_ok, s_c):
        """The taps' weighted sum over channels ``c`` (fp32), added to 0 in grid_sample's order (nw, ne, sw, se)."""
        p = base + off[:, None] + c[None, :].to(tl.int64) * s_c
        cm = c_ok[None, :]
        acc = tl.load(p, mask=m00[:, None] & cm, other=0.0).to(tl.float32) * w00[:, None]
        acc += tl.load(p + s_w, mask=m01[:, None] & cm, other=0.0).to(tl.float32) * w01[:, None]
        acc += tl.load(p + s_h, mask=m10[:, None] & cm, other=0.0).to(tl.float32) * w10[:, None]
        acc += tl.load(p + s_h + s_w, mask=m11[:, None] & cm, other=0.0).to(tl.float32) * w11[:, None]
        return acc

    @triton.jit
    def _features_kernel(
        coords_ptr, up_ptr, pe_ptr, freqs_ptr, out_ptr,
        N, D, Hu, Wu, su_b, su_c, su_h, su_w, Hp, Wp,
        CU: tl.constexpr, CP: tl.constexpr, L: tl.constexpr, INCLUDE_INPUT: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_F: tl.constexpr,
    ):  # pragma: no cover - compiled by triton (or run by its interpreter in the tests' subprocess)
        b = tl.program_id(1).to(tl.int64)
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = n < N
        row = b * N + n
        x = tl.load(coords_ptr + row * 2, mask=ok, other=0.0)
        y = tl.load(coords_ptr + row * 2 + 1, mask=ok, other=0.0)
        out_row = out_ptr + row[:, None] * D
        ty = out_ptr.dtype.element_ty
        # BLOCK_C channels at a time: a 32 x 256 fp32 tile with its four taps' loads in flight spilled (255 registers)
        # the box-conditioned up map, (B, CU, Hu, Wu) at any strides
        off, m00, m01, m10, m11, w00, w01, w10, w11 = _taps(x, y, Hu, Wu, su_h, su_w, ok)
        for c0 in range(0, CU, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < CU
            v = _sample(up_ptr + b * su_b, off, su_h, su_w, m00, m01, m10, m11, w00, w01, w10, w11, c, c_ok, su_c)
            tl.store(out_row + c[None, :], v.to(ty), mask=ok[:, None] & c_ok[None, :])
        # the positional map, shared by the batch: (Hp, Wp, CP) rows, a tap's channels contiguous
        off, m00, m01, m10, m11, w00, w01, w10, w11 = _taps(x, y, Hp, Wp, Wp * CP, CP, ok)
        for c0 in range(0, CP, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < CP
            v = _sample(pe_ptr, off, Wp * CP, CP, m00, m01, m10, m11, w00, w01, w10, w11, c, c_ok, 1)
            tl.store(out_row + CU + c[None, :], v.to(ty), mask=ok[:, None] & c_ok[None, :])
        # gamma = [x, y (INCLUDE_INPUT)], sin(ang), cos(ang) with ang[2k + d] = p[d] * freqs[k]; then zeros up to D
        g0 = out_row + CU + CP
        if INCLUDE_INPUT:
            tl.store(g0, x[:, None].to(ty), mask=ok[:, None])
            tl.store(g0 + 1, y[:, None].to(ty), mask=ok[:, None])
            g0 += 2
        i = tl.arange(0, BLOCK_F)
        trig = i < 2 * L
        fr = tl.load(freqs_ptr + i // 2, mask=trig, other=0.0)
        ang = tl.where(i[None, :] % 2 == 0, x[:, None], y[:, None]) * fr[None, :]
        m = ok[:, None] & trig[None, :]
        tl.store(g0 + i[None, :], tl.sin(ang).to(ty), mask=m)
        tl.store(g0 + 2 * L + i[None, :], tl.cos(ang).to(ty), mask=m)
        F: tl.constexpr = CU + CP + 4 * L + 2 * INCLUDE_INPUT  # the alignment zeros after gamma
        tl.store(out_row + F + i[None, :], tl.zeros((BLOCK_N, BLOCK_F), dtype=ty), mask=ok[:, None] & (F + i < D)[None, :])


class FusedPointFeatures(nn.Module):
    """``DecoderGraph``'s point features as one kernel: (up (B, C/8, 4g, 4g), coords (B, N, 2)) ->
    (B, N, width) rows ``[up sample | positional sample | gamma | zeros]`` in ``dtype``. ``width`` is at least the
    three parts' (the first layer's inputs; more with ``align_matmuls``' zero columns)."""

    def __init__(self, decoder: Any) -> None:
        super().__init__()
        g = decoder.taps_pe.height
        self.levels, self.include_input = decoder.fourier.levels, decoder.fourier.include_input
        self.n_in = decoder.first.in_features
        self.cp = decoder.pe_rows.shape[1]
        self.cu = self.n_in - self.cp - fourier_dim(self.levels, self.include_input)
        self.pe_hwc: torch.Tensor  # SAM's dense positional map as (g, g, C) fp32 rows: a point's taps are contiguous
        self.register_buffer("pe_hwc", decoder.pe_rows.float().reshape(g, g, self.cp).contiguous(), persistent=False)
        self.freqs: torch.Tensor
        self.register_buffer("freqs", decoder.fourier.freqs.float().clone(), persistent=False)

    def block_f(self, width: int) -> int:
        """Columns a Fourier step covers: the 2L phases, and the zero columns past gamma (fewer than 16 with
        ``align_matmuls``; a wider row is refused)."""
        return pow2(max(2 * self.levels, width - self.n_in))

    def forward(self, up: torch.Tensor, coords: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
        B, N, _ = coords.shape
        if up.shape[0] != B or up.shape[1] != self.cu or width < self.n_in:
            raise ValueError(f"fused point features: expected an up map of {B} boxes x {self.cu} channels and rows of "
                             f"at least {self.n_in} columns, got {tuple(up.shape)} and {width}")
        coords = coords.float().contiguous()
        out = torch.empty(B, N, width, dtype=dtype, device=coords.device)
        if N == 0:
            return out
        with on_device(coords):
            _features_kernel[(triton.cdiv(N, BLOCK_N), B)](
                coords, up, self.pe_hwc, self.freqs, out, N, width, up.shape[2], up.shape[3], *up.stride(),
                self.pe_hwc.shape[0], self.pe_hwc.shape[1],
                CU=self.cu, CP=self.cp, L=self.levels, INCLUDE_INPUT=int(self.include_input), BLOCK_N=BLOCK_N,
                BLOCK_C=BLOCK_C, BLOCK_F=self.block_f(width), num_warps=NUM_WARPS)
        return out

    def compile_for(self, width: int, dtype: torch.dtype, up_dtype: torch.dtype = torch.float32,
                    capability: int = 90) -> dict[str, Any]:
        """Compile the kernel ahead of time for an NVIDIA target (90: Hopper) with no GPU: rows of ``width`` in
        ``dtype`` from an ``up_dtype`` up map. Returns its shared memory, registers a thread and spilled bytes."""
        sig = {"coords_ptr": "*fp32", "up_ptr": f"*{TRITON_DTYPE[up_dtype]}", "pe_ptr": "*fp32", "freqs_ptr": "*fp32",
               "out_ptr": f"*{TRITON_DTYPE[dtype]}", **dict.fromkeys(
                   ("N", "D", "Hu", "Wu", "su_b", "su_c", "su_h", "su_w", "Hp", "Wp"), "i32")}
        const = {"CU": self.cu, "CP": self.cp, "L": self.levels, "INCLUDE_INPUT": int(self.include_input),
                 "BLOCK_N": BLOCK_N, "BLOCK_C": BLOCK_C, "BLOCK_F": self.block_f(width)}
        k = compile_ahead(_features_kernel, sig, const, capability, {"num_warps": NUM_WARPS})
        return {"shared_bytes": int(k.metadata.shared), **ptxas_usage(k, capability)}
