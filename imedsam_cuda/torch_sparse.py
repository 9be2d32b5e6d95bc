"""The sparse planner of ``imedsam_deploy.sparse`` on the device, in static shapes (torch; torch-cuda only).

On a GPU the numpy planner's host work (milliseconds per box, ``benchmarks/planner_time.py``) and one host
round trip per level cost more than the decoder calls themselves. ``DevicePlanner`` runs the same algorithm
with torch tensors and fixed shapes, so a whole box (every level, every decoder call, every fill) can be
captured in one CUDA graph and replayed:

- the region's extended grid lives in a fixed ``(GH, GW)`` array (the largest any region of this output
  size can need); the region's origin and size are tensors, and cells or points past it are masked;
- the first level evaluates every point of its lattice (a fixed count); each later level evaluates at most
  ``caps[level]`` points (the last level twice: the dilation's pass with ``dilation_cap``), chosen with
  ``topk`` over the points it needs (no data-dependent shapes). When a pass needs more, ``overflow`` is set
  and the caller must use the host planner instead (results are then never silently different), and
  ``grow``s that pass's budget for the next boxes;
- every level runs, even with nothing left to refine (it is then a no-op), as the host planner's loop would
  have stopped with the same result.
It makes the same decisions as the host planner: same lattices, same threshold estimate, same refinement and
fill rules, checked for identical masks in the tests. Filled logits are computed in float32 (the host's
lerp weights are float64): within 1e-6 relative, and ``logits > 0`` equals the mask either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from imedsam_core.contract import refine_count
from imedsam_deploy.sparse import SparseConfig, extended_size, initial_stride, pixel_coords

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
    """(ny, nx) cell flags -> (ny+1, nx+1) flags of their corners (a 2 x 2 max over the -inf-padded cells)."""
    return F.max_pool2d(cells[None, None].float(), 2, stride=1, padding=1)[0, 0] > 0


def _diamond(n: int, device: torch.device) -> torch.Tensor:
    """The (1, 1, 2n+1, 2n+1) L1 ball of radius n: one convolution with it dilates as n rounds of the
    4-neighbour cross do (``sparse._dilate``); a shortest path between two cells of a rectangle stays in it,
    so clipping at the border between rounds changes nothing."""
    r = torch.arange(-n, n + 1, device=device).abs()
    return ((r[:, None] + r[None, :]) <= n).float()[None, None]


class DevicePlanner:
    """One output size and planner config; ``plan(decode, region)`` is capturable in a CUDA graph.

    Every region-independent index is a constant made here (per level: the lattice's flat grid indices and
    coordinate-table indices, the non-lattice pixels), so a plan is a few hundred small kernels rather than
    ~600 (``benchmarks/op_count.py``): on a GPU each costs microseconds however little it does.
    """

    # each level's bookkeeping (choosing and recording its points, refinement, dilation, next candidates, fill) as
    # five Triton kernels (``imedsam_cuda.fused_planner``) instead of ~50 torch ops; torch-cuda's ``fused_planner``
    fused = False

    def __init__(self, out_hw: tuple[int, int], fraction: float, cfg: SparseConfig, device: torch.device | str,
                 cap_per_side: int | None = None) -> None:
        H, W = out_hw
        self.H, self.W, self.cfg, self.device = H, W, cfg, torch.device(device)
        dev = self.device
        # regions it handles start at this stride (``usable``)
        self.stride = initial_stride(cfg.stride, H, W, cfg.min_cells_across)
        s0 = self.stride
        # the largest extended grid of a region of this output (h <= H)
        self.GH, self.GW = GH, GW = extended_size(H, s0), extended_size(W, s0)
        ts = max(1, cfg.threshold_stride)
        tr = torch.arange(min(ts // 2, H - 1), H, ts, device=dev)  # as the host planner: one point at least
        tc = torch.arange(min(ts // 2, W - 1), W, ts, device=dev)
        gr, gc = torch.meshgrid(tr, tc, indexing="ij")
        self.t_coords = _pixel_coords(gr.reshape(-1), gc.reshape(-1), H, W)
        self.n_t = self.t_coords.shape[0]
        self.kt = refine_count(self.n_t, fraction)
        self.diamond = _diamond(cfg.dilate, dev)
        # pixel centres of every output row and column (``sparse.pixel_coords``' float64 arithmetic)
        self.x_axis = _pixel_coords(torch.zeros(W, device=dev), torch.arange(W, device=dev), H, W)[:, 0]
        self.y_axis = _pixel_coords(torch.arange(H, device=dev), torch.zeros(H, device=dev), H, W)[:, 1]
        self.gi, self.gj = torch.arange(GH, device=dev), torch.arange(GW, device=dev)
        levels, s = [], s0
        while s >= 1:
            levels.append(s)
            s //= 2
        self.levels = levels
        # per level of stride >= 2: each lattice point's index in the flattened grid, and its (x, y) indices
        # into a plan's coordinate table [x of grid columns..., y of grid rows...] (a third of the grid's points
        # in all, 24 bytes each: 34 MB at 2048²; int64, as int32 indices are widened by every indexing op;
        # stride 1's lattice is the grid itself, its indices are arithmetic)
        self.lat_lin: dict[int, torch.Tensor] = {}
        self.lat_xy: dict[int, torch.Tensor] = {}
        self.fillable: dict[int, torch.Tensor] = {}
        self.cell_r: dict[int, torch.Tensor] = {}
        self.cell_c: dict[int, torch.Tensor] = {}
        for s in levels[:-1]:
            li, lj = torch.meshgrid(self.gi[::s], self.gj[::s], indexing="ij")
            self.lat_lin[s] = (li * GW + lj).reshape(-1)
            self.lat_xy[s] = torch.stack([lj.reshape(-1), GW + li.reshape(-1)], dim=-1)
            # what a fill may write: the grid's pixels that are not lattice points, and their cells
            self.fillable[s] = ~(((self.gi % s) == 0)[:, None] & ((self.gj % s) == 0)[None, :])
            self.cell_r[s] = torch.div(self.gi, s, rounding_mode="floor")
            self.cell_c[s] = torch.div(self.gj, s, rounding_mode="floor")
        side, per_side, unit = max(H, W), cap_per_side or CAP_PER_SIDE, CAP_UNIT
        self.caps = {s: min(self.lattice_points(s), max(unit, -(-per_side * side // s // unit) * unit))
                     for s in levels}
        self.caps[s0] = self.lattice_points(s0)  # the first level: any region's whole lattice, never over
        # the last level's second pass (the corners of the cells that the dilation switched on) has a budget of
        # its own: it needs a few percent of the first pass's points (vit_b at 896²: 1190 against 124403), and
        # evaluates its whole budget regardless
        self.dilation_cap = min(self.caps[1], max(unit, -(-self.caps[1] // 8 // unit) * unit))
        self._budgets()

    def _budgets(self) -> None:
        """Every pass's budget as a device tensor (made outside any capture): the fused plan's overflow test."""
        self.budgets = torch.tensor(self.budget_key(), dtype=torch.int64, device=self.device)

    def lattice_points(self, s: int) -> int:
        """Points of the grid's stride-``s`` lattice: the most a level can need."""
        return ((self.GH - 1) // s + 1) * ((self.GW - 1) // s + 1)

    def budget_key(self) -> tuple[int, ...]:
        """Every pass's point budget: a plan's shapes, so a captured graph is keyed by it."""
        return (*self.caps.values(), self.dilation_cap)

    def grow(self, needs: list[int]) -> None:
        """After an overflow, so that a video whose boxes need more points settles on budgets that fit them.
        ``needs``: the points each pass needed in the overflowing plan (its fifth output: one per level, then
        the dilation's pass). The first pass over its budget gets room for its need plus a quarter, in
        CAP_UNIT steps (never past its whole lattice); the others keep theirs: the passes before needed no
        more, and those after decided on a subset of its points, so their counts mean nothing (they grow
        when a later box overflows them). Doubling every budget instead (the former rule) left the later
        passes of a vit_b plan at 896² decoding 483k points for 167k needed after three overflows
        (``python -m benchmarks.planner_budgets``)."""
        passes = [*self.levels, 1]  # the last: the dilation's pass, on the stride-1 lattice
        budget = [*self.caps.values(), self.dilation_cap]
        i = next((i for i, n in enumerate(needs) if n > budget[i]), None)
        if i is None:
            return
        room = -(-(needs[i] + needs[i] // 4) // CAP_UNIT) * CAP_UNIT
        budget[i] = min(self.lattice_points(passes[i]), room)
        self.caps = dict(zip(self.levels, budget[:-1], strict=True))
        self.dilation_cap = budget[-1]
        self._budgets()

    def lattice_index(self, s: int, idx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat grid index, coordinate-table indices (N, 2)) of the stride-s lattice's points ``idx`` (flat
        lattice indices; None: all of them)."""
        if s > 1:
            lin, xy = self.lat_lin[s], self.lat_xy[s]
            return (lin, xy) if idx is None else (lin[idx], xy[idx])
        flat = torch.arange(self.GH * self.GW, device=self.device) if idx is None else idx
        return flat, torch.stack([flat % self.GW, self.GW + torch.div(flat, self.GW, rounding_mode="floor")], dim=-1)

    def region_inputs(self, r0: int, h: int, c0: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        """A region's plan inputs made on the host: (r0, h, c0, w, the extended grid's last row and column)
        int64, and the coordinate table [x of grid columns..., y of grid rows...] float32 (past the region, its
        last pixel's). ``plan`` derives both from (r0, h, c0, w) on the device otherwise, in ~20 small kernels;
        the values are the same (``sparse.pixel_coords``' float64 arithmetic)."""
        s0 = self.stride
        last = (-(-(h - 1) // s0) * s0, -(-(w - 1) // s0) * s0)
        cols = c0 + np.minimum(np.arange(self.GW), w - 1)
        rows = r0 + np.minimum(np.arange(self.GH), h - 1)
        x = pixel_coords(np.zeros(self.GW), cols.astype(np.float64), self.H, self.W)[:, 0]
        y = pixel_coords(rows.astype(np.float64), np.zeros(self.GH), self.H, self.W)[:, 1]
        return np.array([r0, h, c0, w, *last], np.int64), np.concatenate([x, y])

    def usable(self, h: int, w: int) -> bool:
        """Whether the host planner would use this planner's initial stride on an h x w region (it uses a
        smaller one on regions narrower than the stride or than ``min_cells_across`` of its cells, and a plain
        evaluation on 1-pixel-wide ones)."""
        if h <= 1 or w <= 1 or self.stride == 1 or h > self.H or w > self.W:
            return False
        return initial_stride(self.cfg.stride, h, w, self.cfg.min_cells_across) == self.stride

    def plan(self, decode: TorchDecodeFn, region: torch.Tensor, table: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, ...]:
        """region: int64 (4,) = (r0, h, c0, w) of a region ``usable`` says this planner handles, or the (6,) and the
        ``table`` of ``region_inputs`` (made on the host: ~20 fewer kernels).

        Returns val (K, GH, GW) float32 (logits; the region is [:h, :w]), dec (K, GH, GW) bool, queried (),
        overflow () bool: True when a level needed more points than its cap (discard the result then), and
        needs (levels + 1,) int64: the points each pass needed, level by level and then the dilation's pass at
        stride 1 (for ``grow``; past an overflowed pass they are not meaningful).

        Grid-sized state is flat with one spare slot at the end: a level's points that are not to be written
        (already known, outside the region, or the unflagged picks of a ``topk``) write there instead, so
        every update is one unconditional index_put.
        """
        cfg, GH, GW, dev = self.cfg, self.GH, self.GW, self.device
        n = GH * GW
        if table is None:
            r0, hm1, c0, wm1 = region[0], region[1] - 1, region[2], region[3] - 1
            s0 = self.stride  # the region's extended grid: (h - 1), (w - 1) rounded up to multiples of s0, plus one
            last = (torch.div(hm1 + s0 - 1, s0, rounding_mode="floor") * s0,
                    torch.div(wm1 + s0 - 1, s0, rounding_mode="floor") * s0)
            # (x, y) of every grid column and row; past the region they clamp to its last pixel, as on the host
            table = torch.cat([self.x_axis[c0 + torch.minimum(self.gj, wm1)],
                               self.y_axis[r0 + torch.minimum(self.gi, hm1)]])
            last_t = torch.stack(last) if self.fused else None  # the kernels read it as one tensor
        else:  # made on the host (region_inputs)
            last, last_t = (region[4], region[5]), region[4:6]
        row_in, col_in = self.gi <= last[0], self.gj <= last[1]
        inside = row_in[:, None] & col_in[None, :] if not self.fused else None
        known = torch.zeros(n + 1, dtype=torch.bool, device=dev)
        amb = torch.zeros(n + 1, dtype=torch.bool, device=dev)
        known_g, amb_g = known[:n].view(GH, GW), amb[:n].view(GH, GW)
        overflow = None if self.fused else torch.zeros((), dtype=torch.bool, device=dev)
        state: dict[str, Any] = {}
        needs: list[torch.Tensor] = []
        # fused: each pass's need counted by its kernel into one tensor, the overflow tested once at the end
        counts = torch.zeros(len(self.levels) + 1, dtype=torch.int64, device=dev) if self.fused else None

        def evaluate(cells: torch.Tensor, s: int, cap: int) -> None:
            """Decode the unknown points of the stride-s lattice that are corners of ``cells`` (stride-s cells)."""
            nonlocal overflow
            if counts is not None:  # fp32 1 / 0: topk ranks it as it is, and the scatter reads it as the flag
                assert last_t is not None
                need = level_need(cells, known, last_t, s, GW, counts[len(needs) :])
                needs.append(counts[len(needs)])
            else:
                assert inside is not None
                need = (_corner_any(cells) & ~known_g[::s, ::s] & inside[::s, ::s]).reshape(-1)
                needs.append(need.sum())
            if cap >= need.numel():
                flag, (lin, xy) = need, self.lattice_index(s, None)
                coords = table[xy]
            else:
                top = torch.topk(need.float(), cap, sorted=False)  # float: topk has kernels for it everywhere
                if counts is not None:  # the points' grid indices and coordinates in one kernel
                    flag, (lin, coords) = top.values, level_coords(top.indices, table, s, GW)
                else:
                    flag = top.values > 0
                    assert overflow is not None
                    overflow = overflow | (needs[-1] > cap)
                    lin, xy = self.lattice_index(s, top.indices)
                    coords = table[xy]
            first = "tau" not in state
            if first:
                coords = torch.cat([self.t_coords, coords])
            outs = decode(coords)  # fused: the logits in the decoder's dtype, widened by the scatter kernel
            coarse, fine, unc = outs if counts is not None else (o.float() for o in outs)
            if first:
                state["tau"] = torch.topk(unc[:, : self.n_t].float(), self.kt, dim=1).values[:, -1]
                # the logits only: every decision is ``val > 0`` (a fill clamps its logits to its decision's sign)
                state["val"] = torch.zeros(unc.shape[0], n + 1, dtype=torch.float32, device=dev)
                coarse, fine, unc = coarse[:, self.n_t :], fine[:, self.n_t :], unc[:, self.n_t :]
            if self.fused:  # the same writes as below, in one kernel
                level_scatter(coarse, fine, unc, state["tau"], flag, lin, state["val"], amb, known,
                              cfg.refine_on_head_disagreement, cfg.logit_band)
                return
            v = torch.where(unc >= state["tau"][:, None], fine, coarse)
            a = None
            if cfg.refine_on_head_disagreement:
                a = ((coarse > 0) != (fine > 0)).any(dim=0)
            if cfg.logit_band > 0:
                band = (torch.minimum(coarse.abs(), fine.abs()) < cfg.logit_band).any(dim=0)
                a = band if a is None else a | band
            dest = torch.where(flag, lin, n)  # the spare slot for points not to be written
            state["val"][:, dest] = v
            if a is not None:
                amb[dest] = a
            known[dest] = flag

        def cells_valid(s: int) -> torch.Tensor:
            """Stride-s cells of the region's extended grid: those whose far corner is in it."""
            return row_in[s::s][:, None] & col_in[s::s][None, :]

        cand = cells_valid(self.stride)
        if self.fused:
            from imedsam_cuda.fused_planner import (
                level_cells,
                level_coords,
                level_fill,
                level_need,
                level_scatter,
            )

        for s in self.levels:
            evaluate(cand, s, self.caps[s])
            if self.fused:  # the same decisions and fills as below, in two kernels
                assert last_t is not None
                active, nxt = level_cells(state["val"], amb, cand, last_t, s, GW, cfg.dilate, s > 1)
                if s > 1:
                    level_fill(state["val"], cand, active, last_t, s, (GH, GW))
                    assert nxt is not None
                    cand = nxt
                else:
                    evaluate(active, 1, self.dilation_cap)
                continue
            k = state["val"].shape[0]
            val = state["val"][:, :n].view(k, GH, GW)
            d = val[:, ::s, ::s] > 0  # the lattice's decisions
            am = amb_g[::s, ::s]
            disagree = ((d[:, :-1, :-1] != d[:, 1:, :-1]) | (d[:, :-1, :-1] != d[:, :-1, 1:])
                        | (d[:, :-1, :-1] != d[:, 1:, 1:])).any(dim=0)
            ambiguous = am[:-1, :-1] | am[1:, :-1] | am[:-1, 1:] | am[1:, 1:]
            active = cand & (disagree | ambiguous)
            if cfg.dilate > 0:  # in fp32 whatever the caller's autocast: no casts of the cells and the ball
                with torch.autocast(dev.type, enabled=False):
                    active = F.conv2d(active[None, None].float(), self.diamond, padding=cfg.dilate)[0, 0] > 0
            active = active & cells_valid(s)
            if s > 1:
                assert inside is not None
                self._fill(val, d, cand & ~active, s, inside, last)
                r, c = active.shape  # each cell becomes its 2 x 2 children (expand: no host sync in capture)
                cand = active[:, None, :, None].expand(r, 2, c, 2).reshape(2 * r, 2 * c)
            else:  # cells switched on by the dilation at the last level: their corners are their pixels
                evaluate(active, 1, self.dilation_cap)
        val = state["val"][:, :n].view(-1, GH, GW)
        queried = known[:n].sum() + self.n_t  # every flagged point became known exactly once
        if counts is not None:  # a pass over its budget (the first level's never is: its budget is its lattice)
            return val, val > 0, queried, (counts > self.budgets).any(), counts
        assert overflow is not None
        return val, val > 0, queried, overflow, torch.stack(needs)

    def _fill(self, val: torch.Tensor, lattice_dec: torch.Tensor, settled: torch.Tensor, s: int, inside: torch.Tensor,
              last: tuple[torch.Tensor, torch.Tensor]) -> None:
        """``sparse._fill_settled`` as dense ops over the grid: pixel (i, j) of the region belongs to cell
        (min(i // s, nr - 1), min(j // s, nc - 1)) (the region's far edges to its last cells) and takes the
        cell's corners' common decision and their bilinear logit. ``interpolate(align_corners=True)`` from the
        lattice to the grid is that lerp: its scale (n-1)/((n-1)s) = 1/s is a power of two, so the source
        positions and weights are exact (only the products round differently). Lattice points (evaluated
        corners) are left alone. ``last``: the region's extended grid's last row and column indices."""
        cr = torch.minimum(self.cell_r[s], torch.div(last[0], s, rounding_mode="floor") - 1)
        cc = torch.minimum(self.cell_c[s], torch.div(last[1], s, rounding_mode="floor") - 1)
        own = settled[cr][:, cc] & inside & self.fillable[s]
        d = lattice_dec[:, cr][:, :, cc]
        v = F.interpolate(val[None, :, ::s, ::s], size=(self.GH, self.GW), mode="bilinear", align_corners=True)[0]
        v = torch.where(d, v.clamp(min=1e-6), v.clamp(max=0.0))  # the logit takes the decision's sign
        val.copy_(torch.where(own, v, val))
