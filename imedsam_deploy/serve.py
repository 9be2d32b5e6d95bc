"""``imedsam-serve``: the torch-free runtime behind NVIDIA Triton Inference Server, through PyTriton.

Three models, each answering over HTTP and gRPC (tritonclient, or ``imedsam_deploy.client``):

    segment   image (H, W, 3) uint8, boxes (K, 4) float32 in image pixels [, out_size (2,) int32 (H, W)]
              -> masks (K, oh, ow) uint8 0/1, status (K,) bytes, mean_probability (K,) float32
    encode    image (H, W, 3) uint8 -> handle (1,) bytes: the embedding, kept in a bounded LRU cache with a
              time-to-live; dynamically batched, so concurrent encodes share one encoder call
    decode    handle (1,) bytes, boxes (K, 4) float32 [, out_size] -> as segment

``segment`` and ``decode`` run exactly ``Segmenter.segment`` / ``segment_embedded`` (what imedsam-infer
runs), so their masks are the in-process ones; with the Segmenter's tta (``imedsam-serve --tta``) a handle keeps
the image's embedding and its mirror's, encoded in one call. Bad requests are refused with an error response and the
model keeps serving. PyTriton fails every request of a batch when its callable raises, so only ``encode``
is batched: its refusals depend on the image's shape alone, and Triton's batcher only puts requests of one
shape together, so a batch is all good or all bad. ``segment`` and ``decode`` get one request per call.

Health, readiness and metrics are Triton's own (``/v2/health/live``, ``/v2/health/ready``, ``/metrics``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imedsam_core.errors import UserError
from imedsam_deploy.backends.base import Embedding
from imedsam_deploy.boxes import check_box_values, validate_box
from imedsam_deploy.runtime import ObjectMask, Segmenter
from imedsam_deploy.triton_leftovers import Leftovers, adopt_orphans

LOG = logging.getLogger("imedsam.serve")

SEGMENT, ENCODE, DECODE = "segment", "encode", "decode"
IN_IMAGE, IN_BOXES, IN_OUT_SIZE, IN_HANDLE = "image", "boxes", "out_size", "handle"
OUT_MASKS, OUT_STATUS, OUT_PROB, OUT_HANDLE = "masks", "status", "mean_probability", "handle"
MAX_SIDE = 16384  # pixels a side, of an image or of an output mask
ALIVE_POLL_S = 1.0  # how often serve() checks that tritonserver and its models are still up
INTERRUPT_EVERY_S = 0.5  # how often a start-up whose tritonserver died is interrupted, until it ends


class ServerDied(RuntimeError):
    """tritonserver exited while the server started."""


class RequestError(ValueError):
    """A refused request: its message goes back to the client as the error response."""


@dataclass(frozen=True)
class ServeLimits:
    max_boxes: int = 16
    max_out_pixels: int = 4096 * 4096  # one mask
    max_response_bytes: int = 64 << 20  # all masks of one response
    cache_size: int = 64  # embeddings kept for decode
    ttl_s: float = 600.0  # an embedding unused this long is dropped
    min_confidence: float = 0.6  # mean probability below this: status "low-confidence"


@dataclass
class _Entry:
    image_hw: tuple[int, int]
    embeddings: list[Embedding] | None  # the image's (and with tta its mirror's); None where the backend's
    # handles do not outlive its next encode
    pixels: np.ndarray | None  # (1 or 2, S, S, 3): the resized image(s), to encode again in that case
    used: float


class EmbeddingCache:
    """handle -> embedding, least recently used dropped first, and any unused for ``ttl_s``. Thread-safe."""

    def __init__(self, size: int, ttl_s: float, clock: Any = time.monotonic) -> None:
        self.size, self.ttl_s, self.clock = size, ttl_s, clock
        self._items: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, entry: _Entry) -> str:
        handle = uuid.uuid4().hex
        with self._lock:
            self._expire()
            self._items[handle] = entry
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return handle

    def get(self, handle: str) -> _Entry:
        with self._lock:
            self._expire()
            entry = self._items.get(handle)
            if entry is None:
                raise RequestError(f"handle {handle[:40]!r}: unknown or expired (encode the image again)")
            entry.used = self.clock()
            self._items.move_to_end(handle)
            return entry

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self) -> None:
        now = self.clock()
        for h in [h for h, e in self._items.items() if now - e.used > self.ttl_s]:
            del self._items[h]


@dataclass
class ServeStats:
    """What the server did: encoder batch sizes Triton formed (images per ``encode`` call), requests, refusals."""

    encode_batches: Counter[int] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        sizes = ", ".join(f"{b}x{n}" for b, n in sorted(self.encode_batches.items())) or "none"
        reqs = ", ".join(f"{m} {n}" for m, n in sorted(self.requests.items())) or "none"
        refused = sum(self.refused.values())
        return f"requests: {reqs}; refused: {refused}; encode batch sizes (size x calls): {sizes}"


def _bytes_array(values: Sequence[str]) -> np.ndarray:
    return np.array([v.encode() for v in values], dtype=np.object_)


class Service:
    """The models' work on plain numpy requests; no Triton here, so it is tested and timed on its own."""

    def __init__(self, seg: Segmenter, limits: ServeLimits | None = None) -> None:
        self.seg = seg
        self.limits = limits or ServeLimits()
        self.cache = EmbeddingCache(self.limits.cache_size, self.limits.ttl_s)
        self.stats = ServeStats()
        # one backend for every model: Triton runs each model's callable on its own thread, and the
        # Segmenter's pixel buffer and the backends' box-feature memo are not thread-safe
        self._lock = threading.Lock()
        # TensorRT keeps one encoder output buffer: its handles die at the next encode
        self._stable = seg.backend.name != "tensorrt"
        self._live: dict[str, list[Embedding]] = {}

    # --- validation (RequestError: one line naming the input and the problem) ---
    def _image(self, image: Any) -> np.ndarray:
        if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            got = f"{image.dtype} {tuple(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
            raise RequestError(f"image: expected (H, W, 3) uint8 RGB, got {got}")
        h, w = image.shape[:2]
        if h == 0 or w == 0:
            raise RequestError(f"image: empty ({h}x{w} pixels)")
        if h > MAX_SIDE or w > MAX_SIDE:
            raise RequestError(f"image: {w}x{h} pixels, at most {MAX_SIDE} a side")
        return np.ascontiguousarray(image)

    def _boxes(self, boxes: Any, image_hw: tuple[int, int]) -> np.ndarray:
        if not isinstance(boxes, np.ndarray) or boxes.ndim != 2 or boxes.shape[1] != 4:
            got = tuple(boxes.shape) if isinstance(boxes, np.ndarray) else type(boxes).__name__
            raise RequestError(f"boxes: expected (K, 4) float32 x0,y0,x1,y1, got {got}")
        k = boxes.shape[0]
        if k == 0:
            raise RequestError("boxes: no box given")
        if k > self.limits.max_boxes:
            raise RequestError(f"boxes: {k} boxes, at most {self.limits.max_boxes} a request")
        try:
            out = np.stack([check_box_values(b, f"boxes[{i}]") for i, b in enumerate(boxes)])
            for i, b in enumerate(out):
                validate_box(b, image_hw, f"boxes[{i}]")
        except UserError as e:
            raise RequestError(str(e)) from None
        return out

    def _out_hw(self, out_size: Any, image_hw: tuple[int, int], k: int) -> tuple[int, int]:
        if out_size is None:
            oh, ow = image_hw
        else:
            flat = np.asarray(out_size).reshape(-1)
            if flat.shape != (2,) or not np.issubdtype(flat.dtype, np.integer):
                raise RequestError(f"out_size: expected two integers (height, width), got {flat.dtype} {flat.shape}")
            oh, ow = int(flat[0]), int(flat[1])
            if oh <= 0 or ow <= 0:
                raise RequestError(f"out_size: {oh}x{ow} (height x width) must be positive")
        lim = self.limits
        if oh > MAX_SIDE or ow > MAX_SIDE or oh * ow > lim.max_out_pixels or k * oh * ow > lim.max_response_bytes:
            raise RequestError(f"out_size: {k} masks of {oh}x{ow} (height x width) exceed the limits "
                               f"({lim.max_out_pixels} pixels a mask, {lim.max_response_bytes} bytes a response)")
        return oh, ow

    # --- the models ---
    def _respond(self, objs: list[ObjectMask]) -> dict[str, np.ndarray]:
        masks = np.stack([o.mask() for o in objs]).astype(np.uint8)
        prob = np.array([o.mean_probability for o in objs], np.float32)
        status = ["empty" if o.area == 0 else "low-confidence" if p < self.limits.min_confidence else "ok"
                  for o, p in zip(objs, prob, strict=True)]
        return {OUT_MASKS: masks, OUT_STATUS: _bytes_array(status), OUT_PROB: prob}

    def segment(self, image: Any, boxes: Any, out_size: Any = None) -> dict[str, np.ndarray]:
        self.stats.requests[SEGMENT] += 1
        img = self._image(image)
        hw = (int(img.shape[0]), int(img.shape[1]))
        b = self._boxes(boxes, hw)
        ohw = self._out_hw(out_size, hw, len(b))
        with self._lock:
            self._live.clear()  # this encode overwrites a TensorRT output buffer
            res = self.seg.segment(img, b, ohw)
        return self._respond(res.objects)

    def encode(self, images: Sequence[Any]) -> list[str]:
        """Every image (already validated together: one batch) -> a handle each, in encoder calls of at most
        the backend's max_batch."""
        self.stats.requests[ENCODE] += len(images)
        self.stats.encode_batches[len(images)] += 1
        imgs = [self._image(im) for im in images]
        handles: list[str] = []
        per, step = self.seg.per_image, self.seg.images_per_call
        with self._lock:
            self._live.clear()
            for s in range(0, len(imgs), step):
                group = imgs[s : s + step]
                flat = self.seg.frame_images(group)
                pixels = self.seg.pixels(flat)
                # TensorRT's handles die at the next encode: keep the resized images to encode them again
                kept_px = None if self._stable else pixels.copy()
                embs = self.seg.encode_pixels(pixels, [(int(im.shape[0]), int(im.shape[1])) for im in flat])
                pairs = [embs[i * per : (i + 1) * per] for i in range(len(group))]
                for j, (im, pair) in enumerate(zip(group, pairs, strict=True)):
                    hw = (int(im.shape[0]), int(im.shape[1]))
                    if self._stable:
                        # a handle may view the whole batch's output: keep its own copy of a host array
                        kept = [e.copy() if isinstance(e, np.ndarray) else e for e in pair]
                        h = self.cache.put(_Entry(hw, kept, None, self.cache.clock()))
                    else:
                        assert kept_px is not None
                        h = self.cache.put(_Entry(hw, None, kept_px[j * per : (j + 1) * per], self.cache.clock()))
                    handles.append(h)
                if not self._stable:
                    self._live = dict(zip(handles[s:], pairs, strict=True))
        return handles

    def decode(self, handle: Any, boxes: Any, out_size: Any = None) -> dict[str, np.ndarray]:
        self.stats.requests[DECODE] += 1
        flat = np.asarray(handle, dtype=np.object_).reshape(-1)
        if flat.shape != (1,) or not isinstance(flat[0], (bytes, str)):
            raise RequestError(f"handle: expected one string from encode, got {flat.shape[0]} values")
        key = flat[0].decode("utf-8", "replace") if isinstance(flat[0], bytes) else flat[0]
        entry = self.cache.get(key)
        b = self._boxes(boxes, entry.image_hw)
        ohw = self._out_hw(out_size, entry.image_hw, len(b))
        with self._lock:
            embs = entry.embeddings if entry.embeddings is not None else self._live.get(key)
            if embs is None:  # its device buffer was overwritten since: encode its pixels again
                assert entry.pixels is not None
                embs = self.seg.encode_pixels(entry.pixels, [entry.image_hw] * len(entry.pixels))
                self._live = {key: embs}
            objs, _ = self.seg.segment_embedded(embs, entry.image_hw, b, ohw)
        return self._respond(objs)


# --- Triton (PyTriton) ---

@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    max_batch: int | None = None  # encode's Triton batch (default: the backend's max_batch)
    queue_delay_us: int = 2000  # how long Triton holds an encode to batch it with others
    workspace: Path | None = None  # PyTriton's model store and server copy (default: a temporary folder)
    log_verbose: int = 0
    exit_timeout_s: int = 5  # on stop, how long Triton waits for in-flight requests and open connections


def check_numpy() -> None:
    """PyTriton 0.7 pins numpy < 2 for a reason: under numpy 2 its shared-memory transport hands the model
    corrupted tensors (a (1, 4) float32 input arrives as its first value repeated), which would mean wrong
    masks, not an error."""
    if int(np.__version__.split(".")[0]) >= 2:
        raise UserError(f"imedsam-serve needs numpy < 2 (PyTriton 0.7 corrupts tensors under numpy "
                        f"{np.__version__}): pip install 'imedsam[serve]' 'numpy<2' 'opencv-python-headless<5'")


def check_config(cfg: ServerConfig) -> None:
    """Refuse, in one line, a workspace that exists (PyTriton makes it, and removes it on stop) and a port that
    something else holds (tritonserver would exit on it after seconds of start-up, with a log of its own)."""
    if cfg.workspace is not None and cfg.workspace.exists():
        raise UserError(f"--workspace {cfg.workspace}: already exists (the server makes it, and removes it when "
                        "it stops): name a new folder")
    for flag, port in (("--http-port", cfg.http_port), ("--grpc-port", cfg.grpc_port),
                       ("--metrics-port", cfg.metrics_port)):
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(cfg.host, port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as e:
            raise UserError(f"--host {cfg.host}: {e.strerror}") from None
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: a closing socket is no holder
            try:
                s.bind(addr)
            except OSError as e:
                raise UserError(f"{flag} {port}: cannot bind {cfg.host}:{port} ({e.strerror})") from None


def _python_lib_first() -> None:
    """The Python backend stub links libpython: a pyenv (or other non-system) Python's own must come first,
    or the stub loads another 3.x build's and the model fails to load (``_thread.RLock`` errors)."""
    lib = str(Path(sys.base_prefix) / "lib")
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if not paths or paths[0] != lib:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([lib, *[p for p in paths if p != lib]])


def _opt(req: Any, name: str) -> Any:
    """An optional input, or None (PyTriton's Request has no ``get``)."""
    return req[name] if name in req.keys() else None  # noqa: SIM118


def _guard(model: str, stats: ServeStats, fn: Any) -> Any:
    """Count refusals and log them in one line. A plain exception fails the call's requests only; the model
    keeps serving (PyTritonUnrecoverableError would stop it)."""
    def call(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        try:
            return fn(requests)  # type: ignore[no-any-return]
        except RequestError as e:
            stats.refused[model] += len(requests)
            LOG.info("%s: refused: %s", model, e)
            raise
        except UserError as e:  # e.g. a backend's own refusal
            stats.refused[model] += len(requests)
            raise RequestError(str(e)) from None
    return call


class Server:
    """A PyTriton ``Triton`` serving ``service``; ``start()``/``stop()``, or a ``with`` block."""

    def __init__(self, service: Service, cfg: ServerConfig | None = None) -> None:
        self.service, self.cfg = service, cfg or ServerConfig()
        self._triton: Any = None
        self._tmp: Any = None
        self._left = Leftovers()
        self._died = threading.Event()  # set on the thread that sees tritonserver exit
        self._lock = threading.Lock()
        self._starting_main = False  # start() runs on the main thread, where a death can interrupt it
        self._interrupted = False  # start() was interrupted for a death

    def _bind(self, triton: Any) -> None:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor

        svc, stats = self.service, self.service.stats
        image = Tensor(name=IN_IMAGE, dtype=np.uint8, shape=(-1, -1, 3))
        boxes = Tensor(name=IN_BOXES, dtype=np.float32, shape=(-1, 4))
        out_size = Tensor(name=IN_OUT_SIZE, dtype=np.int32, shape=(2,), optional=True)
        handle = Tensor(name=IN_HANDLE, dtype=bytes, shape=(1,))
        results = [Tensor(name=OUT_MASKS, dtype=np.uint8, shape=(-1, -1, -1)),
                   Tensor(name=OUT_STATUS, dtype=bytes, shape=(-1,)),
                   Tensor(name=OUT_PROB, dtype=np.float32, shape=(-1,))]
        single = ModelConfig(batching=False)

        def segment(requests: list[Any]) -> list[dict[str, np.ndarray]]:
            return [svc.segment(r[IN_IMAGE], r[IN_BOXES], _opt(r, IN_OUT_SIZE)) for r in requests]

        def decode(requests: list[Any]) -> list[dict[str, np.ndarray]]:
            return [svc.decode(r[IN_HANDLE], r[IN_BOXES], _opt(r, IN_OUT_SIZE)) for r in requests]

        def encode(requests: list[Any]) -> list[dict[str, np.ndarray]]:
            # each request holds a batch dimension (one or more images); one encoder pass for all of them
            counts = [len(r[IN_IMAGE]) for r in requests]
            handles = svc.encode([im for r in requests for im in r[IN_IMAGE]])
            out, s = [], 0
            for n in counts:
                out.append({OUT_HANDLE: _bytes_array(handles[s : s + n]).reshape(n, 1)})
                s += n
            return out

        max_batch = self.cfg.max_batch or svc.seg.backend.max_batch
        triton.bind(model_name=SEGMENT, infer_func=_guard(SEGMENT, stats, segment),
                    inputs=[image, boxes, out_size], outputs=results, config=single, strict=True)
        triton.bind(model_name=DECODE, infer_func=_guard(DECODE, stats, decode),
                    inputs=[handle, boxes, out_size], outputs=results, config=single, strict=True)
        triton.bind(model_name=ENCODE, infer_func=_guard(ENCODE, stats, encode), inputs=[image],
                    outputs=[Tensor(name=OUT_HANDLE, dtype=bytes, shape=(1,))], strict=True,
                    config=ModelConfig(max_batch_size=max_batch, batcher=DynamicBatcher(
                        max_queue_delay_microseconds=self.cfg.queue_delay_us)))

    def _triton_obj(self) -> Any:
        import tempfile

        from pytriton.triton import Triton, TritonConfig

        adopt_orphans()
        c = self.cfg
        ws = c.workspace
        if ws is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="imedsam-serve-")
            ws = Path(self._tmp.name) / "workspace"
        self._left.before_start(ws)
        config = TritonConfig(http_address=c.host, http_port=c.http_port, grpc_address=c.host,
                              grpc_port=c.grpc_port, metrics_address=c.host, metrics_port=c.metrics_port,
                              allow_cpu_metrics=True, allow_gpu_metrics=False, log_verbose=c.log_verbose,
                              exit_timeout_secs=c.exit_timeout_s)
        _python_lib_first()
        server = self

        class WatchedTriton(Triton):
            def _on_tritonserver_exit(self, *_: object) -> None:
                # PyTriton 0.7 stops itself here, on the thread that saw tritonserver exit. During start-up that
                # stop waits for the lock the start-up holds while it polls the dead server for a minute or two;
                # later it races our stop(). The one stop is ours, on the thread that serves.
                server._on_death()

        return WatchedTriton(config=config, workspace=ws)

    def _on_death(self) -> None:
        self._died.set()
        with self._lock:
            if not self._starting_main or self._interrupted:
                return
            self._interrupted = True
        threading.Thread(target=self._interrupt_start, name="imedsam-serve-death", daemon=True).start()

    def _interrupt_start(self) -> None:
        """SIGINT to the main thread until start() ends, which start()'s handler turns into a KeyboardInterrupt:
        a real signal, so a blocking call returns too, and again and again, as one that lands in gevent's hub
        (tritonclient's HTTP) can be lost there."""
        main = threading.main_thread().ident
        assert main is not None
        while True:
            with self._lock:
                if not self._starting_main:
                    return
                signal.pthread_kill(main, signal.SIGINT)
            time.sleep(INTERRUPT_EVERY_S)

    def _sigint_while_starting(self, before: Any) -> Any:
        """start()'s SIGINT handler: ours after a death (whatever SIGINT was: a background process ignores it),
        else what it was."""
        def handler(signum: int, frame: Any) -> None:
            if self._died.is_set() or before == signal.SIG_DFL:
                raise KeyboardInterrupt
            if callable(before):
                before(signum, frame)

        return handler

    def start(self) -> Server:
        """Start the server and return once every model is ready; ServerDied if tritonserver exits meanwhile
        (at once where start() runs on the main thread, else once PyTriton's start-up waits give up)."""
        check_numpy()
        check_config(self.cfg)
        self._died.clear()
        self._interrupted = False
        self._triton = self._triton_obj()
        on_main = threading.current_thread() is threading.main_thread()
        before = signal.getsignal(signal.SIGINT) if on_main else None  # None also where C code set it
        try:
            self._bind(self._triton)
            if before is not None:
                signal.signal(signal.SIGINT, self._sigint_while_starting(before))
            with self._lock:
                self._starting_main = before is not None
            try:
                self._triton.run()
            finally:
                with self._lock:  # no interrupt after this
                    self._starting_main = False
                if before is not None:
                    signal.signal(signal.SIGINT, before)
            if self._died.is_set():
                raise ServerDied("tritonserver died during start-up")
            self._left.started()
        except BaseException as e:
            # our interrupt, or whatever PyTriton raised on the dead server: a death; a user's Ctrl-C: itself
            died = self._interrupted or (self._died.is_set() and not isinstance(e, KeyboardInterrupt))
            self.stop()
            if died and not isinstance(e, ServerDied):
                raise ServerDied("tritonserver died during start-up") from None
            raise
        return self

    def serve(self) -> bool:
        """Start and block until Ctrl-C / SIGTERM (True) or until tritonserver or a model dies (False), then stop.
        Not PyTriton's own ``serve()``: that stops tritonserver itself on Ctrl-C, before ``stop()`` could note
        what it leaves."""

        def interrupt(*_: object) -> None:
            raise KeyboardInterrupt  # SIGTERM ends the loop below as Ctrl-C does; left alone it would orphan tritonserver

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, interrupt)
        try:
            self.start()
            while not self._died.wait(ALIVE_POLL_S) and self._triton.is_alive():
                pass
            LOG.error("tritonserver or one of its models died; stopping")
            return False
        except ServerDied:
            LOG.error("tritonserver died during start-up; stopping")
            return False
        except KeyboardInterrupt:
            return not self._interrupted  # ours only in a start-up that a death interrupted
        finally:
            self.stop()

    def stop(self) -> None:
        if self._triton is not None:
            # Triton's stop can leave a busy Python backend stub (and its multiprocessing helpers), their shared
            # memory and the models' directory copies: note them first, then end what is left.
            self._left.note()
            try:
                self._triton.stop()
            finally:
                self._triton = None
                self._left.end()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
