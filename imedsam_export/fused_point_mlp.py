"""The decoder's per-point MLPs (both INR trunks, the heads, the uncertainty) as ONE Triton kernel (torch-cuda).

Unfused, a bf16 decoder call runs 23 ops after its samples and Fourier features: a matmul and a ReLU per
layer, casts, the uncertainty's elementwise chain; each writes its (points x width) activations to memory
and the next reads them back. Fused, they are one launch (``python -m benchmarks.op_count --fused-mlp``).
DESIGN §2 names this per-point work as where the GPU time left after the rewrites lies. Here a program takes
BLOCK_M points through every layer without leaving the chip:

- coarse trunk, layers 1 -> 2: layer 1's output is made BJ columns at a time and immediately multiplied into
  layer 2's accumulator (``acc2 += relu(x W1[:, j] + b1[j]) W2[j, :]``), so it is never held whole;
- coarse head: the coarse feature is made BC columns at a time and multiplied into the fine trunk's first
  layer, whose point-feature part was computed from ``x`` like layer 1;
- fine trunk, layers 2 -> 3: streamed the same way;
- per class: the coarse logit, its closed-form dropout uncertainty (``INR.coarse_eval``) and the fine logit
  as fp32 dot products over the last hidden layers.

Accumulation is fp32; activations go into each matrix product in the weights' dtype (bf16 / fp16, as under
autocast, or fp32 with IEEE products). Every width is zero-padded to the block sizes when the weights are
packed (a zero column adds nothing, ReLU(0) = 0), so any INR width works. The result equals the unfused
``DecoderGraph`` within the dtype's rounding (tests/test_fused_point_mlp.py runs the kernel in Triton's
interpreter on the CPU: fp32 exactly as tight as float32 allows, fp16 against fp32; and compiles it ahead of
time for sm_90).

Measured on an H200 (benchmarks/RESULTS.md, session 7) it is slower than the torch layers at every block size
(a 384² sparse frame 11.4-11.9 ms against 8.4 ms), so torch-cuda leaves it off: the layer-2 accumulator held in
registers across layer 1 takes all 255 registers a thread, spills at blocks 32 and 64, and keeps blocks 16 and
32 on ``mma.sync`` rather than ``wgmma``. It stays as a tested option and a starting point.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from imedsam_export.graphs import PointUncertainty
from imedsam_export.triton_support import (
    TRITON_DTYPE,
    available,
    compile_ahead,
    on_device,
    pow2,
    ptxas_usage,
    tl,
    triton,
)

__all__ = ["FusedPointMLP", "available"]


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


if triton is not None:

    @triton.jit
    def _point_mlp_kernel(
        x_ptr, M, IN, stride_x,
        w1c_ptr, b1c_ptr, w1f_ptr, b1f_ptr, w2_ptr, b2_ptr,
        wl_ptr, bl_ptr, wu_ptr, wcf_ptr, bcf_ptr, wfc_ptr,
        wf2_ptr, bf2_ptr, wf3_ptr, bf3_ptr, wfh_ptr, bfh_ptr,
        logit_ptr, fine_ptr, unc_ptr,
        K: tl.constexpr, INP: tl.constexpr, H1P: tl.constexpr, H2P: tl.constexpr, CFP: tl.constexpr,
        F1P: tl.constexpr, F2P: tl.constexpr, F3P: tl.constexpr,
        BM: tl.constexpr, BK: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr, BF: tl.constexpr,
        PREC: tl.constexpr,
    ):  # pragma: no cover - compiled by triton (or run by its interpreter in the tests' subprocess)
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        row_ok = rm < M
        rk = tl.arange(0, BK)
        dt = w2_ptr.dtype.element_ty
        r2 = tl.arange(0, H2P)
        rj = tl.arange(0, BJ)
        # coarse trunk: layer 1 in BJ-column slices, each multiplied straight into layer 2's accumulator
        acc2 = tl.zeros((BM, H2P), dtype=tl.float32)
        for j0 in range(0, H1P, BJ):
            a1 = tl.zeros((BM, BJ), dtype=tl.float32)
            for k0 in range(0, INP, BK):
                kk = k0 + rk
                xk = tl.load(x_ptr + rm[:, None] * stride_x + kk[None, :], mask=row_ok[:, None] & (kk < IN)[None, :],
                             other=0.0)
                a1 += tl.dot(xk.to(dt), tl.load(w1c_ptr + kk[:, None] * H1P + (j0 + rj)[None, :]), input_precision=PREC)
            a1 = tl.maximum(a1 + tl.load(b1c_ptr + j0 + rj).to(tl.float32)[None, :], 0.0)
            acc2 += tl.dot(a1.to(dt), tl.load(w2_ptr + (j0 + rj)[:, None] * H2P + r2[None, :]), input_precision=PREC)
        h2 = tl.maximum(acc2 + tl.load(b2_ptr + r2).to(tl.float32)[None, :], 0.0)
        h2d = h2.to(dt)
        # fine trunk's first layer: the point-feature part from x, the coarse-feature part as it is made
        rf1 = tl.arange(0, F1P)
        g1 = tl.zeros((BM, F1P), dtype=tl.float32)
        for k0 in range(0, INP, BK):
            kk = k0 + rk
            xk = tl.load(x_ptr + rm[:, None] * stride_x + kk[None, :], mask=row_ok[:, None] & (kk < IN)[None, :],
                         other=0.0)
            g1 += tl.dot(xk.to(dt), tl.load(w1f_ptr + kk[:, None] * F1P + rf1[None, :]), input_precision=PREC)
        rc = tl.arange(0, BC)
        for c0 in range(0, CFP, BC):
            cf = tl.dot(h2d, tl.load(wcf_ptr + r2[:, None] * CFP + (c0 + rc)[None, :]), input_precision=PREC)
            cf += tl.load(bcf_ptr + c0 + rc).to(tl.float32)[None, :]
            g1 += tl.dot(cf.to(dt), tl.load(wfc_ptr + (c0 + rc)[:, None] * F1P + rf1[None, :]), input_precision=PREC)
        g1d = tl.maximum(g1 + tl.load(b1f_ptr + rf1).to(tl.float32)[None, :], 0.0).to(dt)
        # fine trunk, layers 2 -> 3, streamed in BF-column slices
        rf = tl.arange(0, BF)
        rf3 = tl.arange(0, F3P)
        g3 = tl.zeros((BM, F3P), dtype=tl.float32)
        for n0 in range(0, F2P, BF):
            g2 = tl.dot(g1d, tl.load(wf2_ptr + rf1[:, None] * F2P + (n0 + rf)[None, :]), input_precision=PREC)
            g2 = tl.maximum(g2 + tl.load(bf2_ptr + n0 + rf).to(tl.float32)[None, :], 0.0)
            g3 += tl.dot(g2.to(dt), tl.load(wf3_ptr + (n0 + rf)[:, None] * F3P + rf3[None, :]), input_precision=PREC)
        g3 = tl.maximum(g3 + tl.load(bf3_ptr + rf3).to(tl.float32)[None, :], 0.0)
        # per class, in fp32: coarse logit, its dropout variance -> uncertainty, fine logit; (K, M) outputs
        for c in tl.static_range(K):
            z = tl.sum(h2 * tl.load(wl_ptr + c * H2P + r2).to(tl.float32)[None, :], axis=1)
            z += tl.load(bl_ptr + c).to(tl.float32)
            var = tl.sum(h2 * h2 * tl.load(wu_ptr + c * H2P + r2)[None, :], axis=1)
            s = 1.0 / (1.0 + tl.exp(-z))
            q = s * (1.0 - s)
            f = tl.sum(g3 * tl.load(wfh_ptr + c * F3P + rf3).to(tl.float32)[None, :], axis=1)
            f += tl.load(bfh_ptr + c).to(tl.float32)
            tl.store(logit_ptr + c * M + rm, z, mask=row_ok)
            tl.store(unc_ptr + c * M + rm, q * q * var, mask=row_ok)
            tl.store(fine_ptr + c * M + rm, f, mask=row_ok)


def _linear_parts(seq: nn.Sequential) -> list[nn.Linear]:
    mods = list(seq)
    if len(mods) % 2 or not all(isinstance(m, nn.Linear) for m in mods[::2]) or \
            not all(isinstance(m, nn.ReLU) for m in mods[1::2]):
        raise ValueError("FusedPointMLP needs the folded trunks' Linear -> ReLU chains")
    return [m for m in mods[::2] if isinstance(m, nn.Linear)]


class FusedPointMLP(nn.Module):
    """``DecoderGraph``'s per-point MLPs over its concatenated point features, as one kernel launch.

    forward(feats (B, N, IN) float) -> coarse, fine, uncertainty, each (B, K, N) float32 (views of (K, B*N)
    buffers): what ``DecoderGraph.point_outputs`` returns. ``dtype``: the matrix products' operand dtype
    (bf16 / fp16 under the backend's autocast, else float32 with IEEE products). Weights are packed once,
    transposed to (in, out) and zero-padded to the blocks.
    """

    def __init__(self, decoder: Any, dtype: torch.dtype = torch.float32, block_m: int = 32) -> None:
        super().__init__()
        why = available()
        if why:
            raise RuntimeError(f"fused point MLP: {why}")
        (w2,) = _linear_parts(decoder.coarse_rest)
        f2, f3 = _linear_parts(decoder.fine_rest)
        first, head, fhead, fc = decoder.first, decoder.coarse_head, decoder.fine_head, decoder.first_cfeat
        K, h1c = decoder.K, decoder.h1c
        n_in, f1 = first.weight.shape[1], first.weight.shape[0] - h1c
        h2, cf = w2.weight.shape[0], head.weight.shape[0] - K
        self.K, self.n_in, self.dtype, self.block_m = K, n_in, dtype, block_m
        self.BK = 32
        self.INP = _ceil_to(n_in, self.BK)
        # slices whose weight tiles span a whole hidden width (W2: BJ x H2P; the head: H2P x BC) stay narrow:
        # with two pipeline stages they fit an SM's shared memory
        self.BJ = min(32, pow2(h1c))
        self.H1P = _ceil_to(h1c, self.BJ)
        self.H2P = pow2(h2)
        self.BC = min(32, pow2(cf))
        self.CFP = _ceil_to(cf, self.BC)
        self.F1P = pow2(f1)
        self.BF = min(64, pow2(f2.weight.shape[0]))
        self.F2P = _ceil_to(f2.weight.shape[0], self.BF)
        self.F3P = pow2(f3.weight.shape[0])
        # the layer-2 accumulator (block_m x H2P fp32) lives in registers: 8 warps past 64 values a thread
        self.num_warps = 8 if block_m * self.H2P > 64 * 128 else 4
        # fp32 tiles at 64 points need 232 KiB with two pipeline stages, past Hopper's 227 KiB a block
        # (``compile_for``): one stage there
        self.num_stages = 1 if dtype == torch.float32 and block_m >= 64 else 2
        dev = first.weight.device
        # p/(1-p) w^2 of the coarse logits, (H2, K): the uncertainty module's own table (fp32: it is squared)
        (unc,) = (m for m in decoder.modules() if isinstance(m, PointUncertainty))

        def pad(t: torch.Tensor, rows: int, cols: int, dt: torch.dtype = dtype) -> torch.Tensor:
            """A 2-D tensor zero-padded to (rows, cols), contiguous, in ``dt``."""
            out = torch.zeros(rows, cols, dtype=torch.float32, device=dev)
            out[: t.shape[0], : t.shape[1]] = t.detach().float()
            return out.to(dt).contiguous()

        def vec(b: torch.Tensor | None, n: int) -> torch.Tensor:
            out = torch.zeros(n, dtype=torch.float32, device=dev)
            if b is not None:
                out[: b.shape[0]] = b.detach().float()
            return out

        wfirst, bfirst = first.weight.t(), first.bias  # Linear weights (out, in) go in as (in, out)
        f32 = torch.float32
        bufs = {
            "w1c": pad(wfirst[:, :h1c], self.INP, self.H1P), "b1c": vec(bfirst[:h1c], self.H1P),
            "w1f": pad(wfirst[:, h1c:], self.INP, self.F1P), "b1f": vec(bfirst[h1c:], self.F1P),
            "w2": pad(w2.weight.t(), self.H1P, self.H2P), "b2": vec(w2.bias, self.H2P),
            # per-class rows (K, H2P), fp32: the logit weights and the variance's
            "wl": pad(head.weight[:K], K, self.H2P, f32), "bl": vec(head.bias[:K], K),
            "wu": pad(unc.w2.t(), K, self.H2P, f32),
            "wcf": pad(head.weight[K:].t(), self.H2P, self.CFP), "bcf": vec(head.bias[K:], self.CFP),
            "wfc": pad(fc.weight.t(), self.CFP, self.F1P),
            "wf2": pad(f2.weight.t(), self.F1P, self.F2P), "bf2": vec(f2.bias, self.F2P),
            "wf3": pad(f3.weight.t(), self.F2P, self.F3P), "bf3": vec(f3.bias, self.F3P),
            "wfh": pad(fhead.weight, K, self.F3P, f32), "bfh": vec(fhead.bias, K),
        }
        for name, t in bufs.items():
            self.register_buffer(name, t, persistent=False)
        self.names = list(bufs)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        B, N, n_in = feats.shape
        if n_in != self.n_in:
            raise ValueError(f"fused point MLP: {n_in} features per point, expected {self.n_in}")
        x = feats.reshape(B * N, n_in).float().contiguous()
        outs = torch.empty(3, self.K, B * N, dtype=torch.float32, device=x.device)
        self._launch(x, outs)
        coarse, fine, unc = (o.reshape(self.K, B, N).transpose(0, 1) for o in outs)
        return coarse, fine, unc

    def _launch(self, x: torch.Tensor, outs: torch.Tensor) -> None:
        """The kernel over x (M, IN) float32 into outs (3, K, M): coarse, fine, uncertainty."""
        with on_device(x):
            self._run_kernel(x, outs, x.shape[0])

    def _constexprs(self) -> dict[str, Any]:
        return dict(K=self.K, INP=self.INP, H1P=self.H1P, H2P=self.H2P, CFP=self.CFP, F1P=self.F1P, F2P=self.F2P,
                    F3P=self.F3P, BM=self.block_m, BK=self.BK, BJ=self.BJ, BC=self.BC, BF=self.BF,
                    PREC="ieee" if self.dtype == torch.float32 else None)

    def compile_for(self, capability: int = 90) -> dict[str, Any]:
        """Compile the kernel ahead of time for an NVIDIA target (90: Hopper), with no GPU needed, exactly as a
        launch with this instance's buffers would: Triton's front end, its passes and ptxas. Returns the
        kernel's shared memory per block (Hopper allows 227 KiB), its launch settings, registers a thread and
        spilled bytes. A kernel that the
        interpreter runs may still fail to compile (an ``Any`` annotation inside a jitted helper did, on an
        H200): this catches that on a CPU."""
        sig: dict[str, str] = {"x_ptr": "*fp32", "M": "i32", "IN": "i32", "stride_x": "i32"}
        sig.update({f"{n}_ptr": f"*{TRITON_DTYPE[getattr(self, n).dtype]}" for n in self.names})
        sig.update({f"{n}_ptr": "*fp32" for n in ("logit", "fine", "unc")})
        kernel = compile_ahead(_point_mlp_kernel, sig, self._constexprs(), capability,
                               {"num_warps": self.num_warps, "num_stages": self.num_stages})
        return {"shared_bytes": int(kernel.metadata.shared), "num_warps": self.num_warps,
                "num_stages": self.num_stages, **ptxas_usage(kernel, capability)}

    def _run_kernel(self, x: torch.Tensor, outs: torch.Tensor, M: int) -> None:
        _point_mlp_kernel[(triton.cdiv(M, self.block_m),)](
            x, M, self.n_in, x.stride(0), *(getattr(self, n) for n in self.names), outs[0], outs[1], outs[2],
            **self._constexprs(), num_warps=self.num_warps, num_stages=self.num_stages,
        )
