"""Video frames per second with the I/O overlapped (frames read ahead, outputs written behind, on their own
threads: ``imedsam_deploy.pipeline``) against in line, through ``run_video``: what ``imedsam-infer VIDEO``
runs, writing a mask PNG and an overlay frame per frame.

Two kinds of model: the shipped tiny Kvasir model on ONNX Runtime CPU (exported once into a temporary folder),
and a stand-in backend that answers at once (an ellipse filling the box: a polyp-sized mask) after waiting a
fixed time per frame without holding the GIL (``time.sleep``, as a wait on a CUDA synchronisation does):
2 ms is the GPU target's frame, so that row says what the host's own work leaves of a GPU's frame rate.

    python -m benchmarks.video_pipeline --frames 300                  # the shared colonoscopy clip
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.host_overhead import ZeroCostBackend
from benchmarks.long_video import DEFAULT_BOX, DEFAULT_VIDEO, LoopedVideo

REPO = Path(__file__).resolve().parents[1]


class WaitingBackend(ZeroCostBackend):
    """``ZeroCostBackend`` whose encoder waits ``wait_ms`` per frame, GIL released (a GPU frame's stand-in)."""

    def __init__(self, wait_ms: float) -> None:
        super().__init__()
        self.wait_s = wait_ms / 1e3
        self.name = f"stand-in ({wait_ms:g} ms per frame)"
        self._blobs: dict[tuple[int, int], np.ndarray] = {}

    def encode_pixels(self, pixels: np.ndarray) -> list[Any]:
        time.sleep(self.wait_s)
        return super().encode_pixels(pixels)

    def sparse_region(self, embedding: Any, boxes: np.ndarray, region: tuple[int, int, int, int],
                      out_hw: tuple[int, int], fraction: float, cfg: Any) -> tuple[np.ndarray, int]:
        """An ellipse filling the box (the region less the runtime's 25% margin): a polyp-sized mask, so the
        tracked box stays put as it does on a real clip."""
        h, w = region[1] - region[0], region[3] - region[2]
        if (h, w) not in self._blobs:  # made once per region size: the stand-in's own time stays out
            y, x = np.mgrid[0:h, 0:w].astype(np.float32)
            d = ((y - h / 2) / (h / 3)) ** 2 + ((x - w / 2) / (w / 3)) ** 2  # the box: two thirds of the region
            self._blobs[(h, w)] = (4.0 * (1.0 - d))[None]
        return self._blobs[(h, w)].copy(), 0


def run_once(seg: Any, video: Path, frames: int, overlap: bool, box: tuple[float, ...]) -> float:
    """Frames per second of one run (outputs into a temporary folder, then discarded)."""
    from imedsam_deploy.infer import Prompts, run_video
    from imedsam_deploy.outputs import OutputSet
    from imedsam_deploy.tracking import TrackConfig

    reader = LoopedVideo(video, frames)
    with tempfile.TemporaryDirectory() as tmp:
        outs = OutputSet(Path(tmp), "video", reader.fps, (reader.width, reader.height))
        t0 = time.perf_counter()
        # no growth limit: the stand-in fills its box, and every frame's mask is drawn and written (as recorded)
        info = run_video(seg, reader, Prompts([np.array(box)]), outs, None, TrackConfig(max_growth=0),
                         lambda n: None, overlap_io=overlap)  # type: ignore[arg-type]
        outs.finish(info)
        dt = time.perf_counter() - t0
    return float(info["frames"] / dt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    ap.add_argument("--frames", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3, help="interleaved runs per setting (median reported)")
    ap.add_argument("--waits", type=float, nargs="*", default=[2.0], help="stand-in backends' ms per frame")
    ap.add_argument("--no-model", action="store_true", help="stand-ins only (no export, no torch needed)")
    a = ap.parse_args(argv)
    from imedsam_deploy.manifest import Artifact, load_artifact
    from imedsam_deploy.runtime import Segmenter

    if not a.video.is_file():
        raise SystemExit(f"{a.video}: video not found (pass --video)")
    setups: list[tuple[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        if not a.no_model:
            from imedsam_deploy.backends import open_backend
            from imedsam_export.api import export_artifact

            ck = REPO / "imedsam_train" / "weights" / "imedsam_tiny_kvasir.pt"
            art = load_artifact(Path(export_artifact(ck, Path(tmp) / "art", verify=False)))
            be, _ = open_backend("ort-cpu", art, None)
            setups.append(("tiny model, ort-cpu", Segmenter(be, art, query="sparse")))
        stand_in_art = Artifact(path=Path("."), manifest={}, input_size=384, embedding_shape=(256, 24, 24),
                                num_classes=1, refine_fraction=0.125, max_points=65536, max_batch=8, graphs={})
        for w in a.waits:
            setups.append((f"stand-in, {w:g} ms a frame", Segmenter(WaitingBackend(w), stand_in_art,  # type: ignore[arg-type]
                                                                    query="sparse")))
        print(f"{a.frames} frames of {a.video.name}, median of {a.repeat} interleaved runs")
        print(f"{'model':<28} {'in line fps':>12} {'overlapped fps':>15} {'ratio':>6}")
        for name, seg in setups:
            run_once(seg, a.video, min(30, a.frames), True, DEFAULT_BOX)  # warm-up
            fps: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(a.repeat):
                for overlap in (False, True):
                    fps[overlap].append(run_once(seg, a.video, a.frames, overlap, DEFAULT_BOX))
            off, on = statistics.median(fps[False]), statistics.median(fps[True])
            print(f"{name:<28} {off:>12.1f} {on:>15.1f} {on / off:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
