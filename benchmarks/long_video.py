"""Long-run check: video inference over a clip looped to thousands of frames keeps host memory
flat and latency steady.

Runs the same code path as ``imedsam-infer VIDEO --box ...`` (``run_video`` into an ``OutputSet`` that writes
one mask PNG per frame, the overlay video and the per-frame records), fed by a reader that loops the clip,
and samples the process's resident set size (VmRSS) after every frame.

    python benchmarks/long_video.py --artifact runs/shipped/export --frames 5000 --json long_video.json
    python benchmarks/long_video.py --tiny --frames 5000          # a random tiny model exported on the fly

Reported: RSS after warm-up, at the end, growth (end - after warm-up) and peak; per-frame latency p50/p95
(model: encoder + decoder as recorded per frame; end-to-end: read, infer, draw and write; and the process's
CPU time per frame, which other load on a shared machine does not inflate) for the whole run and per tenth of
it, so a slow drift shows up as rising window medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VIDEO = REPO.parent / "shared" / "data" / "colonoscopy-video" / "video_coloscopy.mp4"
DEFAULT_BOX = (150.0, 120.0, 300.0, 260.0)  # around the polyp of the first frame (470 x 410 clip)


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("VmRSS not found in /proc/self/status")


class LoopedVideo:
    """A VideoReader look-alike that replays ``path`` until ``frames`` frames were produced."""

    def __init__(self, path: Path, frames: int) -> None:
        from imedsam_deploy.video import VideoReader

        first = VideoReader(path)
        self.path, self.frames = path, frames
        self.height, self.width, self.fps = first.height, first.width, first.fps
        first.close()
        self.loops = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        from imedsam_deploy.video import VideoReader

        done = 0
        while done < self.frames:
            reader = VideoReader(self.path)
            self.loops += 1
            try:
                for rgb in reader:
                    yield rgb
                    done += 1
                    if done >= self.frames:
                        return
            finally:
                reader.close()

    def close(self) -> None:
        pass


def tiny_artifact(folder: Path, input_size: int = 64, seed: int = 0) -> Path:
    """Export a seeded random tiny model (needs the training extras: torch)."""
    import torch

    from imedsam_export.api import export_artifact
    from imedsam_train.build import build

    torch.manual_seed(seed)
    model, _ = build("tiny", input_size=input_size)
    return export_artifact(None, folder, model=model.eval(), max_points=4096, batch=2, verify=False)


def _pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {"p50": round(float(np.percentile(a, 50)), 3), "p95": round(float(np.percentile(a, 95)), 3),
            "mean": round(float(a.mean()), 3)}


def measure(artifact: Path, video: Path, frames: int, box: tuple[float, float, float, float] = DEFAULT_BOX,
            warmup: int = 200, out_size: int | None = None, out_dir: Path | None = None, threads: int | None = None,
            windows: int = 10) -> dict[str, Any]:
    """Run ``frames`` frames of the looped clip through the video pipeline; return the figures."""
    from imedsam_deploy.backends.ort import OrtBackend
    from imedsam_deploy.infer import Prompts, run_video
    from imedsam_deploy.manifest import load_artifact
    from imedsam_deploy.outputs import OutputSet
    from imedsam_deploy.runtime import Segmenter
    from imedsam_deploy.tracking import TrackConfig

    if warmup >= frames:
        raise ValueError(f"warm-up ({warmup}) must be shorter than the run ({frames} frames)")
    art = load_artifact(artifact)
    backend = OrtBackend(art, "cpu", precision="fp32", threads=threads)
    seg = Segmenter(backend, art, query="box")
    reader = LoopedVideo(video, frames)
    rss: list[float] = []
    stamps: list[float] = []
    cpu: list[float] = []
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="long_video.")
        out_dir = Path(tmp.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        outs = OutputSet(out_dir, "video", reader.fps, (reader.width, reader.height))
        rss0 = rss_mb()
        t0, c0 = time.perf_counter(), time.process_time()

        def progress(done: int) -> None:
            stamps.append(time.perf_counter())
            cpu.append(time.process_time())
            rss.append(rss_mb())

        with backend:
            prompts = Prompts([np.asarray(box, np.float64)])
            info = run_video(seg, reader, prompts, outs, out_size,  # type: ignore[arg-type]  # duck-typed reader
                             TrackConfig(min_confidence=0.0, max_growth=0), progress)  # every mask reported
            outs.finish({"frames": info["frames"]})
        model_ms = [float(r["latency_ms"]) for r in outs.records()]
        written = len(list((out_dir / "masks").glob("*.png")))
    finally:
        if tmp is not None:
            tmp.cleanup()
    e2e_ms = list(np.diff([t0, *stamps]) * 1e3)
    cpu_ms = list(np.diff([c0, *cpu]) * 1e3)  # this process's CPU time: unlike wall time, not inflated by other load
    n = len(stamps)
    after_warmup = rss[warmup - 1]
    per = max(1, (n - warmup) // windows)
    win: list[dict[str, Any]] = []
    for k in range(warmup, n, per):
        sl = slice(k, min(k + per, n))
        win.append({"frames": [k, min(k + per, n)], "model_ms_p50": _pct(model_ms[sl])["p50"],
                    "e2e_ms_p50": _pct(e2e_ms[sl])["p50"], "cpu_ms_p50": _pct(cpu_ms[sl])["p50"],
                    "rss_mb": round(rss[sl.stop - 1], 1)})
    steady = [w["cpu_ms_p50"] for w in win]
    return {
        "artifact": str(artifact), "video": str(video), "frames": n, "loops": reader.loops, "warmup": warmup,
        "masks_written": written, "size": [reader.width, reader.height], "out_size": out_size, "box": list(box),
        "rss_mb": {"start": round(rss0, 1), "after_warmup": round(after_warmup, 1), "end": round(rss[-1], 1),
                   "peak": round(max(rss), 1), "growth_after_warmup": round(rss[-1] - after_warmup, 1),
                   "max_growth_after_warmup": round(max(rss[warmup:]) - after_warmup, 1)},
        "latency_ms": {"model": _pct(model_ms[warmup:]), "end_to_end": _pct(e2e_ms[warmup:]),
                       "cpu_per_frame": _pct(cpu_ms[warmup:])},
        "windows": win,
        # CPU time per frame, last tenth over first tenth after warm-up: ~1 when latency is steady
        "cpu_p50_last_over_first_window": round(steady[-1] / steady[0], 3) if steady and steady[0] else None,
        "seconds": round(stamps[-1] - t0, 1),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": sys.version.split()[0]},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, help="artifact folder (imedsam-export)")
    p.add_argument("--tiny", action="store_true", help="export a random tiny model (input 64) to a temp folder")
    p.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    p.add_argument("--frames", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--box", default=",".join(f"{v:g}" for v in DEFAULT_BOX), help="x0,y0,x1,y1 on the first frame")
    p.add_argument("--out-size", type=int, default=None, help="mask long side (default: the video's size)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    p.add_argument("--out", type=Path, default=None, help="keep the outputs here (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    a = p.parse_args(argv)
    box = tuple(float(v) for v in a.box.split(","))
    if len(box) != 4:
        p.error("--box needs four numbers")
    with tempfile.TemporaryDirectory(prefix="long_video_art.") as tmp:
        artifact = a.artifact
        if artifact is None:
            if not a.tiny:
                p.error("pass --artifact DIR or --tiny")
            artifact = tiny_artifact(Path(tmp) / "art")
        res = measure(artifact, a.video, a.frames, box, a.warmup, a.out_size, a.out, a.threads)  # type: ignore[arg-type]
    text = json.dumps(res, indent=2)
    if a.json is not None:
        a.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
