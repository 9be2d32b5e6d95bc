"""Latency and throughput of the deploy runtime, per stage and per backend (``imedsam-bench``).

One *frame* = ``batch`` images with one box each, from RGB uint8 to masks at the output size:
preprocess (the host's stretch-resize), encoder (one batched call, split at the artifact's max batch, the
float conversion included), decoder (every decoder call, chunked, or the backend's own planner / merge) and
postprocess (the rest: host UGS merge and sparse planning, mask assembly). Each configuration is warmed up,
then timed ``repeat`` times; p50/p95/p99 per stage and end to end. On a torch CUDA backend the encoder and
decoder stages are device-side (CUDA events, ``StageClock``), with no synchronisation inside a frame.

Query modes (see ``runtime`` and ``sparse``): ``full`` decodes every output pixel; ``box`` only the box
plus a margin; ``sparse`` the box plus margin, multiresolution (``sparse.py``).

With ``reference`` the released code's compute (``imedsam_cuda/reference.py``, eager PyTorch fp32, same
weights) runs on the same inputs, interleaved with ours repeat by repeat (a shared CPU drifts: the ratio
of interleaved runs is what is reported), and every row gets ``speedup_vs_reference`` and the pixel
agreement of its mask with the reference's (inside the box, and over the whole output).

Memory: ``peak_rss_mb`` is the process's peak resident set during a configuration's frames (the kernel's
VmHWM is reset before each frame). With ``reference`` the process also holds the PyTorch model and the
heap the reference freed but glibc kept, so measure memory without it.

torch, imedsam_export and the PyTorch GPU runtime (``imedsam_cuda``, found by name: ``backends.torch_part``)
are imported only inside the functions that need them (reference, ``--model``, the torch backends): the runtime
itself stays torch-free.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from imedsam_core.atomic import atomic_path, atomic_write_text
from imedsam_core.errors import UserError
from imedsam_core.paths import Choice
from imedsam_deploy import backends as registry
from imedsam_deploy.backends.base import Backend, Embedding
from imedsam_deploy.manifest import Artifact, load_artifact
from imedsam_deploy.preprocess import Region
from imedsam_deploy.runtime import DEFAULT_CHUNK, DEFAULT_MARGIN, QUERY_MODES, QueryMode, Segmenter
from imedsam_deploy.sparse import SparseConfig

STAGES = ("preprocess", "encoder", "decoder", "postprocess")
QUERIES = QUERY_MODES
RANDOM_SEED = 0


@dataclass
class BenchOptions:
    backends: list[str] | None = None  # None: every backend available here
    precision: str | None = None  # None: each backend's default (ONNX Runtime fp32, torch-cuda bf16)
    batches: tuple[int, ...] = (1,)
    out_sizes: tuple[int, ...] | None = None  # 0: the artifact's input size; None: default_out_sizes
    queries: tuple[str, ...] = ("sparse", "box")
    chunk: int | None = None  # decoder points per call (None: runtime default, capped at max_points)
    warmup: int = 1
    repeat: int = 10
    margin: float = DEFAULT_MARGIN
    sparse: SparseConfig = field(default_factory=SparseConfig)
    reference: bool = False
    threads: int | None = None
    tune: bool = False  # torch backends: time their switchable options first, keep and save the fastest


@dataclass
class Inputs:
    images: list[np.ndarray]  # RGB uint8
    boxes: list[np.ndarray]  # (4,) image pixels, one per image


@dataclass
class Timings:
    stages: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})
    total: list[float] = field(default_factory=list)
    points: int = 0
    decoder_s: float = 0.0


# ---------------------------------------------------------------- inputs
def synthetic_inputs(size: int, batch: int, seed: int = 0) -> Inputs:
    """Deterministic smooth RGB images with one bright blob each, and a box around the blob (~14% of the
    image, Kvasir-Sessile's mean box area)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    imgs, boxes = [], []
    for _ in range(batch):
        cx, cy = rng.uniform(0.35, 0.65, 2)
        r = 0.15
        blob = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (r / 1.5) ** 2)))
        base = 0.35 + 0.1 * np.sin(6 * xx + rng.uniform(0, 6)) * np.cos(5 * yy)
        rgb = np.stack([base + 0.5 * blob, base * 0.7 + 0.2 * blob, base * 0.5], axis=-1)
        imgs.append((np.clip(rgb, 0, 1) * 255).astype(np.uint8))
        half = 0.187 * size
        boxes.append(np.array([cx * size - half, cy * size - half, cx * size + half, cy * size + half]))
    return Inputs(imgs, boxes)


def file_inputs(path: Path, box: tuple[float, float, float, float] | None, batch: int) -> Inputs:
    from imedsam_deploy.boxes import fmt_box
    from imedsam_deploy.video import read_image

    rgb = read_image(path)  # the runtime's reader: refuses truncated files (cv2.imread half-decodes them)
    h, w = rgb.shape[:2]
    b = np.array(box if box is not None else (0.3 * w, 0.3 * h, 0.67 * w, 0.67 * h), dtype=np.float64)
    if not (np.all(np.isfinite(b)) and 0 <= b[0] < b[2] <= w and 0 <= b[1] < b[3] <= h):
        raise UserError(f"{path}: box {fmt_box(b)} is not inside the {w}x{h} image with positive area")
    return Inputs([rgb] * batch, [b] * batch)


# ---------------------------------------------------------------- statistics / machine
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
    return info


# ---------------------------------------------------------------- frame runner
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
        self.seg = Segmenter(self.timed, artifact, query=query, margin=opts.margin, chunk=opts.chunk or DEFAULT_CHUNK)
        self.seg.sparse_cfg = opts.sparse

    def run(self, inputs: Inputs, out_hw: tuple[int, int], t: Timings | None) -> list[np.ndarray]:
        """Masks (K, H, W) bool per image; stage times appended to ``t`` (when given).

        Images are encoded max_batch at a time and each group is decoded before the next is encoded: an
        embedding handle is only valid until the backend's next ``encode`` (TensorRT's point into one
        output buffer)."""
        seg = self.seg
        clock = self.clock
        t0 = time.perf_counter()
        pre_s = 0.0
        enc_marks = []
        self.timed.intervals.clear()
        points = 0
        masks = []
        mb = self.backend.max_batch
        for i in range(0, len(inputs.images), mb):
            tp = time.perf_counter()
            pixels = seg.pixels(inputs.images[i : i + mb])  # resized on the host; the rest in encode_pixels
            pre_s += time.perf_counter() - tp
            a = clock.mark()
            embs = seg.encode_pixels(pixels, [(int(im.shape[0]), int(im.shape[1])) for im in inputs.images[i : i + mb]])
            enc_marks.append((a, clock.mark()))
            for emb, im, box in zip(embs, inputs.images[i : i + mb], inputs.boxes[i : i + mb], strict=True):
                hw = (int(im.shape[0]), int(im.shape[1]))
                obj = seg.decode_box(emb, np.asarray(box, np.float64), hw, out_hw)
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


def agreement(ours: np.ndarray, ref: np.ndarray, box: np.ndarray, image_hw: tuple[int, int]) -> dict[str, float]:
    """Pixel agreement and Dice of the two masks inside the box (output frame) and over the whole output.

    The box figures are the ones to read for the box and sparse queries: they leave everything outside the box
    and its margin background, where the full-grid reference may not be (a random-weight model's masks spill
    far past the box), so the whole-output figures there measure the query mode, not the arithmetic."""
    out_h, out_w = ours.shape[-2:]
    h, w = image_hw
    x0, y0, x1, y1 = box
    c0, c1 = int(np.floor(x0 * out_w / w)), int(np.ceil(x1 * out_w / w))
    r0, r1 = int(np.floor(y0 * out_h / h)), int(np.ceil(y1 * out_h / h))
    a, b = ours[..., r0:r1, c0:c1], ref[..., r0:r1, c0:c1]
    return {"pixel_in_box": float((a == b).mean()), "pixel_all": float((ours == ref).mean()),
            "dice_in_box": _dice(a, b), "dice": _dice(ours, ref)}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / denom) if denom else 1.0


# ---------------------------------------------------------------- model / artifact resolution
def random_artifact(name: str, input_size: int, log: Callable[[str], None]) -> tuple[Path, Any]:
    """See ``imedsam_cuda.torch_models.random_artifact`` (torch is imported only there, only when asked)."""
    return registry.torch_part("random_artifact")(name, input_size, log)


def latest_artifact_of(name: str | None) -> Choice | None:
    """The default artifact (``paths.default_artifact``: a finished run's export, else the shipped model's); with
    an architecture ``name`` (``--model``), a finished run's export of it only: the shipped model is not what
    ``--model`` asks to time."""
    from imedsam_core.paths import default_artifact, finished_artifact

    art = default_artifact() if name is None else finished_artifact()
    if art is None or name is None:
        return art
    try:
        m = json.loads((art.path / "manifest.json").read_text())
        return art if m.get("model", {}).get("name") == name else None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------- backends
def open_backends(artifact: Artifact, names: list[str] | None, precision: str | None, model: Any | None,
                  threads: int | None, log: Callable[[str], None]) -> tuple[list[Backend], dict[str, str]]:
    """Open the requested backends (default: every registry backend usable here). Returns (opened, skipped)."""
    opened: list[Backend] = []
    skipped: dict[str, str] = {}
    wanted = names or list(registry.NAMES)
    for name in wanted:
        if name in ("torch-cuda", "torch-cpu") and model is not None:
            try:
                open_model = registry.torch_part("open_model")
                dev = "cuda" if name == "torch-cuda" else "cpu"
                prec = "fp32" if dev == "cpu" else (precision or "bf16")
                opened.append(open_model(model, dev, prec, artifact))  # as imedsam-infer opens it
            except UserError as e:
                skipped[name] = str(e)
            continue
        if name == "torch-cpu":
            skipped[name] = "needs an in-process model (--model)"
            continue
        if name not in registry.NAMES:
            raise UserError(f"unknown backend {name!r} (choose from {', '.join((*registry.NAMES, 'torch-cpu'))})")
        reason = registry.probe(name, artifact)
        if reason is not None:
            skipped[name] = reason
            continue
        try:
            if name == "ort-cpu":
                from imedsam_deploy.backends.ort import OrtBackend

                # with no --precision, the int8 encoder (the fastest CPU path) runs beside fp32 when exported
                precs = [precision] if precision else ["fp32", *(["int8"] if "int8" in artifact.graphs else [])]
                opened.extend(OrtBackend(artifact, "cpu", p, threads=threads) for p in precs)
            else:
                be, _ = registry.open_backend(name, artifact, precision)
                opened.append(be)
        except UserError as e:
            skipped[name] = str(e)
    for n, why in skipped.items():
        log(f"skipped {n}: {why}")
    if not opened:
        raise UserError(f"{artifact.path}: no backend could run here ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})")
    return opened, skipped


# ---------------------------------------------------------------- the benchmark
def default_out_sizes(input_size: int, reference: bool) -> tuple[int, ...]:
    """The input size first (the summary's row), then a third of it and 7/3 of it: the paper's 384 -> 128 / 896
    cross-resolution settings, so the latency-against-output-size plot has a curve. With the reference, the
    input size alone: the released code's full-grid compute at 896² takes minutes and gigabytes on a CPU."""
    if reference:
        return (input_size,)
    return (input_size, max(1, round(input_size / 3)), round(input_size * 7 / 3))


def run_bench(artifact_path: Path | Artifact, opts: BenchOptions, model: Any | None = None,
              inputs_for: Callable[[int, int], Inputs] | None = None,
              log: Callable[[str], None] = print,
              progress: Any = None) -> dict[str, Any]:
    """Benchmark ``artifact_path`` (or an already loaded / in-process ``Artifact``); ``model`` (the same
    weights, in-process) enables torch backends and the reference without a checkpoint. Returns the JSON-able
    report."""
    artifact = artifact_path if isinstance(artifact_path, Artifact) else load_artifact(artifact_path)
    s = artifact.input_size
    if opts.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(opts.threads))
    for q in opts.queries:
        if q not in QUERIES:
            raise UserError(f"query mode {q!r} not one of {', '.join(QUERIES)}")
    backends, skipped = open_backends(artifact, opts.backends, opts.precision, model, opts.threads, log)
    ref = None
    ref_model = None
    if opts.reference:
        reference_runner, torch_model_for = registry.torch_part("reference_runner"), registry.torch_part("torch_model_for")
        ref_model = model if model is not None else torch_model_for(artifact)
        ref = reference_runner(ref_model, opts.threads)
    make_inputs = inputs_for or (lambda size, batch: synthetic_inputs(size, batch))
    sizes = opts.out_sizes or default_out_sizes(s, opts.reference)
    tunings = tune_backends(backends, artifact, opts, make_inputs(s, opts.batches[0]), sizes[0] or s, log) \
        if opts.tune else []
    results: list[dict[str, Any]] = []
    reference_rows: list[dict[str, Any]] = []
    rounds = 0
    if progress is not None:  # cli_common.Progress: timed rounds done, their rate and the time left
        progress.set_total(len(opts.batches) * len(sizes) * (opts.warmup + opts.repeat))
    for batch in opts.batches:
        for out_size in sizes:
            osz = out_size or s
            out_hw = (osz, osz)
            inputs = make_inputs(s, batch)
            runners = [(b, q, FrameRunner(b, artifact, cast(QueryMode, q), opts))  # queries checked above
                       for b in backends for q in opts.queries]
            timings = [Timings() for _ in runners]
            ref_times: list[float] = []
            ref_masks = None
            peaks: list[float] = [0.0] * len(runners)
            gpu_peaks: list[float | None] = [None] * len(runners)
            for i in range(opts.warmup + opts.repeat):
                timed = i >= opts.warmup
                for j, (be, _q, fr) in enumerate(runners):
                    reset_peak_rss()
                    torch_mod: Any = getattr(be, "torch", None)
                    on_gpu = torch_mod is not None and getattr(be, "device", None).type == "cuda"  # type: ignore[union-attr]
                    if on_gpu:
                        torch_mod.cuda.reset_peak_memory_stats()
                    fr.run(inputs, out_hw, timings[j] if timed else None)
                    peaks[j] = max(peaks[j], peak_rss_mb())
                    if on_gpu:
                        gpu_peaks[j] = max(gpu_peaks[j] or 0.0, torch_mod.cuda.max_memory_allocated() / 2**20)
                if ref is not None and (timed or i == 0):
                    # the reference is slow: one warm-up pass at most, then interleaved with ours
                    masks = ref.run(inputs, out_hw, ref_times if timed else None)
                    ref_masks = ref_masks if ref_masks is not None else masks
                rounds += 1
                if progress is not None:
                    progress.update(rounds)
            ref_e2e = percentiles(ref_times) if ref_times else None
            if ref_e2e is not None:
                reference_rows.append({"batch": batch, "out_size": osz, "e2e_ms": ref_e2e,
                                       "fps": batch / ref_e2e["p50"] * 1e3})
            for j, (be, q, fr) in enumerate(runners):
                t = timings[j]
                e2e = percentiles(t.total)
                row: dict[str, Any] = {
                    "backend": be.name, "description": be.description, "precision": getattr(be, "precision", opts.precision),
                    "query": q, "batch": batch, "out_size": osz,
                    "stages_ms": {st: percentiles(t.stages[st]) for st in STAGES}, "e2e_ms": e2e,
                    "fps": batch / e2e["p50"] * 1e3,
                    "decoder_points_per_frame": t.points / max(1, len(t.total)),
                    "decoder_points_per_s": t.points / t.decoder_s if t.decoder_s > 0 else None,
                    "peak_rss_mb": peaks[j], "gpu_peak_mb": gpu_peaks[j],
                }
                if ref_e2e is not None and ref_masks is not None:
                    row["reference_e2e_p50_ms"] = ref_e2e["p50"]
                    # ratio of the interleaved per-repeat times (robust to CPU drift), and of the p50s
                    ratios = [a / b for a, b in zip(ref_times, t.total, strict=False)]
                    row["speedup_vs_reference"] = float(np.median(ratios))
                    row["speedup_p50_ratio"] = ref_e2e["p50"] / e2e["p50"]
                    ours = fr.run(inputs, out_hw, None)
                    agrees = [agreement(o, r, b, im.shape[:2])
                              for o, r, b, im in zip(ours, ref_masks, inputs.boxes, inputs.images, strict=True)]
                    row["agreement"] = {k: float(np.mean([a[k] for a in agrees])) for k in agrees[0]}
                results.append(row)
                log(_row_line(row))
    for b in backends:
        b.close()
    report: dict[str, Any] = {
        "format": "imedsam-bench", "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(), "artifact": str(artifact.path), "model": artifact.manifest.get("model", {}).get("name"),
        "input_size": s,
        "settings": {"precision": opts.precision, "batches": list(opts.batches),
                     "out_sizes": [o or s for o in sizes], "queries": list(opts.queries),
                     "chunk": opts.chunk or DEFAULT_CHUNK, "warmup": opts.warmup, "repeat": opts.repeat,
                     "margin": opts.margin, "sparse": opts.sparse.__dict__, "threads": opts.threads,
                     "reference_device": str(ref.device) if ref else None},
        "skipped": skipped, "results": results, "reference": reference_rows,
        "backends": summarise(results),
    }
    if opts.tune:
        report["tuning"] = tunings
    return report


def tune_backends(backends: list[Backend], artifact: Artifact, opts: BenchOptions, inputs: Inputs, out_size: int,
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    """``--tune``: each torch backend's switchable options timed on the first query, batch and output size
    (``imedsam_cuda.torch_tuning``), the fastest kept for the timed rows and saved for the next run. The tunings."""
    tuner = registry.torch_part("tuning")  # the module; ``tuning`` below is one backend's result

    tunable: list[Any] = [b for b in backends if b.name in ("torch-cuda", "torch-cpu")]  # TorchBackends
    if not tunable:
        raise UserError(f"--tune: it tunes the torch backends (torch-cuda, or torch-cpu with --model), and none of "
                        f"{', '.join(b.name for b in backends)} is one")
    out: list[dict[str, Any]] = []
    for be in tunable:
        tuner.apply(be, be.built_settings)  # from the settings it was built with (not a tuning applied when it opened)
        fr = FrameRunner(be, artifact, cast(QueryMode, opts.queries[0]), opts)
        log(f"tuning {be.name} on {opts.queries[0]} frames, batch {len(inputs.images)}, {out_size}² output")

        def frame(fr: FrameRunner = fr) -> list[np.ndarray]:
            return fr.run(inputs, (out_size, out_size), None)

        # at most 10 timed frames a setting a round: alternated over two rounds, enough on a GPU's replayed graphs
        tuning = tuner.tune(be, frame, repeat=min(10, max(3, opts.repeat)), warmup=max(1, opts.warmup), log=log)
        tuning.tuned_on = {"query": opts.queries[0], "batch": len(inputs.images), "out_size": out_size}
        path = tuner.tuning_path(be, tuner.default_root())
        tuner.save(tuning, path)
        be.tuned_from = path
        log(f"tuned {be.name}: {', '.join(k for k, v in tuning.settings.items() if v) or 'every option off'} "
            f"(saved to {path})")
        out.append({"path": str(path), **tuning.to_json()})
    return out


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per backend: its fastest row at the first (batch, out_size): e2e p50, speed-up, agreement."""
    out: dict[str, Any] = {}
    if not results:
        return out
    first = (results[0]["batch"], results[0]["out_size"])
    for r in results:
        if (r["batch"], r["out_size"]) != first:
            continue
        cur = out.get(r["backend"])
        if cur is None or r["e2e_ms"]["p50"] < cur["e2e_p50_ms"]:
            out[r["backend"]] = {
                "precision": r.get("precision"), "query": r["query"], "batch": r["batch"], "out_size": r["out_size"],
                "e2e_p50_ms": r["e2e_ms"]["p50"], "fps": r["fps"],
                "speedup_vs_reference": r.get("speedup_vs_reference"),
                "pixel_agreement": (r.get("agreement") or {}).get("pixel_in_box"),
                "agreement": r.get("agreement"),
            }
    return out


def label(r: dict[str, Any]) -> str:
    """A result row's backend and precision, e.g. 'ort-cpu int8'."""
    return f"{r['backend']} {r['precision']}" if r.get("precision") else str(r["backend"])


def _row_line(r: dict[str, Any]) -> str:
    st = " ".join(f"{k[:3]} {r['stages_ms'][k]['p50']:.1f}" for k in STAGES)
    extra = ""
    if "speedup_vs_reference" in r:
        ag = r["agreement"]
        extra = (f"  x{r['speedup_vs_reference']:.1f} vs ref, agree {100 * ag['pixel_in_box']:.2f}% in box, "
                 f"Dice {ag['dice_in_box']:.4f} in box")
    return (f"{label(r):<15} {r['query']:<6} b{r['batch']:<3} {r['out_size']:>5}^2  e2e p50 "
            f"{r['e2e_ms']['p50']:.1f} ms ({st}){extra}")


# ---------------------------------------------------------------- outputs
def table(report: dict[str, Any]) -> list[list[str]]:
    rows = [["backend", "query", "batch", "out", "pre", "enc", "dec", "post", "e2e p50", "p95", "p99", "fps",
             "Mpts/s", "rss MB", "speedup", "agree box"]]
    for r in report["results"]:
        st = r["stages_ms"]
        pts = r["decoder_points_per_s"]
        rows.append([
            label(r), r["query"], str(r["batch"]), str(r["out_size"]),
            *(f"{st[k]['p50']:.1f}" for k in STAGES),
            f"{r['e2e_ms']['p50']:.1f}", f"{r['e2e_ms']['p95']:.1f}", f"{r['e2e_ms']['p99']:.1f}", f"{r['fps']:.1f}",
            f"{pts / 1e6:.2f}" if pts else "-", f"{r['peak_rss_mb']:.0f}",
            f"{r['speedup_vs_reference']:.1f}x" if r.get("speedup_vs_reference") else "-",
            f"{100 * r['agreement']['pixel_in_box']:.2f}%" if r.get("agreement") else "-",
        ])
    for ref in report["reference"]:
        rows.append(["reference", "full", str(ref["batch"]), str(ref["out_size"]), "", "", "", "",
                     f"{ref['e2e_ms']['p50']:.1f}", f"{ref['e2e_ms']['p95']:.1f}", f"{ref['e2e_ms']['p99']:.1f}",
                     f"{ref['fps']:.2f}", "-", "-", "1.0x", "100%"])
    return rows


def csv_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for r in report["results"]:
        row: dict[str, Any] = {k: r[k] for k in ("backend", "precision", "query", "batch", "out_size", "fps",
                                                 "decoder_points_per_frame", "decoder_points_per_s",
                                                 "peak_rss_mb", "gpu_peak_mb")}
        for st in STAGES:
            for p in ("p50", "p95", "p99"):
                row[f"{st}_{p}_ms"] = r["stages_ms"][st][p]
        for p in ("p50", "p95", "p99"):
            row[f"e2e_{p}_ms"] = r["e2e_ms"][p]
        row["speedup_vs_reference"] = r.get("speedup_vs_reference")
        row["pixel_agreement_in_box"] = (r.get("agreement") or {}).get("pixel_in_box")
        row["dice_in_box"] = (r.get("agreement") or {}).get("dice_in_box")
        out.append(row)
    return out


def write_outputs(report: dict[str, Any], json_path: Path | None, csv_path: Path | None,
                  png_path: Path | None) -> None:
    if json_path is not None:
        atomic_write_text(json_path, json.dumps(report, indent=2) + "\n")
    if csv_path is not None:
        rows = csv_rows(report)
        with atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
            if rows:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
    if png_path is not None:
        plot(report, png_path)


def plot(report: dict[str, Any], path: Path) -> None:
    """Left: stacked per-stage p50 per backend/query (first batch and output size). Right: e2e p50 vs output
    size per backend/query (first batch), with the reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    if res:
        b0, o0 = res[0]["batch"], res[0]["out_size"]
        sel = [r for r in res if r["batch"] == b0 and r["out_size"] == o0]
        labels = [f"{label(r)}\n{r['query']}" for r in sel]
        bottom = np.zeros(len(sel))
        for st in STAGES:
            v = np.array([r["stages_ms"][st]["p50"] for r in sel])
            a1.bar(labels, v, bottom=bottom, label=st)
            bottom += v
        a1.set_ylabel("ms (p50)")
        a1.set_title(f"latency per stage, batch {b0}, {o0}x{o0} output")
        a1.legend()
        keys = sorted({(label(r), r["query"]) for r in res if r["batch"] == b0})
        for k in keys:
            pts = sorted((r["out_size"], r["e2e_ms"]["p50"]) for r in res if r["batch"] == b0 and (label(r), r["query"]) == k)
            a2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{k[0]} {k[1]}")
        refs = sorted((r["out_size"], r["e2e_ms"]["p50"]) for r in report["reference"] if r["batch"] == b0)
        if refs:
            a2.plot([p[0] for p in refs], [p[1] for p in refs], marker="s", color="k", label="reference")
        a2.set_xlabel("output size (pixels per side)")
        a2.set_ylabel("end-to-end ms (p50)")
        a2.set_yscale("log")
        a2.set_title(f"latency vs output size, batch {b0}")
        a2.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


__all__ = ["BenchOptions", "Inputs", "run_bench", "synthetic_inputs", "file_inputs", "write_outputs", "table",
           "random_artifact", "latest_artifact_of", "agreement"]
