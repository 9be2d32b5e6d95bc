"""Host time of the sparse planner itself (numpy, per box), without the decoder.

The decoder is replaced by a cheap analytic field (a disc with a wavy edge, heads that disagree near it,
uncertainty peaked at the edge), whose own time is measured on the same points and subtracted, so what is
left is the planner's work: lattices, cell decisions, fills. On a GPU this host time sits between the
device calls of every frame, so it bounds the sparse path's latency there.

    python -m benchmarks.planner_time              # 384^2 and 896^2 output, box ~37% of the side
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from imedsam_deploy.runtime import DEFAULT_MARGIN
from imedsam_deploy.sparse import SparseConfig, box_region, sparse_decode


def field(coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = coords[:, 0], coords[:, 1]
    lg = (0.25 - np.hypot(x - 0.05, y + 0.02)) * 40 + 0.3 * np.sin(20 * x)
    return lg[None].astype(np.float32), (lg + 0.1)[None].astype(np.float32), np.exp(-lg**2)[None].astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 896])
    ap.add_argument("--repeat", type=int, default=30)
    a = ap.parse_args(argv)
    print(f"{'out':>5} {'planner ms':>11} {'field ms':>9} {'points':>7} {'calls':>6}")
    for n in a.sizes:
        side = 0.375 * n
        box = (n / 2 - side / 2, n / 2 - side / 2, n / 2 + side / 2, n / 2 + side / 2)
        region = box_region(box, (n, n), int(round(DEFAULT_MARGIN * side)))
        calls: list[np.ndarray] = []

        def decode(c: np.ndarray, calls: list[np.ndarray] = calls) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            calls.append(c)
            return field(c)

        res = sparse_decode(decode, (n, n), 0.125, region, SparseConfig())  # warm-up
        totals, fields = [], []
        for _ in range(a.repeat):
            calls.clear()
            t0 = time.perf_counter()
            sparse_decode(decode, (n, n), 0.125, region, SparseConfig())
            t1 = time.perf_counter()
            for c in list(calls):
                field(c)
            fields.append(time.perf_counter() - t1)
            totals.append(t1 - t0)
        planner = np.median(np.subtract(totals, fields)) * 1e3
        print(f"{n:>5} {planner:>11.2f} {np.median(fields) * 1e3:>9.2f} {res.queried:>7} {len(calls):>6}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
