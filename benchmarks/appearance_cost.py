"""Host time of the video tracker's appearance check per tracked frame (``imedsam_deploy.appearance``): the frame's
features built from a host embedding and one mask judged (its likeness and its part that looks like the object,
with that part's core for the next box: ``tracking.follow`` with ``like_part``); and of a search (a lost frame), on random
embeddings of the shapes the presets produce, a 410 x 470 frame (the shared clip's) with a polyp-sized mask.
A GPU backend adds the embedding's copy to the host (not timed here).

    python -m benchmarks.appearance_cost [--repeat 200]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from imedsam_core.contract import LETTERBOX_MODE, RESIZE_MODE
from imedsam_deploy.appearance import FrameFeatures
from imedsam_deploy.preprocess import Preprocessing
from imedsam_deploy.tracking import TrackConfig, core_box

# (name, preprocessing, embedding grid): lite; vit_b at 384 and at SAM's 1024
SHAPES = (("lite 256", Preprocessing(LETTERBOX_MODE, 256), 64), ("vit_b 384", Preprocessing(RESIZE_MODE, 384), 24),
          ("vit_b 1024", Preprocessing(RESIZE_MODE, 1024), 64))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=200)
    a = ap.parse_args(argv)
    hw = (410, 470)
    mask = np.zeros(hw, bool)
    mask[262:378, 296:362] = True
    rng = np.random.default_rng(0)
    print(f"{'preset':<12}{'check ms':>10}{'search ms':>11}")
    for name, pre, g in SHAPES:
        emb = rng.standard_normal((1, 256, g, g)).astype(np.float32)
        app = FrameFeatures(emb, hw, pre).learn(mask)
        assert app is not None
        times = {}
        def check() -> object:
            return core_box(FrameFeatures(emb, hw, pre).judge(app, mask)[1], TrackConfig().core)  # noqa: B023

        for what, fn in (("check", check),
                         ("search", lambda: FrameFeatures(emb, hw, pre).search(app, 0.3))):  # noqa: B023
            fn()
            t = time.perf_counter()
            for _ in range(a.repeat):
                fn()
            times[what] = (time.perf_counter() - t) / a.repeat * 1e3
        print(f"{name:<12}{times['check']:>10.2f}{times['search']:>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
