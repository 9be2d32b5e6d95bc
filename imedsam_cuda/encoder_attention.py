"""The encoder attention's inference form for torch-cuda: one ``scaled_dot_product_attention`` call, and position
tables made once.

``InferenceAttention`` is the trained ``Attention`` (its layers and tables, shared) with two changes that keep its
values: the softmax attention as one SDPA call (``fused``), and the relative-position tables precomputed in the
queries' dtype for a model whose weights no longer change (``dtype``). The ONNX export keeps the plain module's
explicit GEMMs, which ONNX Runtime fuses. tests/test_model.py checks both against the plain block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from imedsam_train.model.encoder import Attention


def fused_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T) v, the scale already in q, as one ``scaled_dot_product_attention`` call: (B*heads, N, d).

    With the bias folded into q and k the attention has no mask, so on a GPU it runs as one flash /
    memory-efficient kernel instead of two GEMMs, a softmax and its casts over the (N x N) logits. Those
    kernels need q, k and v of one width, a multiple of 8: zero columns are appended (they add nothing to
    q.k, and v's come out as zero columns, dropped).
    """
    bh, n, dv = v.shape
    d = -(-max(q.shape[-1], dv) // 8) * 8

    def widen(t: torch.Tensor) -> torch.Tensor:  # (q and k come at this width from ``position_tables``)
        t = F.pad(t, (0, d - t.shape[-1])) if t.shape[-1] != d else t
        return t.view(bh // heads, heads, n, d)

    out = F.scaled_dot_product_attention(widen(q), widen(k), widen(v), scale=1.0)
    return out[..., :dv].reshape(bh, n, dv)


class InferenceAttention(Attention):
    """``Attention`` (the trained one's layers and tables, shared) with its softmax attention as one SDPA call
    (``fused``), and its position tables precomputed in ``dtype`` (the dtype its queries come in: the autocast
    dtype, or float32; None: gathered every call). Precomputed, each call reads them instead of gathering,
    casting and padding them again: per block, two gathers, their two autocast casts, the one-hot's cast and two
    pads fewer (the values are the same). The tables are made on the module's current device and are not moved
    by ``.to()``: build it after moving."""

    def __init__(self, attn: Attention, fused: bool, dtype: torch.dtype | None) -> None:
        nn.Module.__init__(self)
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.qkv, self.proj = attn.qkv, attn.proj
        self.rel_pos_h, self.rel_pos_w = attn.rel_pos_h, attn.rel_pos_w
        self.register_buffer("rel_index", attn.rel_index, persistent=False)
        self.register_buffer("key_onehot", attn.key_onehot, persistent=False)
        self.fused = fused
        self.frozen: tuple[torch.dtype, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        if dtype is not None:
            with torch.no_grad():
                rh, rw, cols = (t.detach().to(dtype).contiguous() for t in self.position_tables())
            self.frozen = (dtype, rh, rw, cols)

    def position_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``Attention.position_tables`` with, fused, z zero rows in rw (W, W + z, c) and z zero one-hot columns
        (H W, H + W + z): they bring the extended queries and keys to a multiple of 8 wide, as the fused kernels
        need, with no pad per call."""
        rh, rw, cols = super().position_tables()
        z = -(rh.shape[-1] + cols.shape[-1]) % 8 if self.fused else 0
        if z:
            rw, cols = F.pad(rw, (0, 0, 0, z)), F.pad(cols, (0, z))
        return rh, rw, cols

    def tables_in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fz = self.frozen
        if fz is not None and fz[0] == dtype:
            return fz[1], fz[2], fz[3]
        return super().tables_in(dtype)

    def softmax_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return fused_softmax_attention(q, k, v, self.num_heads)
        return super().softmax_attention(q, k, v)


def inference_attention(module: nn.Module, fused: bool, dtype: torch.dtype | None) -> int:
    """Replace every encoder ``Attention`` under ``module`` (an inference copy) by its ``InferenceAttention``
    (built from the trained layers, or again from an inference one's); returns how many."""
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Attention):
                setattr(parent, name, InferenceAttention(child, fused, dtype))
                n += 1
    return n
