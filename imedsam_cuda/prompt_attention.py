"""segment-anything's two-way transformer attention as one ``scaled_dot_product_attention`` call (torch paths).

SAM's ``Attention`` computes softmax(q k^T / sqrt(c)) v with two batched matmuls, a division and a softmax (and,
under CUDA autocast, the softmax's casts to fp32 and back): five kernels or more per attention, seven attentions
in the box part. ``scaled_dot_product_attention`` with its default scale 1/sqrt(c) is the same function in one
kernel (flash / memory-efficient on a GPU; the heads are 16 and 32 wide). Switched per instance, so the model's
own class and the exported graphs are untouched.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from segment_anything.modeling.transformer import Attention as SamAttention
from torch import nn


def _sdpa_forward(self: SamAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    q = self._separate_heads(self.q_proj(q), self.num_heads)
    k = self._separate_heads(self.k_proj(k), self.num_heads)
    v = self._separate_heads(self.v_proj(v), self.num_heads)
    return self.out_proj(self._recombine_heads(F.scaled_dot_product_attention(q, k, v)))  # type: ignore[no-any-return]


def use_fused_prompt_attention(module: nn.Module, on: bool = True) -> int:
    """Switch every segment-anything ``Attention`` under ``module`` to (or back from) ``_sdpa_forward``;
    returns how many."""
    attns = [m for m in module.modules() if isinstance(m, SamAttention)]
    for m in attns:
        if on:
            m.forward = types.MethodType(_sdpa_forward, m)  # type: ignore[method-assign]
        elif "forward" in m.__dict__:
            del m.forward
    return len(attns)

