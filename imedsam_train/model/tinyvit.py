"""TinyViT image encoder (LiteMedSAM's variant of MobileSAM's): an MBConv stage, then windowed attention.

Written here from the architecture (TinyViT, Wu et al. 2022; MobileSAM's SAM-sized variant); parameter
names follow LiteMedSAM's checkpoint, so its ``image_encoder.*`` weights load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from imedsam_train.config import TinyViTConfig


class ConvBN(nn.Sequential):
    """Bias-free convolution + BatchNorm (children ``c`` and ``bn``, as in the checkpoint)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 bn_init: float = 1.0) -> None:
        super().__init__()
        self.c = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        nn.init.constant_(self.bn.weight, bn_init)
        nn.init.zeros_(self.bn.bias)


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


def _drop(p: float) -> nn.Module:
    return DropPath(p) if p > 0 else nn.Identity()


class PatchEmbed(nn.Module):
    """Pointwise stem at full resolution (LiteMedSAM's: no stride, unlike TinyViT's 4x one)."""

    def __init__(self, cin: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(cin, dim // 2), nn.GELU(), ConvBN(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project (its BN starts at zero), GELU after the sum."""

    def __init__(self, dim: int, expand: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden)
        self.act1 = nn.GELU()
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = ConvBN(hidden, dim, bn_init=0.0)
        self.act3 = nn.GELU()
        self.drop_path = _drop(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))
        return self.act3(x + self.drop_path(y))


class PatchMerging(nn.Module):
    """(B, C, H, W) -> (B, H'*W', C'): 1x1 conv, strided 3x3 depthwise conv, 1x1 conv."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


def offset_index(window: int) -> torch.Tensor:
    """(w*w, w*w) index into the per-head bias table of |dy| * w + |dx| offsets (w*w distinct offsets)."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :]).abs() * window + (xs[:, None] - xs[None, :]).abs()


class WindowAttention(nn.Module):
    """Pre-norm multi-head attention over one window, with a learned bias per head and |offset|."""

    bias_index: torch.Tensor

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)  # per head: q, k, v side by side
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(heads, window * window))
        self.register_buffer("bias_index", offset_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, C)
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.split(self.head_dim, dim=-1)
        attn = (q @ k.transpose(-2, -1)) * self.scale + self.attention_biases[:, self.bias_index]
        out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Window attention (zero-padded to whole windows; the padding takes part as keys, as trained),
    a 3x3 depthwise conv between attention and MLP, residuals around attention and MLP."""

    def __init__(self, dim: int, resolution: int, heads: int, window: int, mlp_ratio: float,
                 local_conv: int, drop_path: float) -> None:
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = WindowAttention(dim, heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv, groups=dim)
        self.drop_path = _drop(drop_path)

    def _windowed(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        h = w = self.resolution
        ws = self.window
        if h == ws:
            return self.attn(x)
        pad = (ws - h % ws) % ws
        g = x.view(b, h, w, c)
        if pad:
            g = F.pad(g, (0, 0, 0, pad, 0, pad))
        hp = h + pad
        nw = hp // ws
        t = g.view(b, nw, ws, nw, ws, c).transpose(2, 3).reshape(b * nw * nw, ws * ws, c)
        t = self.attn(t)
        g = t.view(b, nw, nw, ws, ws, c).transpose(2, 3).reshape(b, hp, hp, c)
        return g[:, :h, :w].reshape(b, h * w, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H*W, C)
        b, n, c = x.shape
        r = self.resolution
        x = x + self.drop_path(self._windowed(x))
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, r, r)).view(b, c, n).transpose(1, 2)
        return x + self.drop_path(self.mlp(x))


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks on (B, C, H, W), then the patch merge to tokens."""

    def __init__(self, dim: int, depth: int, expand: float, drop_paths: list[float],
                 downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand, drop_paths[i]) for i in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class AttentionStage(nn.Module):
    """Stages 1-3: TinyViT blocks on (B, H*W, C) tokens, then (but the last) a patch merge."""

    def __init__(self, blocks: list[TinyViTBlock], resolution: int, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.resolution = resolution
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        if self.downsample is None:
            return x
        b, n, c = x.shape
        return self.downsample(x.transpose(1, 2).reshape(b, c, self.resolution, self.resolution))


class TinyViT(nn.Module):
    """(B, 3, S, S) in [0, 1] -> (B, out_chans, S/4, S/4) with the default strides."""

    def __init__(self, cfg: TinyViTConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or TinyViTConfig()
        self.cfg = cfg
        dims = cfg.embed_dims
        if not (len(dims) == len(cfg.depths) == len(cfg.num_heads) == len(cfg.window_sizes)
                == len(cfg.merge_strides) + 1):
            raise ValueError("TinyViTConfig: one depth, head count and window per stage, one stride per merge")
        self.patch_embed = PatchEmbed(cfg.in_chans, dims[0])
        total = sum(cfg.depths)
        rates = [cfg.drop_path * i / max(total - 1, 1) for i in range(total)]
        self.layers = nn.ModuleList()
        res, start = cfg.input_size, 0
        for i, depth in enumerate(cfg.depths):
            dp = rates[start:start + depth]
            start += depth
            merge = None
            if i < len(cfg.merge_strides):
                merge = PatchMerging(dims[i], dims[i + 1], cfg.merge_strides[i])
            if i == 0:
                self.layers.append(ConvStage(dims[0], depth, cfg.mbconv_expand_ratio, dp, merge))
            else:
                blocks = [TinyViTBlock(dims[i], res, cfg.num_heads[i], cfg.window_sizes[i], cfg.mlp_ratio,
                                       cfg.local_conv_size, dp[j]) for j in range(depth)]
                self.layers.append(AttentionStage(blocks, res, merge))
            if i < len(cfg.merge_strides):
                res = -(-res // cfg.merge_strides[i])
        self.neck = nn.Sequential(
            nn.Conv2d(dims[-1], cfg.out_chans, 1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, 3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        g = self.cfg.grid_size
        return self.neck(x.transpose(1, 2).reshape(b, c, g, g))
