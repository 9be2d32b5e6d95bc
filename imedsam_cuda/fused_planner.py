"""The device sparse planner's per-level bookkeeping as five Triton kernels (``DevicePlanner(fused=True)``; torch-cuda's
``fused_planner``, off by default until a GPU has timed it).

After each level's decoder call, ``DevicePlanner.plan`` records its points (the UGS-merged logit, the
ambiguity, known), decides which cells to refine and fills the others: the merge, the heads' disagreement, the
writes, the corner decisions, their disagreement, the ambiguous corners, the candidates, the dilation (a
convolution with the L1 ball), the region's valid cells, the next level's candidates, and the fill (a bilinear
upsampling, the clamp to the decision's sign, the writes), and before it the points to decode: about 50 small
kernels a level, ~215 of a 384² plan's 429 on torch-cuda's default decoder (``benchmarks/op_count.py``). Here:

- ``level_need``: one program per block of lattice points: the corners of the level's candidate cells that are
  not yet known and inside the region (the points its decoder call may take), as fp32 1 / 0 (what ``topk``
  ranks, and the scatter's flag), and their count added to the plan's needs (eight kernels before);
- ``level_coords``: one program per block of the points ``topk`` picked: their grid indices and coordinates
  (three to five kernels before);
- ``level_scatter``: one program per block of decoded points: the UGS merge against the estimated threshold,
  the heads' sign disagreement and the logit band, and the three writes (about 10 kernels before; the logits
  read in the decoder's own dtype, so no widening copies);
- ``level_cells``: one program per block of cells; each cell's activity is recomputed for every cell of its
  dilation ball (the ball is small: 5 cells at ``dilate=1``), so the dilation needs no second pass. Writes the
  dilated, valid active cells and, above stride 1, the next level's candidates (each active cell's 2 x 2
  children).
- ``level_fill``: one program per block of grid pixels; a settled cell's pixels (not its lattice points) take
  the bilinear interpolation of the lattice logits, in ``F.interpolate(align_corners=True)``'s arithmetic
  (positions and weights exact: the scale is 1/s), clamped to their cell's decision's sign.

Each is a pure function of the same inputs as the torch ops it replaces: the same logits recorded, the same cells
and the same filled pixels; the filled logits within fp32 rounding of ``F.interpolate``'s (tests/test_device_planner.py runs them in
Triton's interpreter against the torch path and the host planner).
"""

from __future__ import annotations

import torch

from imedsam_cuda.triton_support import available, compile_ahead, on_device, ptxas_usage, tl, triton

__all__ = ["available", "level_cells", "level_coords", "level_fill", "level_need", "level_scatter"]

BLOCK = 128  # cells or pixels a program

if triton is not None:

    @triton.jit
    def _pre_active(val_ptr, amb_ptr, cand_ptr, i, j, ok, NR, NC, GW, NK, S: tl.constexpr, K: tl.constexpr):
        """Cell (i, j) is a candidate whose corners disagree in some class's decision or are ambiguous (False
        outside the NR x NC cells)."""
        ok = ok & (i >= 0) & (i < NR) & (j >= 0) & (j < NC)
        p00 = (i * S) * GW + j * S
        p01 = p00 + S
        p10 = p00 + S * GW
        p11 = p10 + S
        amb = (tl.load(amb_ptr + p00, mask=ok, other=0) | tl.load(amb_ptr + p01, mask=ok, other=0)
               | tl.load(amb_ptr + p10, mask=ok, other=0) | tl.load(amb_ptr + p11, mask=ok, other=0)) != 0
        dis = i != i  # False, in the cells' shape
        for k in tl.static_range(K):
            d00 = tl.load(val_ptr + k * NK + p00, mask=ok, other=0.0) > 0
            d01 = tl.load(val_ptr + k * NK + p01, mask=ok, other=0.0) > 0
            d10 = tl.load(val_ptr + k * NK + p10, mask=ok, other=0.0) > 0
            d11 = tl.load(val_ptr + k * NK + p11, mask=ok, other=0.0) > 0
            dis = dis | (d00 != d10) | (d00 != d01) | (d00 != d11)
        cand = tl.load(cand_ptr + i * NC + j, mask=ok, other=0) != 0
        return ok & cand & (dis | amb)

    @triton.jit
    def _cells_kernel(
        val_ptr, amb_ptr, cand_ptr, last_ptr, active_ptr, next_ptr, NR, NC, GW, NK,
        S: tl.constexpr, K: tl.constexpr, DILATE: tl.constexpr, NEXT: tl.constexpr, BLOCK: tl.constexpr,
    ):  # pragma: no cover - compiled by triton (or run by its interpreter in the tests' subprocess)
        c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = c < NR * NC
        i = c // NC
        j = c % NC
        act = _pre_active(val_ptr, amb_ptr, cand_ptr, i, j, ok, NR, NC, GW, NK, S, K)
        # the L1 ball of radius DILATE (what the diamond convolution sums), sphere by sphere: the 4r cells at
        # distance r are (r - t, t) for t < r and its quarter turns
        for r in tl.static_range(1, DILATE + 1):
            for t in tl.static_range(r):
                act = act | _pre_active(val_ptr, amb_ptr, cand_ptr, i + (r - t), j + t, ok, NR, NC, GW, NK, S, K)
                act = act | _pre_active(val_ptr, amb_ptr, cand_ptr, i - t, j + (r - t), ok, NR, NC, GW, NK, S, K)
                act = act | _pre_active(val_ptr, amb_ptr, cand_ptr, i - (r - t), j - t, ok, NR, NC, GW, NK, S, K)
                act = act | _pre_active(val_ptr, amb_ptr, cand_ptr, i + t, j - (r - t), ok, NR, NC, GW, NK, S, K)
        last_r = tl.load(last_ptr)
        last_c = tl.load(last_ptr + 1)
        act = act & ((i + 1) * S <= last_r) & ((j + 1) * S <= last_c)  # the cell's far corner is in the region
        tl.store(active_ptr + c, act, mask=ok)
        if NEXT:  # the next level's candidates: each cell's 2 x 2 children
            base = (2 * i) * (2 * NC) + 2 * j
            tl.store(next_ptr + base, act, mask=ok)
            tl.store(next_ptr + base + 1, act, mask=ok)
            tl.store(next_ptr + base + 2 * NC, act, mask=ok)
            tl.store(next_ptr + base + 2 * NC + 1, act, mask=ok)

    @triton.jit
    def _fill_kernel(
        val_ptr, cand_ptr, active_ptr, last_ptr, NC, GH, GW, NK, NLH, NLW,
        S: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
    ):  # pragma: no cover - compiled by triton (or run by its interpreter in the tests' subprocess)
        p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = p < GH * GW
        gi = p // GW
        gj = p % GW
        last_r = tl.load(last_ptr)
        last_c = tl.load(last_ptr + 1)
        inside = (gi <= last_r) & (gj <= last_c)
        fillable = ((gi % S) != 0) | ((gj % S) != 0)  # lattice points keep their evaluated logits
        cr = tl.minimum(gi // S, last_r // S - 1)  # the region's far edges belong to its last cells
        cc = tl.minimum(gj // S, last_c // S - 1)
        go = ok & inside & fillable
        cell = cr * NC + cc
        settled = (tl.load(cand_ptr + cell, mask=go, other=0) != 0) & (tl.load(active_ptr + cell, mask=go, other=1) == 0)
        own = go & settled
        # F.interpolate(bilinear, align_corners=True) from the (NLH, NLW) lattice to the grid: source gi / S (exact)
        h1 = gi // S
        w1 = gj // S
        h1l = (gi - h1 * S).to(tl.float32) * (1.0 / S)
        w1l = (gj - w1 * S).to(tl.float32) * (1.0 / S)
        h0l = 1.0 - h1l
        w0l = 1.0 - w1l
        h1p = tl.where(h1 < NLH - 1, S * GW, 0)
        w1p = tl.where(w1 < NLW - 1, S, 0)
        q00 = (h1 * S) * GW + w1 * S
        dq = (cr * S) * GW + cc * S  # the cell's top-left lattice point: its decision
        for k in tl.static_range(K):
            vk = val_ptr + k * NK
            v00 = tl.load(vk + q00, mask=own, other=0.0)
            v01 = tl.load(vk + q00 + w1p, mask=own, other=0.0)
            v10 = tl.load(vk + q00 + h1p, mask=own, other=0.0)
            v11 = tl.load(vk + q00 + h1p + w1p, mask=own, other=0.0)
            v = h0l * (w0l * v00 + w1l * v01) + h1l * (w0l * v10 + w1l * v11)
            d = tl.load(vk + dq, mask=own, other=0.0) > 0
            v = tl.where(d, tl.maximum(v, 1e-6), tl.minimum(v, 0.0))
            tl.store(vk + p, v, mask=own)


if triton is not None:

    @triton.jit
    def _scatter_kernel(
        coarse_ptr, sck, scn, fine_ptr, sfk, sfn, unc_ptr, suk, sun, tau_ptr, stk, flag_ptr, lin_ptr, val_ptr, amb_ptr,
        known_ptr, N, NK, band,
        K: tl.constexpr, HEADS: tl.constexpr, BAND: tl.constexpr, BLOCK: tl.constexpr,
    ):  # pragma: no cover - compiled by triton (or run by its interpreter in the tests' subprocess)
        q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = q < N
        flag = tl.load(flag_ptr + q, mask=ok, other=0.0) > 0  # a need (1 / 0), or topk's value of one
        dest = tl.where(flag, tl.load(lin_ptr + q, mask=ok, other=0), NK - 1)  # the spare slot: not to be written
        a = q < 0  # False
        for k in tl.static_range(K):  # the logits in the decoder's dtype: widened exactly
            c = tl.load(coarse_ptr + k * sck + q * scn, mask=ok, other=0.0).to(tl.float32)
            f = tl.load(fine_ptr + k * sfk + q * sfn, mask=ok, other=0.0).to(tl.float32)
            u = tl.load(unc_ptr + k * suk + q * sun, mask=ok, other=0.0).to(tl.float32)
            tl.store(val_ptr + k * NK + dest, tl.where(u >= tl.load(tau_ptr + k * stk).to(tl.float32), f, c), mask=ok)
            if HEADS:  # the heads disagree in sign: the decision hinges on tau
                a = a | ((c > 0) != (f > 0))
            if BAND:  # a logit near 0
                a = a | (tl.minimum(tl.abs(c), tl.abs(f)) < band)
        if HEADS or BAND:
            tl.store(amb_ptr + dest, a, mask=ok)
        tl.store(known_ptr + dest, flag, mask=ok)


def level_scatter(coarse: torch.Tensor, fine: torch.Tensor, unc: torch.Tensor, tau: torch.Tensor, flag: torch.Tensor,
                  lin: torch.Tensor, val: torch.Tensor, amb: torch.Tensor, known: torch.Tensor, heads: bool,
                  band: float) -> None:
    """Record a level's decoded points (coarse, fine, unc: (K, N), any float dtype and strides) in place: at the
    grid index ``lin`` of each point whose ``flag`` (fp32) is positive (the others write the spare slot, the last of
    val's (K, n + 1), amb's and known's), the UGS-merged logit (fine where unc >= tau, per class), the ambiguity (the heads'
    signs differ, with ``heads``; a |logit| under ``band`` > 0) and known."""
    K, N = coarse.shape
    if N == 0:
        return
    with on_device(val):  # the decoder's outputs are transposed views: strides passed as they are
        _scatter_kernel[(triton.cdiv(N, BLOCK),)](
            coarse, *coarse.stride(), fine, *fine.stride(), unc, *unc.stride(), tau, tau.stride(0), flag, lin, val, amb,
            known, N, val.shape[1], float(band), K=K, HEADS=heads, BAND=band > 0, BLOCK=BLOCK)


if triton is not None:

    @triton.jit
    def _need_kernel(
        cells_ptr, known_ptr, last_ptr, need_ptr, count_ptr, NR, NC, GW, S: tl.constexpr, BLOCK: tl.constexpr,
    ):  # pragma: no cover - compiled by triton (or run by its interpreter in the tests' subprocess)
        q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = q < (NR + 1) * (NC + 1)
        i = q // (NC + 1)
        j = q % (NC + 1)
        sel = q < 0  # False: does any of the (up to) four cells around lattice point (i, j) ask for it?
        for di in tl.static_range(2):
            for dj in tl.static_range(2):
                ci = i - di
                cj = j - dj
                m = ok & (ci >= 0) & (ci < NR) & (cj >= 0) & (cj < NC)
                sel = sel | (tl.load(cells_ptr + ci * NC + cj, mask=m, other=0) != 0)
        g = (i * S) * GW + j * S
        known = tl.load(known_ptr + g, mask=ok, other=1) != 0
        inside = (i * S <= tl.load(last_ptr)) & (j * S <= tl.load(last_ptr + 1))
        need = ok & sel & ~known & inside
        tl.store(need_ptr + q, need.to(tl.float32), mask=ok)  # fp32: what topk ranks, and the scatter's flag
        tl.atomic_add(count_ptr, tl.sum(need.to(tl.int64), axis=0))


def level_need(cells: torch.Tensor, known: torch.Tensor, last: torch.Tensor, s: int, grid_w: int,
               count: torch.Tensor) -> torch.Tensor:
    """The stride-s lattice points ((NR + 1) x (NC + 1), flattened) to decode: corners of the (NR, NC) ``cells``,
    not yet ``known`` (flat over the grid), inside the region (``last``: its last grid row and column), as fp32
    1 / 0; their number is added to ``count`` (an int64 element, zeroed by the caller)."""
    nr, nc = cells.shape
    need = torch.empty((nr + 1) * (nc + 1), dtype=torch.float32, device=cells.device)
    with on_device(cells):
        _need_kernel[(triton.cdiv(need.numel(), BLOCK),)](cells, known, last, need, count, nr, nc, grid_w, S=s,
                                                           BLOCK=BLOCK)
    return need


if triton is not None:

    @triton.jit
    def _coords_kernel(
        idx_ptr, table_ptr, lin_ptr, coords_ptr, N, GW, NLW, S: tl.constexpr, BLOCK: tl.constexpr,
    ):  # pragma: no cover - compiled by triton (or run by its interpreter in the tests' subprocess)
        q = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = q < N
        k = tl.load(idx_ptr + q, mask=ok, other=0)
        li = (k // NLW) * S  # the lattice point's grid row and column
        lj = (k % NLW) * S
        tl.store(lin_ptr + q, li * GW + lj, mask=ok)
        tl.store(coords_ptr + 2 * q, tl.load(table_ptr + lj, mask=ok, other=0.0), mask=ok)
        tl.store(coords_ptr + 2 * q + 1, tl.load(table_ptr + GW + li, mask=ok, other=0.0), mask=ok)


def level_coords(idx: torch.Tensor, table: torch.Tensor, s: int, grid_w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points ``idx`` of the stride-s lattice (flat lattice indices, int64) -> their flat grid indices (int64) and
    their (x, y) coordinates (N, 2) fp32, read from the plan's table [x of grid columns..., y of grid rows...]."""
    n = idx.numel()
    lin = torch.empty(n, dtype=torch.int64, device=idx.device)
    coords = torch.empty(n, 2, dtype=table.dtype, device=idx.device)
    with on_device(idx):
        _coords_kernel[(triton.cdiv(n, BLOCK),)](idx, table, lin, coords, n, grid_w, (grid_w - 1) // s + 1, S=s,
                                                  BLOCK=BLOCK)
    return lin, coords


def level_cells(val: torch.Tensor, amb: torch.Tensor, cand: torch.Tensor, last: torch.Tensor, s: int, grid_w: int,
                dilate: int, with_next: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """val (K, n + 1) fp32 logits and amb (n + 1,) bool over the flattened grid (grid_w wide), cand (NR, NC) bool
    cells of stride s, last (2,) int64: the region's last grid row and column. Returns the dilated, valid active
    cells (NR, NC) bool and, with ``with_next``, the next level's candidates (2 NR, 2 NC) bool."""
    nr, nc = cand.shape
    active = torch.empty(nr, nc, dtype=torch.bool, device=val.device)
    nxt = torch.empty(2 * nr, 2 * nc, dtype=torch.bool, device=val.device) if with_next else None
    with on_device(val):
        _cells_kernel[(triton.cdiv(nr * nc, BLOCK),)](
            val, amb, cand, last, active, nxt if nxt is not None else active, nr, nc, grid_w, val.shape[1],
            S=s, K=val.shape[0], DILATE=dilate, NEXT=with_next, BLOCK=BLOCK)
    return active, nxt


def level_fill(val: torch.Tensor, cand: torch.Tensor, active: torch.Tensor, last: torch.Tensor, s: int,
               grid_hw: tuple[int, int]) -> None:
    """Fill, in place in val (K, n + 1), the settled stride-s cells' pixels (cand and not active)."""
    gh, gw = grid_hw
    nlh, nlw = (gh - 1) // s + 1, (gw - 1) // s + 1
    with on_device(val):
        _fill_kernel[(triton.cdiv(gh * gw, BLOCK),)](
            val, cand, active, last, cand.shape[1], gh, gw, val.shape[1], nlh, nlw, S=s, K=val.shape[0], BLOCK=BLOCK)


def compile_for(s: int, classes: int, dilate: int, capability: int = 90) -> dict[str, dict[str, int]]:
    """Compile the kernels ahead of time for an NVIDIA target (90: Hopper), with no GPU, for stride ``s`` (the
    fill only above 1): each one's registers a thread and spilled bytes (ptxas)."""
    ints = dict.fromkeys(("NR", "NC", "GW", "NK"), "i32")
    sig = {"val_ptr": "*fp32", "amb_ptr": "*i1", "cand_ptr": "*i1", "last_ptr": "*i64", "active_ptr": "*i1",
           "next_ptr": "*i1", **ints}
    const = {"S": s, "K": classes, "DILATE": dilate, "NEXT": s > 1, "BLOCK": BLOCK}
    out = {"cells": ptxas_usage(compile_ahead(_cells_kernel, sig, const, capability, {"num_warps": 4}), capability)}
    sig = {"cells_ptr": "*i1", "known_ptr": "*i1", "last_ptr": "*i64", "need_ptr": "*fp32", "count_ptr": "*i64",
           "NR": "i32", "NC": "i32", "GW": "i32"}
    k = compile_ahead(_need_kernel, sig, {"S": s, "BLOCK": BLOCK}, capability, {"num_warps": 4})
    out["need"] = ptxas_usage(k, capability)
    sig = {"idx_ptr": "*i64", "table_ptr": "*fp32", "lin_ptr": "*i64", "coords_ptr": "*fp32", "N": "i32", "GW": "i32",
           "NLW": "i32"}
    k = compile_ahead(_coords_kernel, sig, {"S": s, "BLOCK": BLOCK}, capability, {"num_warps": 4})
    out["coords"] = ptxas_usage(k, capability)
    sig = {"coarse_ptr": "*bf16", "sck": "i32", "scn": "i32", "fine_ptr": "*bf16", "sfk": "i32", "sfn": "i32",
           "unc_ptr": "*fp32", "suk": "i32", "sun": "i32", "tau_ptr": "*fp32", "stk": "i32", "flag_ptr": "*fp32",
           "lin_ptr": "*i64", "val_ptr": "*fp32", "amb_ptr": "*i1", "known_ptr": "*i1", "N": "i32", "NK": "i32",
           "band": "fp32"}
    k = compile_ahead(_scatter_kernel, sig, {"K": classes, "HEADS": True, "BAND": True, "BLOCK": BLOCK}, capability,
                      {"num_warps": 4})
    out["scatter"] = ptxas_usage(k, capability)
    if s > 1:
        sig = {"val_ptr": "*fp32", "cand_ptr": "*i1", "active_ptr": "*i1", "last_ptr": "*i64",
               **dict.fromkeys(("NC", "GH", "GW", "NK", "NLH", "NLW"), "i32")}
        k = compile_ahead(_fill_kernel, sig, {"S": s, "K": classes, "BLOCK": BLOCK}, capability, {"num_warps": 4})
        out["fill"] = ptxas_usage(k, capability)
    return out
