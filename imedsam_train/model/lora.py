"""LoRA on a fused qkv projection (query and value parts only)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LoRAQKV(nn.Linear):
    """``nn.Linear(dim, 3*dim)`` plus low-rank updates of its q and v thirds.

    Subclasses ``nn.Linear`` so the frozen weight keeps segment-anything's key names (``qkv.weight``,
    ``qkv.bias``) and official checkpoints load unchanged. As in the released code: A is Kaiming-uniform,
    B zero (the update starts at zero), and no alpha/rank scaling. With ``gate`` a per-block scalar
    ``Linear(dim, 1)`` of the spatial mean of the block input multiplies the update; being data dependent it
    cannot be merged into static weights.
    """

    def __init__(self, dim: int, rank: int, gate: bool = False, bias: bool = True) -> None:
        super().__init__(dim, 3 * dim, bias=bias)
        self.dim, self.rank = dim, rank
        self.lora_a_q = nn.Parameter(torch.empty(rank, dim))
        self.lora_b_q = nn.Parameter(torch.zeros(dim, rank))
        self.lora_a_v = nn.Parameter(torch.empty(rank, dim))
        self.lora_b_v = nn.Parameter(torch.zeros(dim, rank))
        nn.init.kaiming_uniform_(self.lora_a_q, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_a_v, a=math.sqrt(5))
        self.gate = nn.Linear(dim, 1) if gate else None
        # Set by merge(), which also zeroes B: a merged state_dict stays correct when loaded unmerged.
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The (3*dim, dim) weight update: q and v thirds, k untouched."""
        zeros = torch.zeros_like(self.lora_b_q @ self.lora_a_q)
        return torch.cat([self.lora_b_q @ self.lora_a_q, zeros, self.lora_b_v @ self.lora_a_v], dim=0)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into ``weight``. Idempotent; refused with a gate (the update is data dependent)."""
        if self.gate is not None:
            raise RuntimeError("LoRA with the data-dependent gate cannot be merged into static weights")
        self.weight += self.delta_weight().to(self.weight.dtype)
        self.lora_b_q.zero_()
        self.lora_b_v.zero_()
        self.merged = True

    def gate_value(self, block_input: torch.Tensor) -> torch.Tensor:
        """The gate's scalar per image, (B,), from the block input (B, H, W, C)."""
        assert self.gate is not None
        return self.gate(block_input.mean(dim=(1, 2)))[:, 0]

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None, bias: bool = True) -> torch.Tensor:
        """x: (B, ..., C). gate: (B,) scalars from ``gate_value``, gated mode only. bias=False leaves the
        frozen bias out (the windowed attention adds it after padding)."""
        out = F.linear(x, self.weight, self.bias if bias else None)
        if self.merged:
            return out
        upd = F.linear(x, self.delta_weight())
        if self.gate is not None:
            if gate is None:
                raise ValueError("gated LoRA needs the gate value computed from the block input")
            upd = upd * gate.reshape((-1,) + (1,) * (upd.dim() - 1))
        return out + upd
