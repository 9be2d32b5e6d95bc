"""The decoder's closed-form MC-dropout uncertainty as ONE Triton kernel (torch-cuda's ``fused_uncertainty``, off by
default until a GPU has timed it).

``PointUncertainty`` runs in fp32 (its products underflow fp16, and its ranking picks the refined points): the
last coarse hidden layer h (points x 512 for vit_b, bf16) is cast to fp32, squared, and multiplied by the
squared head weights, and the logits go through sigmoid, ``1 - s``, a product and a square: nine kernels a
decoder call (``benchmarks/op_count.py``), two of them writing (points x 512) fp32 temporaries, ~9 KB of memory
traffic a point. Here a program takes BLOCK_M points, reads their h rows once in their own dtype, and writes
``(s (1 - s))^2 * sum_i w2[i, k] h_i^2`` in fp32.

Arithmetic: h_i^2 of a bf16 / fp16 h is exact in fp32, as in the unfused path; the sum over i is fp32 in another
order than cuBLAS's GEMM (within fp32 rounding); on a GPU the sigmoid is ``1 / (1 + expf(-x))`` with libdevice's
``expf`` and an IEEE division, as torch's CUDA sigmoid computes it (Triton's own ``exp`` and ``/`` are
approximations; the interpreter, which has no libdevice, uses them). tests/test_fused_uncertainty.py runs the
kernel in the interpreter against ``PointUncertainty`` and compiles it ahead of time for sm_90.
"""

from __future__ import annotations

import os
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

__all__ = ["FusedUncertainty", "available"]

BLOCK_M = 32  # points a program
BLOCK_H = 64  # hidden units a step
NUM_WARPS = 4

if triton is not None:
    from triton.language.extra import libdevice

    @triton.jit
    def _uncertainty_kernel(
        h_ptr, logit_ptr, w2_ptr, out_ptr, M, K, stride_h, stride_l,
        H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, LIBDEVICE: tl.constexpr,
    ):  # pragma: no cover - compiled by triton (or run by its interpreter in the tests' subprocess)
        m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = m < M
        k = tl.arange(0, BLOCK_K)
        k_ok = k < K
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for h0 in range(0, H, BLOCK_H):  # H a constexpr: triton 3.6's interpreter cannot range over an argument
            i = h0 + tl.arange(0, BLOCK_H)
            i_ok = i < H
            h = tl.load(h_ptr + m[:, None] * stride_h + i[None, :], mask=m_ok[:, None] & i_ok[None, :], other=0.0)
            h = h.to(tl.float32)
            w2 = tl.load(w2_ptr + i[:, None] * K + k[None, :], mask=i_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(h * h, w2, acc, input_precision="ieee")
        x = tl.load(logit_ptr + m[:, None] * stride_l + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        x = x.to(tl.float32)
        if LIBDEVICE:  # noqa: SIM108  # torch's CUDA sigmoid: 1 / (1 + expf(-x)), IEEE division
            s = tl.math.div_rn(1.0, 1.0 + libdevice.exp(-x))
        else:  # Triton's interpreter: no libdevice
            s = 1.0 / (1.0 + tl.exp(-x))
        a = s * (1.0 - s)
        tl.store(out_ptr + m[:, None] * K + k[None, :], a * a * acc, mask=m_ok[:, None] & k_ok[None, :])


class FusedUncertainty(nn.Module):
    """``PointUncertainty`` as one kernel: (h (..., H), logits (..., K)) -> (..., K) fp32. ``w2``: its (H, K)
    squared, dropout-scaled head weights."""

    def __init__(self, w2: torch.Tensor) -> None:
        super().__init__()
        self.w2: torch.Tensor
        self.register_buffer("w2", w2.detach().float().contiguous(), persistent=False)

    def forward(self, h: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        H, K = self.w2.shape
        if h.shape[-1] != H or logits.shape[-1] != K or h.shape[:-1] != logits.shape[:-1]:
            raise ValueError(f"fused uncertainty: expected h (..., {H}) and logits (..., {K}) over the same points, "
                             f"got {tuple(h.shape)} and {tuple(logits.shape)}")
        lead = h.shape[:-1]
        h2 = h.reshape(-1, H)  # views where the layouts allow (rows of a GEMM output, a slice of the head's)
        l2 = logits.reshape(-1, K)
        h2 = h2 if h2.stride(-1) == 1 else h2.contiguous()
        l2 = l2 if l2.stride(-1) == 1 else l2.contiguous()
        M = h2.shape[0]
        out = torch.empty(M, K, dtype=torch.float32, device=h.device)
        if M:
            with on_device(h):
                _uncertainty_kernel[(triton.cdiv(M, BLOCK_M),)](
                    h2, l2, self.w2, out, M, K, h2.stride(0), l2.stride(0), H=H, BLOCK_M=BLOCK_M, BLOCK_H=BLOCK_H,
                    BLOCK_K=pow2(K), LIBDEVICE=os.environ.get("TRITON_INTERPRET") != "1", num_warps=NUM_WARPS)
        return out.view(*lead, K)

    def compile_for(self, h_dtype: torch.dtype, capability: int = 90) -> dict[str, Any]:
        """Compile the kernel ahead of time for an NVIDIA target (90: Hopper) with no GPU, for h and the logits in
        ``h_dtype``. Returns its shared memory, registers a thread and spilled bytes."""
        t = TRITON_DTYPE[h_dtype]
        sig = {"h_ptr": f"*{t}", "logit_ptr": f"*{t}", "w2_ptr": "*fp32", "out_ptr": "*fp32",
               **dict.fromkeys(("M", "K", "stride_h", "stride_l"), "i32")}
        const = {"H": self.w2.shape[0], "BLOCK_M": BLOCK_M, "BLOCK_H": BLOCK_H, "BLOCK_K": pow2(self.w2.shape[1]),
                 "LIBDEVICE": True}
        k = compile_ahead(_uncertainty_kernel, sig, const, capability, {"num_warps": NUM_WARPS})
        return {"shared_bytes": int(k.metadata.shared), **ptxas_usage(k, capability)}
