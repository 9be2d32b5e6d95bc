"""Sparse (multiresolution) querying of the implicit decoder: the largest near-exact lever on a CPU.

An implicit decoder need not be queried at every output pixel. Following the multiresolution surface
extraction of Occupancy Networks (Mescheder et al., CVPR 2019), the planner evaluates a lattice of stride
``stride`` inside the box plus a margin, and refines (halving the stride each level, down to 1 pixel) only
the cells whose corner decisions disagree or whose corners are ambiguous; every other cell is filled with
its corners' common decision. Pixels outside the region are background and are never queried. Pure numpy:
the decoder is a callback ``coords (N, 2) -> (coarse, fine, uncertainty)``, each (K, N).

How UGS top-K interacts with it. The full-grid output takes the fine logit at the top
``refine_count(H*W, fraction)`` points by uncertainty and the coarse logit elsewhere, i.e. the fine logit
wherever the uncertainty reaches the global (1 - fraction) quantile tau. The planner estimates tau from a
uniform lattice over the *whole* output (``threshold_stride``; its points inside the region are reused),
because the ranking is global in the full-grid output, then decides every queried point with
``fine if unc >= tau else coarse``. A corner where coarse and fine disagree in sign counts as ambiguous (its
decision hinges on tau), so its cells are refined. What this is not: exact. A structure smaller than a
cell with all four corners agreeing is missed (the first lattice has at least ``min_cells_across`` cells
across the region's narrower side, so an object of about the box's size is not), and the quantile estimate
may differ from the exact top-K at points where coarse and fine disagree; ``dilate`` (refining the
neighbours of refined cells too) trades speed for agreement. Benchmarks report the agreement with the
full-grid output beside the speed-up.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from imedsam_core.contract import refine_count

# coords (N, 2) float32 in [-1, 1] -> coarse, fine, uncertainty, each (K, N)
DecodeFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class SparseConfig:
    """Planner settings. ``stride`` is rounded down to a power of two."""

    stride: int = 8  # initial lattice stride in output pixels (at most; see ``initial_stride``)
    dilate: int = 1  # refine this many rings of cells around every refined cell
    threshold_stride: int = 16  # lattice stride over the whole output for the UGS threshold estimate
    refine_on_head_disagreement: bool = True  # coarse/fine sign disagreement at a corner = ambiguous
    logit_band: float = 0.0  # a corner whose coarse or fine |logit| is below this is ambiguous too
    # the first lattice has at least this many cells across the region's narrower side (0: no such floor)
    min_cells_across: int = 8


@dataclass
class SparseResult:
    mask: np.ndarray  # (K, H, W) bool
    queried: int  # decoder points evaluated (region lattice levels + threshold lattice)
    region_pixels: int
    tau: np.ndarray  # (K,) estimated UGS threshold
    # (K, h, w) merged logits on the region: the decoder's at evaluated pixels, the bilinear interpolation of
    # their cell's (sign-agreeing) corners at filled ones, so ``logits > 0`` is exactly the region's mask
    logits: np.ndarray | None = None


def pixel_coords(rows: np.ndarray, cols: np.ndarray, height: int, width: int) -> np.ndarray:
    """(x, y) in [-1, 1] of pixel centres (contract: align_corners=False), (N, 2) float32."""
    x = (2.0 * cols + 1.0) / width - 1.0
    y = (2.0 * rows + 1.0) / height - 1.0
    return np.stack([x, y], axis=-1).astype(np.float32)


def box_region(
    box: tuple[float, float, float, float], out_size: tuple[int, int], margin: int
) -> tuple[int, int, int, int]:
    """Output-pixel rows/cols [r0, r1) x [c0, c1) covering ``box`` (x0, y0, x1, y1 in output pixels) + margin."""
    H, W = out_size
    x0, y0, x1, y1 = box
    r0 = max(0, int(np.floor(y0)) - margin)
    c0 = max(0, int(np.floor(x0)) - margin)
    r1 = min(H, int(np.ceil(y1)) + margin)
    c1 = min(W, int(np.ceil(x1)) + margin)
    return r0, max(r0, r1), c0, max(c0, c1)


def initial_stride(stride: int, h: int, w: int, min_cells: int = 0) -> int:
    """The first lattice's stride on an h x w region: ``stride`` rounded down to a power of two, no wider than
    the region, and with ``min_cells`` (``SparseConfig.min_cells_across``) no wider than that fraction of its
    narrower side: a box's object must span several cells, or one whose cell corners all fall outside it is
    never seen (at stride 8, small organ sections on CT were lost whole). 1 on an empty region."""
    if h <= 0 or w <= 0:
        return 1
    s = 1 << max(0, int(stride).bit_length() - 1)
    s = min(s, 1 << max(0, (max(h, w) - 1).bit_length() - 1))
    if min_cells > 0:
        s = min(s, 1 << max(0, max(1, min(h, w) // min_cells).bit_length() - 1))
    return max(1, s)


def extended_size(n: int, stride: int) -> int:
    """Pixels along a side of n, grown to the next multiple of ``stride`` plus one (a whole lattice)."""
    return max(1, -(-(n - 1) // stride) * stride + 1)


def merge_decision(coarse: np.ndarray, fine: np.ndarray, unc: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """UGS decision with a threshold: fine logit where unc >= tau (per class), coarse elsewhere; > 0."""
    return np.where(unc >= tau[:, None], fine, coarse) > 0


def dense_decode(
    decode: DecodeFn, out_size: tuple[int, int], fraction: float,
    region: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Exact full-grid output (the global top-K), restricted to ``region`` (rest background): (K, H, W)."""
    H, W = out_size
    rr, cc = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    coarse, fine, unc = decode(pixel_coords(rr.ravel(), cc.ravel(), H, W))
    k = refine_count(H * W, fraction)
    merged = coarse.copy()
    idx = np.argpartition(-unc, k - 1, axis=1)[:, :k]
    np.put_along_axis(merged, idx, np.take_along_axis(fine, idx, axis=1), axis=1)
    mask = (merged > 0).reshape(-1, H, W)
    if region is not None:
        r0, r1, c0, c1 = region
        keep = np.zeros((H, W), dtype=bool)
        keep[r0:r1, c0:c1] = True
        mask &= keep
    return mask


def _dilate(a: np.ndarray, n: int) -> np.ndarray:
    for _ in range(n):
        b = a.copy()
        b[1:] |= a[:-1]
        b[:-1] |= a[1:]
        b[:, 1:] |= a[:, :-1]
        b[:, :-1] |= a[:, 1:]
        a = b
    return a


def _corner_any(cells: np.ndarray) -> np.ndarray:
    """(ny, nx) cell flags -> (ny+1, nx+1) flags of their corners."""
    out = np.zeros((cells.shape[0] + 1, cells.shape[1] + 1), dtype=bool)
    out[:-1, :-1] |= cells
    out[1:, :-1] |= cells
    out[:-1, 1:] |= cells
    out[1:, 1:] |= cells
    return out


def sparse_decode(
    decode: DecodeFn, out_size: tuple[int, int], fraction: float,
    region: tuple[int, int, int, int] | None = None, cfg: SparseConfig | None = None,
) -> SparseResult:
    """Multiresolution query of ``decode`` over ``region`` (default the whole output); see the module doc."""
    cfg = cfg or SparseConfig()
    H, W = out_size
    r0, r1, c0, c1 = region if region is not None else (0, H, 0, W)
    h, w = r1 - r0, c1 - c0
    queried = 0

    # The UGS threshold comes from a uniform lattice over the whole output (the full grid's ranking is
    # global); its points ride along with the first region lattice in one decoder call.
    ts = max(1, cfg.threshold_stride)
    # (an output narrower than half the stride still gets one lattice point, so the threshold exists)
    tr, tc = np.meshgrid(np.arange(min(ts // 2, H - 1), H, ts), np.arange(min(ts // 2, W - 1), W, ts), indexing="ij")
    t_coords = pixel_coords(tr.ravel(), tc.ravel(), H, W)
    n_t = t_coords.shape[0]

    stride = initial_stride(cfg.stride, h, w, cfg.min_cells_across)
    # Extended local grid: a lattice of ``stride`` nests all finer ones; points past the region clamp to it.
    he, we = extended_size(h, stride), extended_size(w, stride)
    known = np.zeros((he, we), dtype=bool)
    amb = np.zeros((he, we), dtype=bool)
    tau: np.ndarray | None = None
    dec: np.ndarray | None = None
    val: np.ndarray | None = None

    def evaluate(sel: np.ndarray, s: int = 1) -> None:
        """Decode the not yet known points of ``sel``, a selection on the stride-``s`` lattice."""
        nonlocal queried, tau, dec, val
        if h > 0 and w > 0:
            ys, xs = np.nonzero(sel & ~known[::s, ::s])
            ys, xs = ys * s, xs * s
        else:
            ys, xs = np.zeros(0, int), np.zeros(0, int)
        coords = pixel_coords(r0 + np.minimum(ys, h - 1), c0 + np.minimum(xs, w - 1), H, W)
        first = tau is None
        if first:
            coords = np.concatenate([t_coords, coords])
        if coords.shape[0] == 0:
            return
        coarse, fine, unc = decode(coords)
        queried += coords.shape[0]
        if first:
            kt = refine_count(n_t, fraction)
            tau = -np.sort(-unc[:, :n_t], axis=1)[:, kt - 1]
            dec = np.zeros((unc.shape[0], he, we), dtype=bool)
            val = np.zeros((unc.shape[0], he, we), dtype=np.float32)
            coarse, fine, unc = coarse[:, n_t:], fine[:, n_t:], unc[:, n_t:]
        assert tau is not None and dec is not None and val is not None
        dec[:, ys, xs] = merge_decision(coarse, fine, unc, tau)
        val[:, ys, xs] = np.where(unc >= tau[:, None], fine, coarse)
        a = np.zeros(ys.size, dtype=bool)
        if cfg.refine_on_head_disagreement:
            a |= ((coarse > 0) != (fine > 0)).any(axis=0)
        if cfg.logit_band > 0:
            a |= (np.minimum(np.abs(coarse), np.abs(fine)) < cfg.logit_band).any(axis=0)
        amb[ys, xs] = a
        known[ys, xs] = True

    if h <= 0 or w <= 0:
        evaluate(np.zeros((he, we), dtype=bool))  # the threshold lattice only
        assert tau is not None
        return SparseResult(np.zeros((tau.shape[0], H, W), dtype=bool), queried, 0, tau)
    if h == 1 or w == 1 or stride == 1:
        evaluate(np.ones((he, we), dtype=bool))
    else:
        s = stride
        cand = np.ones(((he - 1) // s, (we - 1) // s), dtype=bool)
        while True:
            evaluate(_corner_any(cand), s)
            assert dec is not None
            d = dec[:, ::s, ::s]
            a = amb[::s, ::s]
            disagree = (
                (d[:, :-1, :-1] != d[:, 1:, :-1]) | (d[:, :-1, :-1] != d[:, :-1, 1:])
                | (d[:, :-1, :-1] != d[:, 1:, 1:])
            ).any(axis=0)
            ambiguous = a[:-1, :-1] | a[1:, :-1] | a[:-1, 1:] | a[1:, 1:]
            active = _dilate(cand & (disagree | ambiguous), cfg.dilate)
            # settled cells: fill their unknown pixels with their corners' (common) decision
            # (each pixel belongs to the cell it is top-left of; the far edges take their neighbour's)
            settled = cand & ~active
            if settled.any():
                assert val is not None
                _fill_settled(dec, val, settled, s)
            if not active.any():
                break
            if s == 1:
                # cells switched on by the dilation at the last level: their corners are their pixels
                evaluate(_corner_any(active))
                break
            # cells switched on by the dilation get their corners evaluated with the next level's lattice
            s //= 2
            cand = np.repeat(np.repeat(active, 2, axis=0), 2, axis=1)

    assert tau is not None and dec is not None and val is not None
    mask = np.zeros((tau.shape[0], H, W), dtype=bool)
    mask[:, r0:r1, c0:c1] = dec[:, :h, :w]
    return SparseResult(mask, queried, h * w, tau, val[:, :h, :w].copy())


def _fill_settled(dec: np.ndarray, val: np.ndarray, settled: np.ndarray, s: int) -> None:
    """Fill the settled stride-``s`` cells from their corners (evaluated, and agreeing in decision).

    Each pixel belongs to the cell it is top-left of, the lattice's far edges to the last cells; inside a
    settled cell only the top-left corner has been evaluated (finer lattices never reach a settled cell).
    Decision: the corners' common one. Logit: bilinear in the corner logits (the corners agree in sign, so it
    has the decision's sign; the clamp only guards exact zeros, keeping ``val > 0`` identical to ``dec``).
    Written through block views of the region, so the work scales with the filled pixels, with no per-pixel
    index arrays.
    """
    if s == 1:
        return  # a 1-pixel cell is its evaluated corner
    k, nr, nc = dec.shape[0], settled.shape[0], settled.shape[1]
    lat_v, lat_d = val[:, ::s, ::s], dec[:, ::s, ::s]  # (K, nr + 1, nc + 1) views
    v00, v01 = lat_v[:, :-1, :-1][:, settled], lat_v[:, :-1, 1:][:, settled]  # (K, n) copies
    v10, v11 = lat_v[:, 1:, :-1][:, settled], lat_v[:, 1:, 1:][:, settled]
    d = lat_d[:, :-1, :-1][:, settled]
    t = np.arange(s) / s

    def clamp(v: np.ndarray, dd: np.ndarray) -> np.ndarray:  # in place; dd broadcasts against v
        np.maximum(v, np.float32(1e-6), out=v, where=dd)
        np.minimum(v, np.float32(0.0), out=v, where=~dd)
        return v

    # bilinear = lerp along x on the top and bottom edges, then along y: one pass over the filled pixels
    top = ((1 - t) * v00[..., None] + t * v01[..., None]).astype(np.float32)  # (K, n, s): small
    bottom = ((1 - t) * v10[..., None] + t * v11[..., None]).astype(np.float32)
    ty = t.astype(np.float32)[:, None]
    v = top[:, :, None, :] + ty * (bottom - top)[:, :, None, :]  # (K, n, s, s) float32
    blocks_v = val[:, : nr * s, : nc * s].reshape(k, nr, s, nc, s).transpose(0, 1, 3, 2, 4)  # views
    blocks_d = dec[:, : nr * s, : nc * s].reshape(k, nr, s, nc, s).transpose(0, 1, 3, 2, 4)
    blocks_v[:, settled] = clamp(v, d[..., None, None])
    blocks_d[:, settled] = d[..., None, None]
    lat_v[:, :-1, :-1][:, settled] = v00  # the evaluated corner keeps its own logit
    # far edges: the last row of pixels belongs to the last row of cells (weight 1 on their lower corners),
    # the last column to the last column of cells; offset 0 is an evaluated corner
    edges = ((settled[-1], lat_v[:, -1], lat_d[:, -2, :-1], val[:, nr * s, : nc * s], dec[:, nr * s, : nc * s], nc),
             (settled[:, -1], lat_v[:, :, -1], lat_d[:, :-1, -2], val[:, : nr * s, nc * s], dec[:, : nr * s, nc * s], nr))
    for sel, line, corner_d, px_v, px_d, n in edges:
        if sel.any():
            lo, hi = line[:, :-1][:, sel][..., None], line[:, 1:][:, sel][..., None]
            dd = corner_d[:, sel][..., None]
            px_v.reshape(k, n, s)[:, sel, 1:] = clamp(((1 - t) * lo + t * hi).astype(np.float32), dd)[..., 1:]
            px_d.reshape(k, n, s)[:, sel, 1:] = dd
