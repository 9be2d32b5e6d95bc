"""Rewrites of the image encoder for an inference copy run by torch (torch-cuda's ``lean_encoder``).

Each does the same arithmetic in fewer GPU kernels (inside a CUDA graph every kernel costs microseconds however
little it does; an H200's vit_b encoder was 552 kernels and launch-bound, benchmarks/HISTORY.md session 7):

- ``LeanBlock``: each block's attention (SAM's decomposed relative-position bias folded into the logits'
  matmul, as ``Attention.attend`` does) with its queries extended by one GEMM and one gather, and windowing by
  index gathers instead of pad / partition / unpartition / crop copies: about half the kernels.
- ``PatchGEMM``: the patch embedding (a convolution whose stride is its kernel) as one copy that lays the
  patches out as rows, already in the compute dtype, and one GEMM. cuDNN ran it as an implicit-GEMM
  convolution of 83 us (H200, 384² input, session 7) for a 576 x 768 x 768 product.
- ``NeckNHWC``: the neck on the tokens' own channels-last layout: the 1x1 convolution as a GEMM without the
  NCHW permute, each LayerNorm2d (ten elementwise kernels in segment-anything's explicit form) as one
  ``layer_norm`` (fp32 under autocast, like every other LayerNorm), the 3x3 convolution in channels-last.

All three reorder fp32 sums only (within fp32 rounding, tests/test_encoder_rewrites.py); under bf16 autocast
the neck's norms now run in fp32 instead of bf16, closer to the fp32 model. The ONNX graphs keep the model's
own forms. Two Triton options further cut a lean block's kernels (both off by default):
- ``use_fused_norms``: its residual adds and norms (``imedsam_cuda.fused_add_norm``), a windowed block's gather
  back to grid order read in the add;
- ``use_fused_operands``: its attention operands, the window gather included
  (``imedsam_cuda.fused_attention_operands``);
and ``use_fused_frequency`` runs every block's frequency adapter as one kernel
(``imedsam_cuda.fused_frequency_chain``). ``use_gelu_epilogue`` (any block, no Triton; off by default) runs
each block MLP's first layer and its GELU as one GEMM with cuBLASLt's GELU epilogue.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d, MLPBlock
from segment_anything.modeling.image_encoder import PatchEmbed
from torch import nn

from imedsam_cuda import fused_add_norm
from imedsam_cuda.encoder_loop import InferenceEncoder, StepBlock
from imedsam_train.model.encoder import Attention, Block, ImageEncoder


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear under the current autocast state computes ``x`` in."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _exact_scale(attn: Attention) -> bool:
    """A scale that is a power of two: a product with it is exact in every float format."""
    return math.frexp(attn.scale)[0] == 0.5


class LeanBlock(StepBlock):
    """An encoder ``Block`` (merged qkv, power-of-two scale) whose attention runs in about half the kernels.

    - The queries extended with SAM's decomposed relative-position bias (``Attention.attend``: [s q, q . Rh,
      q . Rw, zero padding]) come from one GEMM, batched over the heads, against the table [s I; R_h; R_w; 0]
      that reads the queries where qkv wrote them, and one gather of the needed columns; before: a scale
      multiply, two broadcast batched matmuls (three operand copies and an output copy), a cat and the
      q/k/v layout copies.
    - Keys and values are extended in place of their layout copies (one cat each); the attention output
      feeds the projection as it lies, its zero value columns against zero weight columns.
    - Windowed blocks gather the real tokens' qkv (bias included) into window order and put the bias in the
      padding tokens (segment-anything projects zero tokens: bias alone), project the windows, and gather
      the real tokens back: no pad, partition, unpartition or crop copies.
    Within fp32 rounding of ``Block`` (the products and sums are the same; GEMM shapes, hence summation
    orders, differ). Position tables and index constants are made for the encoder's own token grid."""

    def __init__(self, block: Block, grid: int, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        attn = block.attn
        self.norm1, self.norm2, self.mlp = block.norm1, block.norm2, block.mlp
        self.window_size, self.freq, self.freq_scale = block.window_size, block.freq, block.freq_scale
        qkv, heads = attn.qkv, attn.num_heads
        C = qkv.weight.shape[1]
        c = C // heads
        dev = qkv.weight.device
        self.heads, self.dim, self.scale = heads, C, attn.scale
        self.qkv = nn.Linear(C, 3 * C, bias=qkv.bias is not None).to(dev)
        n = self.window_size or grid  # the attention's token grid is n x n (a window, or the whole grid)
        rh, rw = attn.rel_pos_h.detach(), attn.rel_pos_w.detach()  # (2n - 1, c) each
        f = -(-(c + rh.shape[0] + rw.shape[0] + 1) // 8) * 8  # per head: s I, R_h, R_w, >= 1 zero row
        zero = c + rh.shape[0] + rw.shape[0]  # the first zero column of a head's block
        d = -(-(c + 2 * n) // 8) * 8  # the extended query / key width (Attention.position_tables' z)
        self.table = nn.Linear(c, f, bias=False).to(dev)  # one head's [s I; R_h; R_w; 0], shared by the heads
        self.proj = nn.Linear(heads * d, C).to(dev)
        with torch.no_grad():
            self.qkv.weight.copy_(qkv.weight)
            if qkv.bias is not None:
                self.qkv.bias.copy_(qkv.bias)
            block_t = torch.zeros(f, c, device=dev)
            block_t[:c] = attn.scale * torch.eye(c, device=dev)
            block_t[c : c + rh.shape[0]] = rh
            block_t[c + rh.shape[0] : zero] = rw
            self.table.weight.copy_(block_t)
            w = torch.zeros(C, heads, d, device=dev)  # zero columns against the zero-padded values
            w[:, :, :c] = attn.proj.weight.view(C, heads, c)
            self.proj.weight.copy_(w.view(C, heads * d))
            self.proj.bias.copy_(attn.proj.bias)
        # column j of token (i, k)'s extended query: q (j < c), Rh[i - k'] (k' = j - c < n), Rw[k - l'] ...
        i, k = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        i, k = i.reshape(-1, 1), k.reshape(-1, 1)
        r = torch.arange(n)[None]
        cols = [torch.arange(c).expand(n * n, c), c + (i - r + n - 1), c + rh.shape[0] + (k - r + n - 1),
                torch.full((n * n, d - c - 2 * n), zero)]
        self.q_index: torch.Tensor
        self.register_buffer("q_index", torch.cat(cols, 1)[:, None].to(dev), persistent=False)  # (N, 1, d)
        self.rel_columns = 2 * n  # the extended queries' position columns; the rest of them read the zero row
        onehot = (attn.key_onehot if d - c == 2 * n else F.pad(attn.key_onehot, (0, d - c - 2 * n)))
        self.key_cols: torch.Tensor  # the keys' one-hot (row, column) extension and the values' zero padding
        self.register_buffer("key_cols", onehot[:, None].to(dev, dtype), persistent=False)  # (N, 1, d - c)
        self.value_pad: torch.Tensor
        self.register_buffer("value_pad", torch.zeros(1, 1, 1, d - c, device=dev, dtype=dtype), persistent=False)
        if self.window_size:
            ws = self.window_size
            gp = -(-grid // ws) * ws  # the padded grid
            wr, wc = torch.meshgrid(torch.arange(gp), torch.arange(gp), indexing="ij")
            # window order: (window row, window column, row in window, column in window)

            def order(t: torch.Tensor) -> torch.Tensor:
                return t.view(gp // ws, ws, gp // ws, ws).permute(0, 2, 1, 3).reshape(-1)

            wr, wc = order(wr), order(wc)
            real = (wr < grid) & (wc < grid)
            src = torch.where(real, wr * grid + wc, 0)
            dst = torch.empty(grid * grid, dtype=torch.long)
            dst[src[real]] = torch.nonzero(real)[:, 0]
            self.win_src: torch.Tensor
            self.win_pad: torch.Tensor
            self.win_dst: torch.Tensor
            self.register_buffer("win_src", src.to(dev), persistent=False)
            self.register_buffer("win_pad", (~real)[:, None].to(dev), persistent=False)
            self.register_buffer("win_dst", dst.to(dev), persistent=False)
            self.win_src_or_pad: torch.Tensor  # win_src with -1 at the padding tokens (fused_attention_operands)
            self.register_buffer("win_src_or_pad", torch.where(real, src, -1).to(dev, torch.int32), persistent=False)

    def operands(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Window-ordered qkv (Bw, N, 3C) -> the attention's extended q, k, v, each (Bw, N, heads, d): queries
        with the relative-position bias columns, keys with their one-hot columns, values zero-padded."""
        bw, n, _ = qkv.shape
        C, heads = self.dim, self.heads
        c = C // heads
        # every head's queries against the table in one batched GEMM over the heads, reading them where qkv put
        # them (head h of token t: row t, columns h c ..; a batch stride of c), then the needed columns gathered
        # straight into the (Bw, N, heads, d) layout the attention reads
        q = qkv[..., :C].reshape(bw * n, heads, c).transpose(0, 1)
        w = self.table.weight  # (f, c)
        full = torch.bmm(q, w.t().expand(heads, -1, -1)).view(heads, bw, n, -1)  # (heads, Bw, N, f)
        q_ext = torch.gather(full.permute(1, 2, 0, 3), 3, self.q_index[None].expand(bw, n, heads, -1))
        cols, pad = self.key_cols, self.value_pad
        if cols.dtype != qkv.dtype:  # made for another compute dtype: cast (a kernel each) rather than fail
            cols, pad = cols.to(qkv.dtype), pad.to(qkv.dtype)
        k_ext = torch.cat([qkv[..., C : 2 * C].view(bw, n, heads, c), cols[None].expand(bw, n, heads, -1)], 3)
        v_ext = torch.cat([qkv[..., 2 * C :].view(bw, n, heads, c), pad.expand(bw, n, heads, -1)], 3)
        return q_ext, k_ext, v_ext

    def windows(self, qkv: torch.Tensor) -> torch.Tensor:
        """Grid-ordered qkv (B, H W, 3C) -> window-ordered (B windows, ws^2, 3C), the padding tokens' the bias
        (a padding token projects a zero token); a global block's as it is."""
        if not self.window_size:
            return qkv
        win = qkv[:, self.win_src]
        if self.qkv.bias is not None:
            win = torch.where(self.win_pad, self.qkv.bias.to(win.dtype), win)
        else:
            win = win.masked_fill(self.win_pad, 0.0)
        return win.view(-1, self.window_size**2, qkv.shape[-1])

    # torch-cuda's ``fused_operands``: the extended q, k, v (and, windowed, the window gather) as one
    # ``fused_attention_operands`` kernel (CUDA, or Triton's interpreter)
    fused_operands = False

    def _sdpa(self, q_ext: torch.Tensor, k_ext: torch.Tensor, v_ext: torch.Tensor) -> torch.Tensor:
        """(Bw, N, heads, d) operands -> (Bw, N, heads * d)."""
        bw, n = q_ext.shape[:2]
        out = F.scaled_dot_product_attention(q_ext.transpose(1, 2), k_ext.transpose(1, 2), v_ext.transpose(1, 2),
                                             scale=1.0)
        return out.transpose(1, 2).reshape(bw, n, -1)

    def attention_rows(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The normalised tokens (B, H, W, C) -> the attention branch's output as rows (B, R, C) and, for a
        windowed block, the row of each grid token (H W,) (R: the windows' tokens, padding included), else None
        (the rows are the grid's). ``fused_add_norm`` gathers the rows in the residual add itself."""
        B, H, W, C = h.shape
        qkv = self.qkv(h).view(B, H * W, 3 * C)
        if self.window_size and self.win_dst.numel() != H * W:
            raise ValueError(f"LeanBlock: made for a {self.win_dst.numel()}-token grid, got {H}x{W}")
        if self.fused_operands:
            from imedsam_cuda.fused_attention_operands import attention_operands

            ops = attention_operands(self, qkv)
        else:
            ops = self.operands(self.windows(qkv))
        out = self.proj(self._sdpa(*ops))
        return out.view(B, -1, C), (self.win_dst if self.window_size else None)

    def attention(self, h: torch.Tensor) -> torch.Tensor:
        """The normalised tokens (B, H, W, C) -> the attention branch's output (B, H, W, C)."""
        out, rows = self.attention_rows(h)
        return (out if rows is None else out[:, rows]).view(h.shape)

    # torch-cuda's ``fused_norms``: ``step`` runs the residual adds, the norms and their casts as
    # ``fused_add_norm.add_norm`` kernels (CUDA, or Triton's interpreter)
    fused_norms = False

    @property
    def fuses_steps(self) -> bool:
        return self.fused_norms

    def step(self, x: torch.Tensor, y: torch.Tensor | None, add: torch.Tensor, wait: Callable[[], None],
             next_block: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``StepBlock.step`` with fused norms: norm1 (only for the first block: the others get y from the step
        before), x + attention with norm2 (a windowed attention's rows read in grid order there), and x + mlp +
        the adapter's add with the next block's norm1, each one kernel. The sums are torch's, bitwise; the norms
        within fp32 rounding before the cast."""
        if not self.fused_norms:
            return super().step(x, y, add, wait, next_block)
        add_norm = fused_add_norm.add_norm
        dt = _compute_dtype(x)
        if y is None:
            _, y = add_norm(x, None, None, self.norm1, dt, write_sum=False)
        a, rows = self.attention_rows(y)
        s, y2 = add_norm(x, a, None, self.norm2, dt, a_rows=rows)
        assert s is not None
        m = self.mlp(y2)
        wait()
        if isinstance(next_block, LeanBlock) and next_block.fused_norms:
            s, y_next = add_norm(s, m, add, next_block.norm1, dt)
            assert s is not None
            return s, y_next
        return s + m + add, None

    def forward(self, x: torch.Tensor, f: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.attention(self.norm1(x))
        out = x + self.mlp(self.norm2(x))
        if self.freq is not None and f is not None:
            f, add = self.frequency_step(f)
            out = out + add
        return out, f


def lean_block(block: Block, grid: int, dtype: torch.dtype) -> Block:
    """``LeanBlock(block)`` where it applies (qkv merged, no LoRA gate, a power-of-two scale), else ``block``."""
    attn = block.attn if not isinstance(block, LeanBlock) else None
    if attn is None or getattr(attn.qkv, "merged", True) is False or not _exact_scale(attn):
        return block
    return LeanBlock(block, grid, dtype)


def layer_norm_of(norm: LayerNorm2d) -> nn.LayerNorm:
    """segment-anything's ``LayerNorm2d`` (over NCHW channels) as the ``nn.LayerNorm`` over the last dimension that
    computes it on channels-last data: the same biased variance over the channels, eps inside the root."""
    ln = nn.LayerNorm(norm.weight.shape[0], eps=norm.eps).to(norm.weight.device)
    with torch.no_grad():
        ln.weight.copy_(norm.weight)
        ln.bias.copy_(norm.bias)
    return ln


class PatchGEMM(nn.Module):
    """``PatchEmbed`` (a p x p convolution with stride p) as rows of patches times the flattened kernel:
    (B, C, H, W) -> (B, H/p, W/p, E)."""

    def __init__(self, embed: PatchEmbed) -> None:
        super().__init__()
        conv = embed.proj
        p = conv.kernel_size[0]
        if conv.kernel_size != (p, p) or conv.stride != (p, p) or conv.padding != (0, 0):
            raise ValueError(f"PatchGEMM: not a patch embedding (kernel {conv.kernel_size}, stride {conv.stride})")
        self.p = p
        self.proj = nn.Linear(conv.in_channels * p * p, conv.out_channels, bias=conv.bias is not None)
        with torch.no_grad():  # (E, C, p, p) -> (E, C p p): the row layout of the patches below
            self.proj.weight.copy_(conv.weight.reshape(conv.out_channels, -1))
            if conv.bias is not None:
                self.proj.bias.copy_(conv.bias)
        self.proj.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.p
        # one copy kernel: the (C, p, p) patches as rows, cast on the way to the dtype the GEMM reads (autocast
        # would cast the image in a kernel of its own); an expanded single channel is materialised here too
        rows = torch.empty((B, H // p, W // p, C, p, p), dtype=_compute_dtype(x), device=x.device)
        rows.copy_(x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5))
        return self.proj(rows.view(B, H // p, W // p, C * p * p))


class NeckNHWC(nn.Module):
    """segment-anything's neck (1x1 conv, LayerNorm2d, 3x3 conv, LayerNorm2d) on channels-last tokens.

    Takes what ``ImageEncoder.forward`` passes, the (B, C, g, g) permuted view of its (B, g, g, C) tokens,
    and returns the (B, out, g, g) embedding in channels-last memory (the box part's transformer reads it as
    (B, g g, out) tokens: contiguous that way, its projections are single GEMMs, and no NCHW copy is made)."""

    def __init__(self, neck: nn.Sequential) -> None:
        super().__init__()
        c1, n1, c2, n2 = neck
        if not (isinstance(c1, nn.Conv2d) and c1.kernel_size == (1, 1) and isinstance(n1, LayerNorm2d)
                and isinstance(c2, nn.Conv2d) and isinstance(n2, LayerNorm2d)):
            raise ValueError("NeckNHWC: not segment-anything's neck")
        self.lin = nn.Linear(c1.in_channels, c1.out_channels, bias=c1.bias is not None)
        with torch.no_grad():
            self.lin.weight.copy_(c1.weight.reshape(c1.out_channels, c1.in_channels))
            if c1.bias is not None:
                self.lin.bias.copy_(c1.bias)
        self.lin.to(c1.weight.device)
        self.conv = c2
        self.norm1, self.norm2 = layer_norm_of(n1), layer_norm_of(n2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(self.lin(x.permute(0, 2, 3, 1)))  # the tokens' own layout: no copy
        h = self.conv(h.permute(0, 3, 1, 2))  # a channels-last NCHW view: no layout transform before the conv
        return self.norm2(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def use_fused_norms(encoder: InferenceEncoder, on: bool = True) -> int:
    """Switch the ``LeanBlock``s' residual adds and norms to (or from) ``fused_add_norm`` kernels, in the
    frequency-first block loop (``InferenceEncoder.frequency_chain_first``, which the encoder then runs with or
    without its side stream); returns how many blocks."""
    blocks = [b for b in encoder.blocks if isinstance(b, LeanBlock)]
    for b in blocks:
        b.fused_norms = on  # the encoder then runs its chain-first loop (``StepBlock.fuses_steps``)
    return len(blocks)


def use_fused_frequency(encoder: InferenceEncoder, on: bool = True) -> bool:
    """Run every block's frequency adapter as one ``fused_frequency_chain`` kernel (or each as torch ops again),
    made from the adapters' current weights (store them in the compute dtype first); returns whether it is on
    (an encoder without adapters keeps its own)."""
    if on and encoder.freq_cfg.enabled:
        from imedsam_cuda.fused_frequency_chain import FusedFrequencyChain

        encoder.adapter_chain = FusedFrequencyChain(encoder)
    else:
        encoder.adapter_chain = None
    return encoder.adapter_chain is not None


def _gelu_epilogue_mlp(self: MLPBlock, x: torch.Tensor) -> torch.Tensor:
    """``MLPBlock.forward`` (lin2(GELU(lin1(x)))) with lin1 and its GELU as one GEMM, ``torch._addmm_activation``;
    its input in lin1's weight dtype, as autocast would cast it. On CUDA that is cuBLASLt's bias-and-GELU
    epilogue, which computes GELU's tanh approximation (within ~5e-4 of the exact GELU, under half a bf16 ulp
    of values near 1); on a CPU it is the exact GELU after the GEMM (tests/test_encoder_rewrites.py)."""
    w = self.lin1.weight
    h = torch._addmm_activation(self.lin1.bias, x.reshape(-1, x.shape[-1]).to(w.dtype), w.t(), use_gelu=True)
    return self.lin2(h.view(*x.shape[:-1], h.shape[-1]))


def use_gelu_epilogue(encoder: ImageEncoder, on: bool = True) -> int:
    """Switch every block's MLP (this instance's forward) to ``_gelu_epilogue_mlp``, or back to its class's;
    returns how many now run it. Blocks whose MLP is not an exact GELU between biased layers keep theirs."""
    n = 0
    for blk in encoder.blocks:
        mlp = blk.mlp
        if not isinstance(mlp, MLPBlock):
            continue
        exact = isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"
        if on and exact and mlp.lin1.bias is not None:
            mlp.forward = types.MethodType(_gelu_epilogue_mlp, mlp)  # type: ignore[method-assign]
            n += 1
        elif "forward" in mlp.__dict__:
            del mlp.forward
    return n


def use_fused_operands(encoder: ImageEncoder, on: bool = True) -> int:
    """Switch the ``LeanBlock``s' attention operands to (or from) the ``fused_attention_operands`` kernel; returns
    how many blocks."""
    blocks = [b for b in encoder.blocks if isinstance(b, LeanBlock)]
    for b in blocks:
        b.fused_operands = on
    return len(blocks)


def lean_encoder(encoder: ImageEncoder, dtype: torch.dtype = torch.float32) -> dict[str, int]:
    """Apply every rewrite above to ``encoder`` in place (an inference copy: its modules are replaced);
    ``dtype``: the dtype its attention computes in (the autocast dtype, or float32), for the constants.
    Returns how many of each were made."""
    done = {"lean_blocks": 0, "patch_gemm": 0, "neck_nhwc": 0}
    for i, blk in enumerate(encoder.blocks):
        assert isinstance(blk, Block)
        new = lean_block(blk, encoder.grid, dtype)
        done["lean_blocks"] += new is not blk
        encoder.blocks[i] = new
    if isinstance(encoder.patch_embed, PatchEmbed):
        encoder.patch_embed = PatchGEMM(encoder.patch_embed)  # type: ignore[assignment]
        done["patch_gemm"] = 1
    if isinstance(encoder.neck, nn.Sequential):
        encoder.neck = NeckNHWC(encoder.neck)  # type: ignore[assignment]
        done["neck_nhwc"] = 1
    return done
