"""SAM's ViT image encoder with LoRA on qkv and the frequency adapter.

Parameter names match segment-anything's ``ImageEncoderViT`` so official (and MedSAM) checkpoints load
as they are; the adapters add ``blocks.i.attn.qkv.lora_*`` and ``blocks.i.freq.*``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d, MLPBlock
from segment_anything.modeling.image_encoder import PatchEmbed, window_partition, window_unpartition
from torch import nn

from imedsam_train.config import EncoderConfig, FrequencyConfig, LoraConfig
from imedsam_train.model.frequency import FrequencyAdapter, spectrum
from imedsam_train.model.lora import LoRAQKV


def relative_index(size: int) -> torch.Tensor:
    """(size, size) index into a (2*size-1, C) relative-position table; static, so computed once.

    segment-anything recomputes it every call with CPU ``arange``s, which breaks CUDA-graph capture.
    """
    coords = torch.arange(size)
    return (coords[:, None] - coords[None, :] + (size - 1)).long()


def key_onehot(size: int) -> torch.Tensor:
    """(size*size, 2*size): row (k, l) of a size x size token grid is one-hot at k and at size + l."""
    k = torch.arange(size * size)
    out = torch.zeros(size * size, 2 * size)
    out[k, k // size] = 1.0
    out[k, size + k % size] = 1.0
    return out


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, size: int, lora: LoraConfig) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv: nn.Linear = (
            LoRAQKV(dim, lora.rank, gate=lora.gate) if lora.enabled else nn.Linear(dim, 3 * dim)
        )
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * size - 1, head_dim))
        self.rel_index: torch.Tensor
        self.register_buffer("rel_index", relative_index(size), persistent=False)
        self.key_onehot: torch.Tensor
        self.register_buffer("key_onehot", key_onehot(size), persistent=False)

    def project_qkv(self, x: torch.Tensor, gate: torch.Tensor | None = None, bias: bool = True) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, 3C): the fused projection, LoRA updates included; optionally bias-free."""
        qkv = self.qkv
        if isinstance(qkv, LoRAQKV):
            return qkv(x, gate, bias=bias)
        return F.linear(x, qkv.weight, qkv.bias if bias else None)

    def position_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rh (H, H, c), rw (W, W, c) and the keys' one-hot columns (H W, H + W): the relative-position tables
        gathered for this grid."""
        return self.rel_pos_h[self.rel_index], self.rel_pos_w[self.rel_index], self.key_onehot

    def tables_in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``position_tables`` for queries in ``dtype``: the one-hot columns cast to it (the keys' dtype)."""
        rh, rw, cols = self.position_tables()
        return rh, rw, cols.to(dtype)

    def softmax_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T) v over the extended queries and keys (the scale already in q): (B*heads, N, d)."""
        return (q @ k.transpose(-2, -1)).softmax(dim=-1) @ v

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Multi-head attention with SAM's decomposed relative-position bias: (B, H, W, 3C) -> (B, H, W, C)."""
        B, H, W, _ = qkv.shape
        qkv = qkv.reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        # SAM's decomposed relative-position bias, attn[(h,w),(k,l)] += q_hw . Rh[h,k] + q_hw . Rw[w,l], folded
        # into the logits' matmul: append the two bias rows to each query and one-hot (k, l) columns to each
        # key. Same sums, and no two broadcast adds over the (N x N) logits (the largest non-GEMM cost).
        rh, rw, cols = self.tables_in(k.dtype)
        r_q = q.reshape(B * self.num_heads, H, W, -1)
        # einsum("bhwc,hkc->bhwk") and einsum("bhwc,wkc->bhwk") as broadcast batched matmuls (ONNX Runtime's
        # Einsum kernel is slower than MatMul for these shapes)
        rel_h = (r_q @ rh.transpose(1, 2)).reshape(B * self.num_heads, H * W, H)
        rel_w = (r_q.transpose(1, 2) @ rw.transpose(1, 2)).transpose(1, 2).reshape(B * self.num_heads, H * W, -1)
        q_ext = torch.cat([q * self.scale, rel_h, rel_w], dim=-1)
        k_ext = torch.cat([k, cols.expand(k.shape[0], -1, -1)], dim=-1)
        out = self.softmax_attention(q_ext, k_ext, v)
        return out.view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.attend(self.project_qkv(x, gate)))


class Block(nn.Module):
    """x = x + attn(n1(x)); f = fa(f); x = x + mlp(n2(x)) + scale * f."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, window_size: int, grid: int,
        lora: LoraConfig, freq: FrequencyConfig,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, window_size if window_size > 0 else grid, lora)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=nn.GELU)
        self.window_size = window_size
        self.freq = FrequencyAdapter(dim, freq.hidden) if freq.enabled else None
        self.freq_scale = freq.scale

    def forward(self, x: torch.Tensor, f: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        shortcut = x
        gate = None
        qkv = self.attn.qkv
        if isinstance(qkv, LoRAQKV) and qkv.gate is not None and not qkv.merged:
            gate = qkv.gate_value(x)  # (B,)
        h = self.norm1(x)
        h = self.windowed_attention(h, gate) if self.window_size > 0 else self.attn(h, gate)
        x = shortcut + h
        out = x + self.mlp(self.norm2(x))
        if self.freq is not None and f is not None:
            f, add = self.frequency_step(f)
            out = out + add
        return out, f

    def frequency_step(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter on the frequency tokens: (next block's f, what is added to this block's output)."""
        assert self.freq is not None
        f = self.freq(f)
        return f, self.freq_scale * f

    def windowed_attention(self, h: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        """segment-anything's pad -> window attention -> crop, without projecting the padding tokens.

        SAM zero-pads the normalised tokens to a multiple of the window (24 -> 28 at 384 px: 36% more
        tokens) and runs qkv and proj on all of them. A zero token's qkv is the bias alone (the LoRA terms
        are linear in it), and proj is per token, so projecting the real tokens, padding the bias-free
        result with zeros, adding the bias, and projecting after the crop is the same function (the padding
        keys and values still take part in the softmax, as in SAM) with 27% fewer qkv/proj rows.
        """
        B, H, W, _ = h.shape
        ws = self.window_size
        pad_h, pad_w = (ws - H % ws) % ws, (ws - W % ws) % ws
        attn = self.attn
        qkv = attn.project_qkv(h, gate, bias=False)
        qkv = F.pad(qkv, (0, 0, 0, pad_w, 0, pad_h))
        if attn.qkv.bias is not None:  # in the projection's dtype, as the layer adds it (no fp32 promotion)
            qkv = qkv + attn.qkv.bias.to(qkv.dtype)
        windows, pad_hw = window_partition(qkv, ws)  # already padded: a pure reshape
        out = window_unpartition(attn.attend(windows), ws, pad_hw, (H, W))
        return attn.proj(out)


class ImageEncoder(nn.Module):
    """Image (B, 3, S, S) in [0, 1] -> embedding (B, out_chans, S/16, S/16)."""

    def __init__(self, cfg: EncoderConfig, input_size: int, lora: LoraConfig, freq: FrequencyConfig) -> None:
        super().__init__()
        grid = input_size // cfg.patch_size
        self.input_size, self.grid = input_size, grid
        self.freq_cfg = freq
        self.patch_embed = PatchEmbed(
            kernel_size=(cfg.patch_size, cfg.patch_size), stride=(cfg.patch_size, cfg.patch_size),
            in_chans=3, embed_dim=cfg.embed_dim,
        )
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio,
                0 if i in cfg.global_attn_indexes else cfg.window_size, grid, lora, freq,
            )
            for i in range(cfg.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    def frequency_spectrum(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) normalised spectrum; the exporter swaps this for DFT matrix products."""
        return spectrum(image, self.freq_cfg.channel, self.freq_cfg.mode)

    def frequency_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """The spectrum through the (frozen) patch embedding and position table: (B, g, g, C)."""
        s = self.frequency_spectrum(image).to(image.dtype)
        return self.patch_embed(s.expand(-1, 3, -1, -1)) + self.pos_embed

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(image) + self.pos_embed
        f = self.frequency_tokens(image) if self.freq_cfg.enabled else None
        for blk in self.blocks:
            x, f = blk(x, f)
        return self.neck(x.permute(0, 3, 1, 2))
