"""Long runs and determinism.

- Video inference over the real colonoscopy clip, looped (benchmarks/long_video.py: the imedsam-infer video
  path with its outputs written), keeps host RSS flat after warm-up: a short run in CI (catches a leak of a
  frame per frame), the 5,000-frame run behind the ``slow`` marker (figures in benchmarks/RESULTS.md).
- The same input gives bit-identical masks on the CPU backend in two separate processes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO, child_env, cut_video
from tests.reliability_helpers import (
    GOOD_BOX,
    SAMPLE_IMAGES,
    VIDEO,
    console_argv,
    tiny_artifact,
)

MAX_GROWTH_MB = 50.0


def _long_video():
    spec = importlib.util.spec_from_file_location("long_video", REPO / "benchmarks" / "long_video.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _check(res: dict, frames: int) -> None:
    assert res["frames"] == frames and res["masks_written"] == frames
    growth = res["rss_mb"]["max_growth_after_warmup"]
    assert growth < MAX_GROWTH_MB, json.dumps(res["rss_mb"])
    print(json.dumps({k: res[k] for k in ("frames", "loops", "rss_mb", "latency_ms")}))


def _cut(path: Path, frames: int) -> Path:
    """The first ``frames`` frames of the real clip (MJPG AVI)."""
    return cut_video(path, frames, VIDEO)


def test_short_looped_video_keeps_memory_flat(tmp_path_factory, tmp_path):
    """150 frames: a 60-frame cut of the real clip looped (the reader is reopened twice). A leak of one
    470x410 frame per frame would add ~58 MB over the 100 frames after warm-up."""
    clip = _cut(tmp_path / "cut.avi", 60)
    res = _long_video().measure(tiny_artifact(tmp_path_factory), clip, frames=150, warmup=50, out_size=64, threads=1)
    assert res["loops"] == 3
    _check(res, 150)


@pytest.mark.slow
def test_5000_frame_looped_video_keeps_memory_flat(tmp_path_factory):
    res = _long_video().measure(tiny_artifact(tmp_path_factory), VIDEO, frames=5000, warmup=200, out_size=96,
                                threads=1)
    _check(res, 5000)


# ------------------------------------------------------------------ determinism

def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((folder / "masks").glob("*.png"))}


def test_cpu_backend_masks_are_bit_identical_across_processes(tmp_path_factory, tmp_path):
    art = tiny_artifact(tmp_path_factory)
    images = tmp_path / "images"
    images.mkdir()
    for img in SAMPLE_IMAGES[:3]:
        (images / img.name).write_bytes(img.read_bytes())
    clip = _cut(tmp_path / "clip.avi", 12)  # real frames, so tracking (box from the previous mask) is covered

    runs = []
    for k in range(2):
        for name, inp, box in (("images", images, GOOD_BOX), ("video", clip, "150,120,300,260")):
            out = tmp_path / f"{name}{k}"
            runs.append((name, out, subprocess.Popen(
                console_argv("imedsam-infer", [str(inp), "--box", box, "--artifact", str(art), "--out", str(out),
                                               "--backend", "ort-cpu", "--min-confidence", "0", "--out-size", "128",
                                               "-q"]),
                cwd=tmp_path, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
    for _, _, proc in runs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()[-2000:]
    for name in ("images", "video"):
        a, b = _digests(tmp_path / f"{name}0"), _digests(tmp_path / f"{name}1")
        assert len(a) == (3 if name == "images" else 12) and a == b
        ra = json.loads((tmp_path / f"{name}0" / "results.json").read_text())["records"]
        rb = json.loads((tmp_path / f"{name}1" / "results.json").read_text())["records"]
        keys = ("frame", "object", "status", "x0", "y0", "x1", "y1", "area", "mean_probability", "queried_points")
        assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]
