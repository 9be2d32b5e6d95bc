"""The encoder's residual adds, LayerNorm and the cast to the compute dtype as ONE Triton kernel (torch-cuda's
``fused_norms``, off by default until a GPU has timed it).

Under autocast a block's residual stream is fp32 and every LayerNorm runs in fp32, so each norm costs a kernel
and its output another (the cast to bf16 for the next GEMM), and each residual add a third: per block
``x + attn``, ``LN2``, cast, ``x + mlp``, ``+ frequency``, the next block's ``LN1``, cast: seven small kernels
(op_count). Here ``add_norm`` does ``s = x + a (+ b)``, writes ``s`` (fp32) and ``LN(s)`` in the compute dtype, in
one pass over the row: two kernels a block. The adds are the same IEEE fp32 additions in the same order (``s`` is
bitwise torch's); the norm's mean and variance are summed in another order (within fp32 rounding before the
cast: tests/test_fused_add_norm.py runs the kernel in Triton's interpreter and compiles it for sm_90).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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

__all__ = ["add_norm", "add_norm_post", "available", "compile_for"]


if triton is not None:

    @triton.jit
    def _add_norm_kernel(
        x_ptr, a_ptr, b_ptr, w_ptr, bias_ptr, sum_ptr, y_ptr, rows_ptr, post_ptr, z_ptr, C, eps, per_image,
        a_per_image, post_rows,
        HAS_A: tl.constexpr, HAS_B: tl.constexpr, WRITE_SUM: tl.constexpr, A_ROWS: tl.constexpr, POST: tl.constexpr,
        BLOCK: tl.constexpr,
    ):  # pragma: no cover - compiled by triton (or run by its interpreter in the tests' subprocess)
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        ok = cols < C
        off = row * C + cols
        s = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
        if HAS_A:
            if A_ROWS:  # a's row for this one: its image's rows, then the row table's entry
                a_row = (row // per_image) * a_per_image + tl.load(rows_ptr + row % per_image)
                s = s + tl.load(a_ptr + a_row * C + cols, mask=ok, other=0.0).to(tl.float32)
            else:
                s = s + tl.load(a_ptr + off, mask=ok, other=0.0).to(tl.float32)
        if HAS_B:
            s = s + tl.load(b_ptr + off, mask=ok, other=0.0).to(tl.float32)
        if WRITE_SUM:
            tl.store(sum_ptr + off, s, mask=ok)
        mean = tl.sum(s, axis=0) / C
        d = tl.where(ok, s - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        y = (d * rstd * w + bias).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + off, y, mask=ok)
        if POST:  # z = y + post, post's rows repeating every post_rows (a batch-1 positional map broadcast)
            p = tl.load(post_ptr + (row % post_rows) * C + cols, mask=ok, other=0.0).to(tl.float32)
            tl.store(z_ptr + off, (y.to(tl.float32) + p).to(z_ptr.dtype.element_ty), mask=ok)


def _num_warps(c: int) -> int:
    return 4 if c <= 1024 else 8


def add_norm(x: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, norm: nn.LayerNorm,
             out_dtype: torch.dtype, write_sum: bool = True, a_rows: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """s = x + a + b (fp32, left to right; a and b optional, any float dtype, x's shape) and LN(s) over the last
    dimension in ``out_dtype``: (s, y), s None when not ``write_sum``. ``a_rows`` (optional, int64 (R,)): a is
    (B, A, C) rows, and x's (B, R, C) rows take a's rows ``a_rows`` (a windowed attention's output, gathered
    back to grid order in the add rather than by a kernel of its own)."""
    s, y, _ = _launch(x, a, b, norm, out_dtype, write_sum, a_rows, None)
    return s, y


def add_norm_post(x: torch.Tensor, a: torch.Tensor | None, norm: nn.LayerNorm, post: torch.Tensor,
                  out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """y = LN(x + a) (a optional) in ``out_dtype`` and z = y + post (the box part's "norm, then add the positional
    embedding" for the next attention's queries or keys): (y, z). ``post``: x's shape, or one image's rows
    (1, R, C) for every image of x (B, R, C)."""
    c = x.shape[-1]
    if post.shape[-1] != c or x.numel() % post.numel() or (post.dim() == x.dim() and post.shape[1:] != x.shape[1:]):
        raise ValueError(f"add_norm_post: post {tuple(post.shape)} does not repeat over x {tuple(x.shape)}")
    _, y, z = _launch(x, a, None, norm, out_dtype, False, None, post)
    assert z is not None
    return y, z


def _launch(x: torch.Tensor, a: torch.Tensor | None, b: torch.Tensor | None, norm: nn.LayerNorm,
            out_dtype: torch.dtype, write_sum: bool, a_rows: torch.Tensor | None, post: torch.Tensor | None,
            ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    c = x.shape[-1]
    if norm.weight is None or norm.bias is None or tuple(norm.normalized_shape) != (c,):
        raise ValueError(f"add_norm: a LayerNorm over the last dimension ({c}) with weight and bias")
    x = x.contiguous()
    a = a.contiguous() if a is not None else None
    b = b.contiguous() if b is not None else None
    post = post.contiguous() if post is not None else None
    per_image = a_per_image = 1
    if a_rows is not None:
        if a is None or a.dim() != 3 or a.shape[0] != x.shape[0] or x.numel() != x.shape[0] * a_rows.numel() * c:
            raise ValueError(f"add_norm: a_rows: a (B, A, {c}) and {a_rows.numel()} rows an image of x")
        per_image, a_per_image = a_rows.numel(), a.shape[1]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    s = torch.empty(x.shape, dtype=torch.float32, device=x.device) if write_sum else None
    z = torch.empty(x.shape, dtype=out_dtype, device=x.device) if post is not None else None
    launch: dict[str, Any] = dict(HAS_A=a is not None, HAS_B=b is not None, WRITE_SUM=write_sum,
                                  A_ROWS=a_rows is not None, POST=post is not None, BLOCK=pow2(c),
                                  num_warps=_num_warps(c))
    args = (x, a if a is not None else x, b if b is not None else x, norm.weight, norm.bias,
            s if s is not None else y, y, a_rows if a_rows is not None else x, post if post is not None else x,
            z if z is not None else y, c, float(norm.eps), per_image, a_per_image,
            post.numel() // c if post is not None else 1)
    with on_device(x):
        _add_norm_kernel[(x.numel() // c,)](*args, **launch)
    return s, y, z


def compile_for(c: int, out_dtype: torch.dtype, capability: int = 90) -> dict[str, Any]:
    """Compile the kernel ahead of time for an NVIDIA target (90: Hopper), with no GPU needed, for rows of ``c``:
    every variant the encoder launches (fp32 x, a bf16 / fp16 a, an fp32 b) and the fp32 box part's three. Returns
    each variant's shared memory, registers a thread and spilled bytes. The interpreter runs a kernel that may
    still fail to compile."""
    out: dict[str, Any] = {}
    variants = [(out_dtype, has_a, has_b, write, rows, False) for has_a, has_b, write, rows in (
        (False, False, False, False), (True, False, True, False), (True, True, True, False), (True, False, True, True))]
    variants += [(torch.float32, has_a, False, False, False, post) for has_a, post in (
        (True, False), (True, True), (False, True))]
    for dtype, has_a, has_b, write, rows, post in variants:
        t = TRITON_DTYPE[dtype]
        sig = {"x_ptr": "*fp32", "a_ptr": f"*{t}", "b_ptr": "*fp32", "w_ptr": "*fp32", "bias_ptr": "*fp32",
               "sum_ptr": "*fp32", "y_ptr": f"*{t}", "rows_ptr": "*i64", "post_ptr": "*fp32", "z_ptr": f"*{t}",
               "C": "i32", "eps": "fp32", "per_image": "i32", "a_per_image": "i32", "post_rows": "i32"}
        const = {"HAS_A": has_a, "HAS_B": has_b, "WRITE_SUM": write, "A_ROWS": rows, "POST": post,
                 "BLOCK": pow2(c)}
        k = compile_ahead(_add_norm_kernel, sig, const, capability, {"num_warps": _num_warps(c)})
        name = f"a={int(has_a)} b={int(has_b)} sum={int(write)} rows={int(rows)}" + (" post" if post else "")
        out[name + ("" if dtype == out_dtype else f" {TRITON_DTYPE[dtype]}")] = {
            "shared_bytes": int(k.metadata.shared), **ptxas_usage(k, capability)}
    return out
