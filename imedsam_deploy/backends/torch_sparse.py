"""The sparse planner of ``imedsam_deploy.sparse`` on the device, in static shapes (torch; torch-cuda only).

On a GPU the numpy planner's host work (milliseconds per box, ``benchmarks/planner_time.py``) and one host
round trip per level cost more than the decoder calls themselves. ``DevicePlanner`` runs the same algorithm
with torch tensors and fixed shapes, so a whole box (every level, every decoder call, every fill) can be
captured in one CUDA graph and replayed:

- the region's extended grid lives in a fixed ``(GH, GW)`` array (the largest any region of this output
  size can need); the region's origin and size are tensors, and cells or points past it are masked;
- the first level evaluates every point of its lattice (a fixed count); each later level evaluates at most
  ``caps[level]`` points, chosen with ``topk`` over the points it needs (no data-dependent shapes). When a
  level needs more, ``overflow`` is set and the caller must use the host planner instead (results are then
  never silently different), and may ``grow`` the budgets for the next boxes;
- every level runs, even with nothing left to refine (it is then a no-op), as the host planner's loop would
  have stopped with the same result.
It makes the same decisions as the host planner: same lattices, same threshold estimate, same refinement and
fill rules, checked for identical masks in the tests. Filled logits are computed in float32 (the host's
lerp weights are float64): within 1e-6 relative, and ``logits > 0`` equals the mask either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from imedsam_deploy.contract import refine_count
from imedsam_deploy.sparse import SparseConfig, extended_size, initial_stride

# coords (N, 2) float32 -> coarse, fine, uncertainty, each (K, N)
TorchDecodeFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
CAP_PER_SIDE = 24  # a level of stride s evaluates at most ~CAP_PER_SIDE * max(H, W) / s points
CAP_UNIT = 1024  # ... rounded up to a multiple of this (and at least this)


def _pixel_coords(rows: torch.Tensor, cols: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``sparse.pixel_coords`` in torch: computed in float64, then float32, as there."""
    x = (2.0 * cols.double() + 1.0) / width - 1.0
    y = (2.0 * rows.double() + 1.0) / height - 1.0
    return torch.stack([x, y], dim=-1).float()


def _corner_any(cells: torch.Tensor) -> torch.Tensor:
    """(ny, nx) cell flags -> (ny+1, nx+1) flags of their corners."""
    p = F.pad(cells[None, None].float(), (1, 1, 1, 1))
    return F.max_pool2d(p, 2, stride=1)[0, 0] > 0


def _dilate(a: torch.Tensor, n: int, cross: torch.Tensor) -> torch.Tensor:
    """4-neighbour dilation, ``n`` times (``sparse._dilate``): a convolution with a 3 x 3 cross (made outside
    the captured function: a host tensor copied to the device during capture would break it)."""
    for _ in range(n):
        a = F.conv2d(a[None, None].float(), cross, padding=1)[0, 0] > 0
    return a


class DevicePlanner:
    """One output size and planner config; ``plan(decode, region)`` is capturable in a CUDA graph."""

    def __init__(self, out_hw: tuple[int, int], fraction: float, cfg: SparseConfig, device: torch.device | str,
                 cap_per_side: int | None = None) -> None:
        H, W = out_hw
        self.H, self.W, self.cfg, self.device = H, W, cfg, torch.device(device)
        self.stride = initial_stride(cfg.stride, H, W)  # regions it handles start at this stride (``usable``)
        s0 = self.stride
        # the largest extended grid of a region of this output (h <= H)
        self.GH, self.GW = extended_size(H, s0), extended_size(W, s0)
        ts = max(1, cfg.threshold_stride)
        tr = torch.arange(ts // 2, H, ts, device=self.device)
        tc = torch.arange(ts // 2, W, ts, device=self.device)
        gr, gc = torch.meshgrid(tr, tc, indexing="ij")
        self.cross = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], device=self.device)[None, None]
        self.t_coords = _pixel_coords(gr.reshape(-1), gc.reshape(-1), H, W)
        self.n_t = self.t_coords.shape[0]
        self.kt = refine_count(self.n_t, fraction)
        levels, s = [], s0
        while s >= 1:
            levels.append(s)
            s //= 2
        self.levels = levels
        side, per_side, unit = max(H, W), cap_per_side or CAP_PER_SIDE, CAP_UNIT
        self.caps = {s: min(self.lattice_points(s), max(unit, -(-per_side * side // s // unit) * unit))
                     for s in levels}

    def lattice_points(self, s: int) -> int:
        """Points of the grid's stride-``s`` lattice: the most a level can need."""
        return ((self.GH - 1) // s + 1) * ((self.GW - 1) // s + 1)

    def grow(self) -> None:
        """Double every later level's point budget (up to its whole lattice): after an overflow, so a video
        whose boxes need more points settles on a budget that fits them."""
        self.caps = {s: min(self.lattice_points(s), 2 * c) for s, c in self.caps.items()}

    def usable(self, h: int, w: int) -> bool:
        """Whether the host planner would use this planner's initial stride on an h x w region (it uses a
        smaller one on regions narrower than the stride, and a plain evaluation on 1-pixel-wide ones)."""
        if h <= 1 or w <= 1 or self.stride == 1 or h > self.H or w > self.W:
            return False
        return initial_stride(self.cfg.stride, h, w) == self.stride

    def plan(self, decode: TorchDecodeFn, region: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """region: int64 (4,) = (r0, h, c0, w) of a region ``usable`` says this planner handles.

        Returns val (K, GH, GW) float32 (logits; the region is [:h, :w]), dec (K, GH, GW) bool, queried (),
        overflow () bool: True when a level needed more points than its cap (discard the result then).
        """
        cfg, s0, GH, GW, dev = self.cfg, self.stride, self.GH, self.GW, self.device
        r0, h, c0, w = region[0], region[1], region[2], region[3]
        he = torch.div(h - 1 + s0 - 1, s0, rounding_mode="floor") * s0 + 1  # the region's extended grid
        we = torch.div(w - 1 + s0 - 1, s0, rounding_mode="floor") * s0 + 1
        known = torch.zeros(GH, GW, dtype=torch.bool, device=dev)
        amb = torch.zeros(GH, GW, dtype=torch.bool, device=dev)
        queried = torch.zeros((), dtype=torch.int64, device=dev)
        overflow = torch.zeros((), dtype=torch.bool, device=dev)
        state: dict[str, Any] = {}

        def evaluate(sel: torch.Tensor, s: int, cap: int | None) -> None:
            """Decode the unknown points of ``sel`` (a selection on the stride-s lattice of the grid)."""
            nonlocal queried, overflow
            nlr, nlc = sel.shape
            li = torch.arange(nlr, device=dev)[:, None] * s
            lj = torch.arange(nlc, device=dev)[None, :] * s
            need = (sel & ~known[::s, ::s] & (li < he) & (lj < we)).reshape(-1)
            if cap is None or cap >= need.numel():
                idx, flag = torch.arange(need.numel(), device=dev), need
            else:
                top = torch.topk(need.float(), cap, sorted=False)  # float: topk has kernels for it everywhere
                idx, flag = top.indices, top.values > 0
                overflow = overflow | (need.sum() > cap)
            ys, xs = torch.div(idx, nlc, rounding_mode="floor") * s, (idx % nlc) * s
            coords = _pixel_coords(r0 + torch.minimum(ys, h - 1), c0 + torch.minimum(xs, w - 1), self.H, self.W)
            first = "tau" not in state
            if first:
                coords = torch.cat([self.t_coords, coords])
            coarse, fine, unc = (o.float() for o in decode(coords))
            if first:
                state["tau"] = torch.topk(unc[:, : self.n_t], self.kt, dim=1).values[:, -1]
                k = unc.shape[0]
                state["dec"] = torch.zeros(k, GH, GW, dtype=torch.bool, device=dev)
                state["val"] = torch.zeros(k, GH, GW, dtype=torch.float32, device=dev)
                queried = queried + self.n_t
                coarse, fine, unc = coarse[:, self.n_t :], fine[:, self.n_t :], unc[:, self.n_t :]
            tau, dec, val = state["tau"], state["dec"], state["val"]
            queried = queried + flag.sum()
            lin = ys * GW + xs
            v = torch.where(unc >= tau[:, None], fine, coarse)
            a = torch.zeros_like(flag)
            if cfg.refine_on_head_disagreement:
                a = a | ((coarse > 0) != (fine > 0)).any(dim=0)
            if cfg.logit_band > 0:
                a = a | (torch.minimum(coarse.abs(), fine.abs()) < cfg.logit_band).any(dim=0)
            # write only the flagged points (the unflagged ones of a topk may be anywhere)
            dflat, vflat = dec.view(dec.shape[0], -1), val.view(val.shape[0], -1)
            dflat[:, lin] = torch.where(flag, v > 0, dflat[:, lin])
            vflat[:, lin] = torch.where(flag, v, vflat[:, lin])
            aflat, kflat = amb.view(-1), known.view(-1)
            aflat[lin] = torch.where(flag, a, aflat[lin])
            kflat[lin] = kflat[lin] | flag

        def cells_valid(s: int) -> torch.Tensor:
            ncr, ncc = (GH - 1) // s, (GW - 1) // s
            ai = torch.arange(ncr, device=dev)[:, None]
            bj = torch.arange(ncc, device=dev)[None, :]
            return (ai < torch.div(he - 1, s, rounding_mode="floor")) & (bj < torch.div(we - 1, s, rounding_mode="floor"))

        cand = cells_valid(s0)
        for li_, s in enumerate(self.levels):
            evaluate(_corner_any(cand), s, None if li_ == 0 else self.caps[s])
            dec, val = state["dec"], state["val"]
            d = dec[:, ::s, ::s]
            am = amb[::s, ::s]
            disagree = ((d[:, :-1, :-1] != d[:, 1:, :-1]) | (d[:, :-1, :-1] != d[:, :-1, 1:])
                        | (d[:, :-1, :-1] != d[:, 1:, 1:])).any(dim=0)
            ambiguous = am[:-1, :-1] | am[1:, :-1] | am[:-1, 1:] | am[1:, 1:]
            valid = cells_valid(s)
            active = _dilate(cand & (disagree | ambiguous), cfg.dilate, self.cross) & valid
            settled = cand & ~active
            if s > 1:
                self._fill(dec, val, settled, s, he, we)
                r, c = active.shape  # each cell becomes its 2 x 2 children (expand: no host sync in capture)
                cand = active[:, None, :, None].expand(r, 2, c, 2).reshape(2 * r, 2 * c)
            else:  # cells switched on by the dilation at the last level: their corners are their pixels
                evaluate(_corner_any(active), 1, self.caps[1])
        return state["val"], state["dec"], queried, overflow

    def _fill(self, dec: torch.Tensor, val: torch.Tensor, settled: torch.Tensor, s: int,
              he: torch.Tensor, we: torch.Tensor) -> None:
        """``sparse._fill_settled`` as dense masked ops over the grid: pixel (i, j) belongs to cell
        (min(i // s, nr - 1), min(j // s, nc - 1)); lattice points (evaluated corners) are left alone."""
        GH, GW, dev = self.GH, self.GW, self.device
        nr = torch.div(he - 1, s, rounding_mode="floor")
        nc = torch.div(we - 1, s, rounding_mode="floor")
        i = torch.arange(GH, device=dev)
        j = torch.arange(GW, device=dev)
        ci = torch.minimum(torch.div(i, s, rounding_mode="floor"), nr - 1).clamp(min=0)
        cj = torch.minimum(torch.div(j, s, rounding_mode="floor"), nc - 1).clamp(min=0)
        ty = ((i - ci * s).float() / s)[:, None]
        tx = ((j - cj * s).float() / s)[None, :]
        lat_v, lat_d = val[:, ::s, ::s], dec[:, ::s, ::s]
        lattice = ((i % s) == 0)[:, None] & ((j % s) == 0)[None, :]  # evaluated corners keep their values
        own = settled[ci][:, cj] & (i < he)[:, None] & (j < we)[None, :] & ~lattice
        v00 = lat_v[:, ci][:, :, cj]
        v01 = lat_v[:, ci][:, :, cj + 1]
        v10 = lat_v[:, ci + 1][:, :, cj]
        v11 = lat_v[:, ci + 1][:, :, cj + 1]
        top = (1 - tx) * v00 + tx * v01
        bottom = (1 - tx) * v10 + tx * v11
        v = top + ty * (bottom - top)
        d = lat_d[:, ci][:, :, cj]
        v = torch.where(d, v.clamp(min=1e-6), v.clamp(max=0.0))
        dec.copy_(torch.where(own, d, dec))
        val.copy_(torch.where(own, v, val))
