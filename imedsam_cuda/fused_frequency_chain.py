"""The encoder's whole frequency-adapter chain as ONE Triton kernel (torch-cuda's ``fused_frequency``, off by default
until a GPU has timed it).

Each block's adapter maps the frequency tokens f to z + up(gelu(down(z))), z = LayerNorm(f) (768 -> 4 -> 768 for
vit_b), and the block adds ``scale`` times the result to its output. Under autocast that is seven small kernels a
block (the norm, its cast, the two GEMMs, the GELU, the skip add, the scale): 84 of vit_b's encoder kernels
(benchmarks/op_count.py), on a side stream beside the token chain but still launched and scheduled one by one.
The chain never reads the image tokens and is row-wise: each token's 12 adapters depend on that token's
frequency features alone. Here a program takes BLOCK_R tokens through every adapter and writes every block's
``scale * f`` (fp32), one kernel a frame.

Arithmetic, the torch path's under autocast to ``dtype`` (bf16 / fp16; none in fp32): the norm in fp32 (mean and
variance as ``fused_add_norm`` sums them, within fp32 rounding), rounded to ``dtype``; each GEMM's products summed
in fp32 (in another order than cuBLAS) with its bias, rounded to ``dtype``; the exact GELU in fp32
(``x * 0.5 * (1 + erf(x * sqrt(1/2)))``, libdevice's ``erff`` as torch's CUDA kernel), rounded; the skip add and
the scale in fp32. tests/test_fused_frequency_chain.py runs it in Triton's interpreter against the adapters and
compiles it ahead of time for sm_90.
"""

from __future__ import annotations

from typing import Any

import torch

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
from imedsam_train.model.encoder import Block, ImageEncoder

__all__ = ["FusedFrequencyChain", "available"]

BLOCK_R = 2  # tokens a program (vit_b, sm_90: 80 registers a thread at 8 warps; 149 at 4; 160 at 4 tokens)
NUM_WARPS = 8

if triton is not None:

    @triton.jit
    def _chain_kernel(
        f_ptr, lnw_ptr, lnb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, R, C, eps, scale,
        BLOCKS: tl.constexpr, HIDDEN: tl.constexpr, ROUND: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # pragma: no cover - compiled by triton (or run by its interpreter in the tests' subprocess)
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        r_ok = r < R
        c = tl.arange(0, BLOCK_C)
        c_ok = c < C
        ok = r_ok[:, None] & c_ok[None, :]
        at = r[:, None] * C + c[None, :]
        f = tl.load(f_ptr + at, mask=ok, other=0.0).to(tl.float32)
        dt = w1_ptr.dtype.element_ty  # the compute dtype (the layers' own)
        for i in range(BLOCKS):  # a constexpr: triton 3.6's interpreter cannot range over a scalar argument
            mean = tl.sum(f, axis=1) / C
            d = tl.where(ok, f - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
            lw = tl.load(lnw_ptr + i * C + c, mask=c_ok, other=0.0)
            lb = tl.load(lnb_ptr + i * C + c, mask=c_ok, other=0.0)
            z = tl.where(ok, d * rstd[:, None] * lw[None, :] + lb[None, :], 0.0)
            zc = z.to(dt).to(tl.float32) if ROUND else z
            u = tl.load(b2_ptr + i * C + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
            for j in tl.static_range(HIDDEN):  # down row j, its GELU, and up column j's share
                w1 = tl.load(w1_ptr + (i * HIDDEN + j) * C + c, mask=c_ok, other=0.0).to(tl.float32)
                h = tl.sum(zc * w1[None, :], axis=1) + tl.load(b1_ptr + i * HIDDEN + j).to(tl.float32)
                if ROUND:
                    h = h.to(dt).to(tl.float32)
                g = h * 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))  # torch's kAlpha = M_SQRT1_2
                if ROUND:
                    g = g.to(dt).to(tl.float32)
                w2 = tl.load(w2_ptr + (i * HIDDEN + j) * C + c, mask=c_ok, other=0.0).to(tl.float32)
                u = u + g[:, None] * w2[None, :]
            if ROUND:
                u = u.to(dt).to(tl.float32)
            f = z + u
            tl.store(out_ptr + i * R * C + at, f * scale, mask=ok)


class FusedFrequencyChain:
    """An encoder's adapters (every block's, in order) as one kernel: the frequency tokens (B, g, g, C) -> each
    block's addition ``scale * f_i`` (blocks, B, g, g, C) fp32. Made from the adapters' current weights, in the
    dtype they are stored in (the compute dtype: torch-cuda stores them in its autocast dtype)."""

    def __init__(self, encoder: ImageEncoder) -> None:
        blocks = [b for b in encoder.blocks if isinstance(b, Block)]
        adapters = [b.freq for b in blocks]
        if not adapters or any(a is None for a in adapters) or len(blocks) != len(encoder.blocks):
            raise ValueError("FusedFrequencyChain: every block needs its frequency adapter")
        scales = {b.freq_scale for b in blocks}
        if len(scales) != 1:
            raise ValueError(f"FusedFrequencyChain: one scale for every block, got {sorted(scales)}")
        self.scale = float(scales.pop())
        first = adapters[0]
        assert first is not None
        self.hidden, self.dim = first.down.weight.shape
        self.eps = float(first.norm.eps)
        dtype = first.down.weight.dtype
        with torch.no_grad():
            def stack(get: Any, dt: torch.dtype) -> torch.Tensor:
                return torch.stack([get(a).detach().to(dt) for a in adapters]).contiguous()

            self.ln_w = stack(lambda a: a.norm.weight, torch.float32)  # (blocks, C)
            self.ln_b = stack(lambda a: a.norm.bias, torch.float32)
            self.w1 = stack(lambda a: a.down.weight, dtype)  # (blocks, hidden, C)
            self.b1 = stack(lambda a: a.down.bias, dtype)  # (blocks, hidden)
            self.w2 = stack(lambda a: a.up.weight.t(), dtype)  # (blocks, hidden, C): up's columns as rows
            self.b2 = stack(lambda a: a.up.bias, dtype)  # (blocks, C)
        self.dtype = dtype

    def __call__(self, f: torch.Tensor) -> torch.Tensor:
        channels = f.shape[-1]
        if channels != self.dim:
            raise ValueError(f"FusedFrequencyChain: tokens of {channels} channels, the adapters take {self.dim}")
        f = f.contiguous()
        R = f.numel() // channels
        if len(self.ln_w) * f.numel() >= 2**31:  # the kernel's offsets are int32
            raise ValueError(f"FusedFrequencyChain: {R} tokens are too many for one launch")
        out = torch.empty((len(self.ln_w), *f.shape), dtype=torch.float32, device=f.device)
        with on_device(f):
            _chain_kernel[(triton.cdiv(R, BLOCK_R),)](
                f, self.ln_w, self.ln_b, self.w1, self.b1, self.w2, self.b2, out, R, channels,
                self.eps, self.scale, BLOCKS=len(self.ln_w), HIDDEN=self.hidden, ROUND=self.dtype != torch.float32,
                BLOCK_R=BLOCK_R, BLOCK_C=pow2(channels), num_warps=NUM_WARPS)
        return out

    def compile_for(self, capability: int = 90) -> dict[str, Any]:
        """Compile the kernel ahead of time for an NVIDIA target (90: Hopper), with no GPU, for these adapters.
        Returns its shared memory, registers a thread and spilled bytes."""
        t = TRITON_DTYPE[self.dtype]
        sig = {"f_ptr": "*fp32", "lnw_ptr": "*fp32", "lnb_ptr": "*fp32", "w1_ptr": f"*{t}", "b1_ptr": f"*{t}",
               "w2_ptr": f"*{t}", "b2_ptr": f"*{t}", "out_ptr": "*fp32", "R": "i32", "C": "i32",
               "eps": "fp32", "scale": "fp32"}
        const = {"BLOCKS": len(self.ln_w), "HIDDEN": self.hidden, "ROUND": self.dtype != torch.float32,
                 "BLOCK_R": BLOCK_R, "BLOCK_C": pow2(self.dim)}
        k = compile_ahead(_chain_kernel, sig, const, capability, {"num_warps": NUM_WARPS})
        return {"shared_bytes": int(k.metadata.shared), **ptxas_usage(k, capability)}
