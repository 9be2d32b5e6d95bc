"""The reference to beat: the compute the authors' released I-MedSAM code performs, with OUR weights.

A re-implementation of the released code's inference *structure* (the authors' I-MedSAM repository), not a copy of it, driven by
the modules of one of our ``IMedSAM`` models so both compute the same function on the same inputs in one
process and a benchmark can report a ratio plus the pixel agreement:

- the frequency spectrum goes through the host: image -> numpy -> ``np.fft.fft2`` / ``fftshift`` / ``abs`` /
  min-max -> back to a torch tensor on the model's device (a device-host-device round trip per image);
- the encoder runs LoRA unmerged (two extra low-rank matmuls per block, added into the q and v thirds), and
  segment-anything's ``add_decomposed_rel_pos`` rebuilds the relative-position index with CPU ``arange``s
  on every call;
- every output pixel is a query: the features of all H*W points are sampled and concatenated at once;
- the coarse INR runs T = ``mc_samples`` times, each pass recomputing the whole coarse trunk (dropout sits
  after the trunk, so the passes could share it: the released code does not);
- the fine INR then runs on the selected ceil(12.5% * N) points only; everything is eager fp32.

One deliberate deviation, for a meaningful agreement figure: in eval mode the released code has dropout
off, so its MC variance is exactly 0 and the "top 12.5% uncertain" points are an arbitrary set. Here the
T passes are still computed (and their variance too, as in the code), but the points are *ranked* by our
closed-form dropout variance (``INR.coarse_eval``), so the reference's output is the same function as
ours and any disagreement measures our rewrites, not the released code's arbitrary choice.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import (
    add_decomposed_rel_pos,
    window_partition,
    window_unpartition,
)

from imedsam_core.contract import refine_count
from imedsam_train.model import IMedSAM, grid_coords
from imedsam_train.model.encoder import Attention, Block
from imedsam_train.model.lora import LoRAQKV


def host_spectrum(image: torch.Tensor, channel: int, eps: float = 1e-8) -> torch.Tensor:
    """The released code's frequency input: numpy FFT amplitude on the host, min-max normalised per image."""
    x = image[:, channel].detach().cpu().numpy()
    amp = np.abs(np.fft.fftshift(np.fft.fft2(x), axes=(-2, -1)))
    lo = amp.min(axis=(-2, -1), keepdims=True)
    hi = amp.max(axis=(-2, -1), keepdims=True)
    s = ((amp - lo) / (hi - lo + eps)).astype(np.float32)
    return torch.from_numpy(s)[:, None].to(image.device)


def _qkv_unmerged(qkv: torch.nn.Linear, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """Frozen qkv plus the LoRA q / v updates as separate low-rank products (the released code's layout)."""
    out = F.linear(x, qkv.weight, qkv.bias)
    if not isinstance(qkv, LoRAQKV):
        return out
    dq = F.linear(F.linear(x, qkv.lora_a_q), qkv.lora_b_q)
    dv = F.linear(F.linear(x, qkv.lora_a_v), qkv.lora_b_v)
    if gate is not None:
        g = gate.reshape((-1,) + (1,) * (dq.dim() - 1))
        dq, dv = dq * g, dv * g
    d = qkv.dim
    return torch.cat([out[..., :d] + dq, out[..., d : 2 * d], out[..., 2 * d :] + dv], dim=-1)


def _attention(attn: Attention, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    B, H, W, _ = x.shape
    qkv = _qkv_unmerged(attn.qkv, x, gate).reshape(B, H * W, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * attn.num_heads, H * W, -1).unbind(0)
    a = (q * attn.scale) @ k.transpose(-2, -1)
    a = add_decomposed_rel_pos(a, q, attn.rel_pos_h, attn.rel_pos_w, (H, W), (H, W)).softmax(dim=-1)
    x = (a @ v).view(B, attn.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return attn.proj(x)


def _block(blk: Block, x: torch.Tensor, f: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    qkv = blk.attn.qkv
    gate = None
    if isinstance(qkv, LoRAQKV) and qkv.gate is not None:
        gate = qkv.gate(x.mean(dim=(1, 2)))[:, 0]
    shortcut = x
    h = blk.norm1(x)
    if blk.window_size > 0:
        H, W = h.shape[1], h.shape[2]
        h, pad_hw = window_partition(h, blk.window_size)
        if gate is not None:
            gate = gate.repeat_interleave(h.shape[0] // x.shape[0])
        h = window_unpartition(_attention(blk.attn, h, gate), blk.window_size, pad_hw, (H, W))
    else:
        h = _attention(blk.attn, h, gate)
    x = shortcut + h
    out = x + blk.mlp(blk.norm2(x))
    if blk.freq is not None and f is not None:
        f = blk.freq(f)
        out = out + blk.freq_scale * f
    return out, f


class ReferenceIMedSAM:
    """The released code's inference compute over the weights of ``model`` (kept in eval mode)."""

    def __init__(self, model: IMedSAM) -> None:
        self.model = model.eval()
        if model.cfg.frequency.mode != "amplitude":
            raise ValueError("the released code's frequency input is the amplitude spectrum")

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        enc = self.model.image_encoder
        x = enc.patch_embed(image) + enc.pos_embed
        f = None
        if enc.freq_cfg.enabled:
            s = host_spectrum(image, enc.freq_cfg.channel)
            f = enc.patch_embed(s.expand(-1, 3, -1, -1)) + enc.pos_embed
        for blk in enc.blocks:
            assert isinstance(blk, Block)
            x, f = _block(blk, x, f)
        return enc.neck(x.permute(0, 3, 1, 2))

    @torch.no_grad()
    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Final (UGS-merged) logits (B, K, H*W) at every pixel of an H x W output."""
        m, inr = self.model, self.model.inr
        up, pe = m.decoder_features(embedding, boxes)
        coords = grid_coords(*out_size, device=embedding.device).unsqueeze(0).expand(embedding.shape[0], -1, -1)
        feats = m.point_features(up, pe, coords)  # every pixel: (B, N, F) concatenated features
        B, N, Fd = feats.shape
        flat = feats.reshape(B * N, Fd)
        K = inr.num_classes
        outs, h = [], None
        for _ in range(inr.T):  # T MC passes, each recomputing the whole coarse trunk
            h = inr.coarse_trunk(flat)
            outs.append(inr.coarse_head(F.dropout(h, inr.p, training=False)))
        assert h is not None
        stack = torch.stack(outs)
        _mc_variance = torch.sigmoid(stack[..., :K]).var(dim=0)  # exactly 0 in eval mode (the known defect)
        mean = stack.mean(dim=0)
        logits, cfeat = mean[:, :K].reshape(B, N, K), mean[:, K:].reshape(B, N, -1)
        # ranking: our closed-form dropout variance (see the module docstring)
        w = inr.coarse_head.weight[:K]
        var_z = (inr.p / (1.0 - inr.p)) * (h * h) @ (w * w).t()
        s = torch.sigmoid(logits)
        unc = (s * (1 - s)) ** 2 * var_z.reshape(B, N, K)
        k = refine_count(N, inr.refine_fraction)
        idx = unc.topk(k, dim=1).indices  # (B, k, K)
        out = logits.clone()
        for c in range(K):
            ic = idx[:, :, c]
            sel = torch.cat([_gather(feats, ic), _gather(cfeat, ic)], dim=-1)
            fc = inr.fine_head(inr.fine_trunk(sel.reshape(-1, sel.shape[-1]))).reshape(B, k, K)[..., c]
            out[:, :, c] = out[:, :, c].scatter(1, ic, fc)
        return out.transpose(1, 2)

    @torch.no_grad()
    def __call__(self, image: torch.Tensor, boxes: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        return self.decode(self.encode(image), boxes, out_size)


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(1, idx[..., None].expand(-1, -1, t.shape[-1]))
