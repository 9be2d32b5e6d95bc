"""Clocks, memory and the frame runner: one frame's stage times, as ``imedsam-infer`` runs the frame.

One *frame* = ``batch`` images with one box each, from RGB uint8 to masks at the output size:
preprocess (the host's stretch-resize), encoder (one batched call, split at the artifact's max batch, the
float conversion included), decoder (every decoder call, chunked, or the backend's own planner / merge) and
postprocess (the rest: host UGS merge and sparse planning, mask assembly). On a torch CUDA backend the encoder
and decoder stages are device-side (CUDA events, ``StageClock``), with no synchronisation inside a frame.

Memory: ``peak_rss_mb`` is the process's peak resident set (the kernel's VmHWM, reset before each frame by
``reset_peak_rss``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imedsam_core import malloc
from imedsam_deploy.backends.base import Backend, Embedding
from imedsam_deploy.bench.inputs import Inputs
from imedsam_deploy.bench.options import BenchOptions
from imedsam_deploy.manifest import Artifact
from imedsam_deploy.preprocess import Region
from imedsam_deploy.runtime import DEFAULT_CHUNK, QueryMode, Segmenter

STAGES = ("preprocess", "encoder", "decoder", "postprocess")


@dataclass
class Timings:
    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    total: list[float] = field(default_factory=list)
    points: int = 0
    decoder_s: float = 0.0


def percentiles(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)),
            "p99": float(np.percentile(a, 99)), "mean": float(a.mean()), "n": int(a.size)}


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) so each row reports its own peak (Linux only)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    try:
        from imedsam_deploy.backends.openvino import bf16_matmul_kernel, cpu_name, openvino_version

        info["openvino"] = openvino_version()
        info["cpu"] = cpu_name()  # the brand string (platform.processor() is often just the architecture)
        info["openvino_bf16_kernel"] = bf16_matmul_kernel()  # with "cpu", says whether ov-cpu defaults to bf16
    except ImportError:
        pass
    # settings that change which CPU kernels run, recorded so a result says what it measured
    info["env"] = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS", malloc.ENV) if k in os.environ}
    info["malloc"] = malloc.state  # None: torch never loaded, malloc as glibc's (imedsam_core.malloc)
    return info

class StageClock:
    """Stage boundaries within a frame. On a torch CUDA backend, CUDA events recorded on its stream (device-side
    timing): nothing inside a frame synchronises, so the frame runs as ``imedsam-infer`` runs it, the host
    queueing the next graph while the GPU runs the last, and its end-to-end time is not inflated by the stage
    split. Elsewhere, host clock readings (ONNX Runtime and TensorRT calls return with their outputs on the
    host)."""

    def __init__(self, backend: Backend) -> None:
        torch = getattr(backend, "torch", None)
        dev = getattr(backend, "device", None)
        self.torch = torch if torch is not None and getattr(dev, "type", None) == "cuda" else None
        self.dev = dev

    def mark(self) -> Any:
        if self.torch is None:
            return time.perf_counter()
        ev = self.torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def seconds(self, a: Any, b: Any) -> float:
        """Between two marks (waits for the later one on a GPU)."""
        if self.torch is None:
            return float(b - a)
        b.synchronize()
        return float(a.elapsed_time(b)) / 1e3

    def sync(self) -> None:
        if self.torch is not None:
            self.torch.cuda.synchronize(self.dev)


class TimedDecode(Backend):
    """A backend whose ``decode`` calls are timed: the decoder stage is the time spent inside them (the
    sparse planner's and the UGS merge's numpy work around them is postprocessing)."""

    def __init__(self, inner: Backend, clock: StageClock) -> None:
        super().__init__(inner.max_batch, inner.max_points)
        self.inner, self.clock = inner, clock
        self.intervals: list[tuple[Any, Any]] = []  # (start, end) marks of this frame's decoder calls
        self.name = inner.name

    def seconds(self) -> float:
        return sum(self.clock.seconds(a, b) for a, b in self.intervals)

    def encode(self, images: np.ndarray) -> Sequence[Embedding]:
        return self.inner.encode(images)

    def encode_pixels(self, pixels: np.ndarray) -> Sequence[Embedding]:
        return self.inner.encode_pixels(pixels)

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        a = self.clock.mark()
        out = fn(*args)
        self.intervals.append((a, self.clock.mark()))
        return out

    def decode(self, embedding: Embedding, boxes: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self._timed(self.inner.decode, embedding, boxes, coords)  # type: ignore[no-any-return]

    # a backend's own merge or planner counts as decoder time, like the decoder calls inside it
    def decode_merged(self, embedding: Embedding, boxes: np.ndarray, region: Region, out_hw: tuple[int, int],
                      chunk: int, k: int) -> np.ndarray | None:
        return self._timed(self.inner.decode_merged, embedding, boxes, region, out_hw,  # type: ignore[no-any-return]
                           chunk, k)

    def sparse_region(self, embedding: Embedding, boxes: np.ndarray, region: tuple[int, int, int, int],
                      out_hw: tuple[int, int], fraction: float, cfg: Any) -> tuple[np.ndarray, int] | None:
        return self._timed(self.inner.sparse_region, embedding, boxes, region, out_hw,  # type: ignore[no-any-return]
                           fraction, cfg)


class FrameRunner:
    """Runs one frame on one backend in one query mode through the runtime's ``Segmenter``, recording stage
    times: what is timed is what ``imedsam-infer`` runs."""

    def __init__(self, backend: Backend, artifact: Artifact, query: QueryMode, opts: BenchOptions) -> None:
        self.backend, self.s, self.k_cls = backend, artifact.input_size, artifact.num_classes
        self.clock = StageClock(backend)
        self.timed = TimedDecode(backend, self.clock)
        self.seg = Segmenter(self.timed, artifact, query=query, margin=opts.margin, chunk=opts.chunk or DEFAULT_CHUNK,
                             tta=opts.tta)
        self.seg.sparse_cfg = opts.sparse

    def run(self, inputs: Inputs, out_hw: tuple[int, int], t: Timings | None) -> list[np.ndarray]:
        """Masks (K, H, W) bool per image; stage times appended to ``t`` (when given).

        Images are encoded max_batch at a time and each group is decoded before the next is encoded: an
        embedding handle is only valid until the backend's next ``encode`` (TensorRT's point into one
        output buffer). With tta each image goes in with its mirror (max_batch // 2 images a call; the mirror
        is made in preprocessing) and each box is decoded on both (``Segmenter.decode_frame_box``)."""
        seg = self.seg
        clock = self.clock
        t0 = time.perf_counter()
        pre_s = 0.0
        enc_marks = []
        self.timed.intervals.clear()
        points = 0
        masks = []
        per, mb = seg.per_image, seg.images_per_call
        for i in range(0, len(inputs.images), mb):
            group = inputs.images[i : i + mb]
            tp = time.perf_counter()
            flat = seg.frame_images(group)
            pixels = seg.pixels(flat)  # resized on the host; the rest in encode_pixels
            pre_s += time.perf_counter() - tp
            a = clock.mark()
            embs = seg.encode_pixels(pixels, [(int(im.shape[0]), int(im.shape[1])) for im in flat])
            enc_marks.append((a, clock.mark()))
            for j, (im, box) in enumerate(zip(group, inputs.boxes[i : i + mb], strict=True)):
                hw = (int(im.shape[0]), int(im.shape[1]))
                obj = seg.decode_frame_box(embs[j * per : (j + 1) * per], np.asarray(box, np.float64), hw, out_hw)
                m = np.zeros((self.k_cls, *out_hw), dtype=bool)
                r = obj.region
                m[:, r.r0 : r.r1, r.c0 : r.c1] = obj.logits > 0
                masks.append(m)
                points += obj.queried
        clock.sync()  # (the masks are on the host already: nothing is left to wait for)
        total_s = time.perf_counter() - t0
        # stage split: preprocess (host), encoder and decoder (device-side on a GPU), the rest
        enc_s = sum(clock.seconds(a, b) for a, b in enc_marks)
        dec_s = self.timed.seconds()
        if t is not None:
            t.stages["preprocess"].append(pre_s * 1e3)
            t.stages["encoder"].append(enc_s * 1e3)
            t.stages["decoder"].append(dec_s * 1e3)
            t.stages["postprocess"].append(max(0.0, total_s - pre_s - enc_s - dec_s) * 1e3)
            t.total.append(total_s * 1e3)
            t.points += points
            t.decoder_s += dec_s
        return masks
