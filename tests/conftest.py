"""Shared fixtures: tiny configs, the real data in ../shared/data (tests may read it; the product may not)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("IMEDSAM_SHARED_DATA", REPO.parent / "shared" / "data"))
SAMPLE_DATA = REPO / "data" / "sample" / "kvasir-sessile"


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process a test starts: this one's as it is now (a test may have set a variable),
    plus ``extra``, with the repository first on the path and whatever the path had after it."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **extra, "PYTHONPATH": path}


def run_in_triton_interpreter(script: str) -> dict:
    """Run ``script`` (which prints one JSON object last) in a subprocess with ``TRITON_INTERPRET=1``: Triton
    kernels then run on the CPU. The interpreter must be on before a kernel is defined, hence the process."""
    import json
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=child_env(TRITON_INTERPRET="1"), cwd=REPO,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """``build(path)`` run once per test session, whichever pytest-xdist worker asks first; the others wait for it
    and share the result. For what several modules need alike (a tiny export takes half a minute on one core).
    ``build`` must create ``path`` atomically (the exporter and ``save_checkpoint`` do): it exists only whole."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's base is a folder of this session's root, which they share; alone, the base is it
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = root / f"built-once-{name}"
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            build(path)
    assert path.exists(), path
    return path


def encode_once(model: Any) -> Callable[[Any], Any]:
    """``model.encode`` remembered per input (its bytes): a test that reads one image several ways pays one
    encoder pass (1.7 s on a core for the lite model) for each distinct input, not each read-out."""
    seen: dict[bytes, Any] = {}

    def encode(x: Any) -> Any:
        key = x.numpy().tobytes()
        if key not in seen:
            seen[key] = model.encode(x)
        return seen[key]

    return encode


def not_interpreted() -> None:
    """For the tests that need Triton's compiler or its absence, not its interpreter."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.fail("run this test without TRITON_INTERPRET")


def triton_before(major: int, minor: int) -> bool:
    """Whether the installed Triton is older than major.minor (the device image's 3.6 lays some kernels out
    otherwise than our 3.8: benchmarks/HISTORY.md, session 11)."""
    import triton

    return tuple(int(v) for v in triton.__version__.split(".")[:2]) < (major, minor)


def pytest_configure(config: pytest.Config) -> None:
    try:
        import torch
    except ImportError:  # the serving tests' environment is torch-free
        return

    from imedsam_core.malloc import keep_freed_memory

    keep_freed_memory()  # the tests run the torch commands in process (CliRunner): malloc as their main() sets it

    # Under pytest-xdist the cores are shared between the workers: more threads than cores only contend.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


# three real Kvasir-Sessile test images the pretrained-base tests check against
SESSILE_STEMS = ("cju14g8o4xui30878gkgbrvqj", "cju16whaj0e7n0855q7b6cjkm", "cju1b0y2e396p08558ois175d")


@pytest.fixture(scope="session")
def sessile(shared_data: Path) -> Path:
    d = shared_data / "Kvasir-Sessile"
    if not (d / "images").is_dir():
        pytest.fail(f"real Kvasir-Sessile data missing at {d}")
    return d


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real test data missing at {SHARED_DATA} (set IMEDSAM_SHARED_DATA)")
    return SHARED_DATA


def read_rgb(path: Path) -> np.ndarray:
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, path
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def read_mask(path: Path) -> np.ndarray:
    import cv2

    m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert m is not None, path
    return m > 127


REAL_VIDEO = SHARED_DATA / "colonoscopy-video" / "video_coloscopy.mp4"


def cut_video(path: Path, frames: int, source: Path = REAL_VIDEO) -> Path:
    """The first ``frames`` frames of the real colonoscopy clip, as a near-lossless MJPG AVI at ``path``."""
    import cv2

    cap = cv2.VideoCapture(str(source))
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    w = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 30.0, size)
    try:
        for _ in range(frames):
            ok, frame = cap.read()
            assert ok, f"{source}: fewer than {frames} frames"
            w.write(frame)
    finally:
        w.release()
        cap.release()
    return path


@pytest.fixture(scope="session")
def shipped_artifact(tmp_path_factory) -> Path:
    """The shipped tiny Kvasir weights exported (fp32, no parity run): masks that mean something."""
    from imedsam_export.api import export_artifact

    ck = REPO / "imedsam_train" / "weights" / "imedsam_tiny_kvasir.pt"
    return built_once(tmp_path_factory, "shipped-art",
                      lambda out: export_artifact(ck, out, max_points=16384, verify=False))
