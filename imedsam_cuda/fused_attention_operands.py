"""A lean encoder block's attention operands as ONE Triton kernel (torch-cuda's ``fused_operands``, off by default
until a GPU has timed it).

Between its qkv GEMM and the attention, a ``LeanBlock`` builds the extended queries, keys and values of SAM's
decomposed relative-position attention ([s q, q . Rh, q . Rw, 0], [k, one-hot row and column, 0], [v, 0]) in
four kernels: a batched GEMM of the queries against the table [s I; Rh; Rw; 0], a gather of each token's
columns, and a concatenation each for the keys and the values; a windowed block first gathers the tokens'
qkv into window order and puts the bias in the padding tokens (two more). Six small kernels on the encoder's
critical path in each of vit_b's eight windowed blocks, four in each global one (benchmarks/op_count.py).

Here a program takes BLOCK_T window-ordered tokens of one head, reads their q, k and v where the qkv GEMM wrote
them (the bias for a padding token), and writes the three operands in the ``(windows, tokens, heads, d)``
layout the attention reads. Each relative-position column is the dot product of the token's query with the
table row its ``q_index`` names: the same bf16 x bf16 products as the GEMM, summed in fp32 in another order,
then rounded to the compute dtype as the GEMM's output is; s q is exact (s is a power of two). The key and value
columns are copied. tests/test_fused_attention_operands.py runs it in Triton's interpreter against
``LeanBlock``'s torch ops and compiles it ahead of time for sm_90.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from imedsam_cuda.encoder_rewrites import LeanBlock

__all__ = ["attention_operands", "available", "compile_for"]

BLOCK_T = 16  # tokens a program (32: 154-255 registers a thread at vit_b's widths; 16: 116-139, no spills)
NUM_WARPS = 4

if triton is not None:

    @triton.jit
    def _operands_kernel(
        qkv_ptr, bias_ptr, src_ptr, qidx_ptr, table_ptr, kcols_ptr, q_ptr, k_ptr, v_ptr,
        rows, per_image, tokens, src_tokens, rel, scale,
        C: tl.constexpr, HEADS: tl.constexpr, HEAD: tl.constexpr, D: tl.constexpr,
        WINDOWED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):  # pragma: no cover - compiled by triton (or run by its interpreter in the tests' subprocess)
        r = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # window-ordered token rows (int32 offsets: the
        # caller checks that they fit, and 64-bit ones double the address registers of every tile)
        h = tl.program_id(1)
        ok = r < rows
        r = tl.where(ok, r, 0)
        img = r // per_image
        j = r % per_image  # the token's place in its image's window order
        p = j % tokens  # ... and in its window: the row of q_index and of the key columns
        if WINDOWED:  # noqa: SIM108  # the grid token it is, -1 for a padding token
            src = tl.load(src_ptr + j)
        else:
            src = j
        real = src >= 0
        m = tl.arange(0, BLOCK_C)
        m_ok = m < HEAD
        e = tl.arange(0, BLOCK_E)  # the extension's columns, after the head's HEAD
        e_ok = e < D - HEAD
        at = (img * src_tokens + tl.where(real, src, 0)) * (3 * C) + h * HEAD
        ld = (ok & real)[:, None] & m_ok[None, :]
        pad = (~real)[:, None]
        out = (r * HEADS + h) * D
        st = ok[:, None] & m_ok[None, :]
        st_e = ok[:, None] & e_ok[None, :]
        dt = q_ptr.dtype.element_ty
        q = tl.load(qkv_ptr + at[:, None] + m[None, :], mask=ld, other=0.0)
        if HAS_BIAS:  # a padding token projects a zero token: its qkv is the bias
            q = tl.where(pad, tl.load(bias_ptr + h * HEAD + m, mask=m_ok, other=0.0)[None, :], q)
        qf = q.to(tl.float32)
        tl.store(q_ptr + out[:, None] + m[None, :], (qf * scale).to(dt), mask=st)
        # position column e of token t: q_t . (the table row q_index names), accumulated over the head's HEAD
        # dimensions in fp32 (q re-read a column at a time from cache: no cross-lane sums, few registers)
        pos = ok[:, None] & (e < rel)[None, :]
        row = tl.load(qidx_ptr + p[:, None] * D + HEAD + e[None, :], mask=pos, other=0).to(tl.int32) * HEAD
        ext = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        q_at = qkv_ptr + at
        for i in range(HEAD):
            qi = tl.load(q_at + i, mask=ok & real, other=0.0)
            if HAS_BIAS:
                qi = tl.where(real, qi, tl.load(bias_ptr + h * HEAD + i))
            ti = tl.load(table_ptr + row + i, mask=pos, other=0.0)
            ext += qi.to(tl.float32)[:, None] * ti.to(tl.float32)
        tl.store(q_ptr + out[:, None] + HEAD + e[None, :], ext.to(dt), mask=st_e)
        k = tl.load(qkv_ptr + at[:, None] + C + m[None, :], mask=ld, other=0.0)
        if HAS_BIAS:
            k = tl.where(pad, tl.load(bias_ptr + C + h * HEAD + m, mask=m_ok, other=0.0)[None, :], k)
        tl.store(k_ptr + out[:, None] + m[None, :], k.to(dt), mask=st)
        cols = tl.load(kcols_ptr + p[:, None] * (D - HEAD) + e[None, :], mask=st_e, other=0.0)
        tl.store(k_ptr + out[:, None] + HEAD + e[None, :], cols.to(dt), mask=st_e)
        v = tl.load(qkv_ptr + at[:, None] + 2 * C + m[None, :], mask=ld, other=0.0)
        if HAS_BIAS:
            v = tl.where(pad, tl.load(bias_ptr + 2 * C + h * HEAD + m, mask=m_ok, other=0.0)[None, :], v)
        tl.store(v_ptr + out[:, None] + m[None, :], v.to(dt), mask=st)
        tl.store(v_ptr + out[:, None] + HEAD + e[None, :], tl.zeros((BLOCK_T, BLOCK_E), dtype=dt), mask=st_e)


def _shape(block: LeanBlock) -> tuple[int, int, int, int]:
    """(channels C, heads, head width c, extended width d) of ``block``."""
    c = block.dim // block.heads
    return block.dim, block.heads, c, block.q_index.shape[-1]


def attention_operands(block: LeanBlock, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``block``'s qkv GEMM output (B, H W, 3C), grid-ordered -> its attention's extended q, k, v, each
    (windows, tokens a window, heads, d) in qkv's dtype, as ``LeanBlock.operands`` makes them from
    ``LeanBlock.windows``."""
    C, heads, c, d = _shape(block)
    B, n_src, _ = qkv.shape
    windowed = bool(block.window_size)
    tokens = block.q_index.shape[0]  # a window's (or the grid's) tokens
    per_image = block.win_src.numel() if windowed else n_src
    if qkv.shape[-1] != 3 * C or (not windowed and n_src != tokens):
        raise ValueError(f"attention_operands: qkv {tuple(qkv.shape)} is not this block's ({tokens} tokens, 3 x {C})")
    if max(qkv.numel(), B * per_image * heads * d) >= 2**31:  # the kernel's offsets are int32
        raise ValueError(f"attention_operands: a batch of {B} is too large for one launch")
    qkv = qkv.contiguous()
    table = block.table.weight
    cols = block.key_cols if block.key_cols.dtype == qkv.dtype else block.key_cols.to(qkv.dtype)
    bias = block.qkv.bias
    rows = B * per_image
    shape = (rows // tokens, tokens, heads, d)
    q, k, v = (torch.empty(shape, dtype=qkv.dtype, device=qkv.device) for _ in range(3))
    src = block.win_src_or_pad if windowed else block.q_index  # any int tensor when unused
    launch: dict[str, Any] = dict(C=C, HEADS=heads, HEAD=c, D=d, WINDOWED=windowed,
                                  HAS_BIAS=bias is not None, BLOCK_T=BLOCK_T, BLOCK_C=pow2(c),
                                  BLOCK_E=pow2(d - c), num_warps=NUM_WARPS)
    with on_device(qkv):
        _operands_kernel[(triton.cdiv(rows, BLOCK_T), heads)](
            qkv, bias if bias is not None else qkv, src, block.q_index, table, cols, q, k, v,
            rows, per_image, tokens, n_src, block.rel_columns, float(block.scale), **launch)
    return q, k, v


def compile_for(block: LeanBlock, dtype: torch.dtype, capability: int = 90) -> dict[str, Any]:
    """Compile the kernel ahead of time for an NVIDIA target (90: Hopper), with no GPU, for ``block``'s shapes in
    ``dtype``. Returns its shared memory, registers a thread and spilled bytes. The interpreter runs a kernel
    that may still fail to compile."""
    C, heads, c, d = _shape(block)
    t = TRITON_DTYPE[dtype]
    sig = {"qkv_ptr": f"*{t}", "bias_ptr": f"*{t}", "src_ptr": "*i32" if block.window_size else "*i64",
           "qidx_ptr": "*i64", "table_ptr": f"*{t}", "kcols_ptr": f"*{t}", "q_ptr": f"*{t}", "k_ptr": f"*{t}",
           "v_ptr": f"*{t}", **dict.fromkeys(("rows", "per_image", "tokens", "src_tokens", "rel"), "i32"),
           "scale": "fp32"}
    const = {"C": C, "HEADS": heads, "HEAD": c, "D": d, "WINDOWED": bool(block.window_size),
             "HAS_BIAS": block.qkv.bias is not None, "BLOCK_T": BLOCK_T, "BLOCK_C": pow2(c), "BLOCK_E": pow2(d - c)}
    k = compile_ahead(_operands_kernel, sig, const, capability, {"num_warps": NUM_WARPS})
    return {"shared_bytes": int(k.metadata.shared), **ptxas_usage(k, capability)}

