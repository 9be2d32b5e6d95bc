"""TensorRT backend: the artifact's prebuilt engines, device buffers through cuda-python, one stream.

TensorRT 10/11 name-based API: ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``. Every
device and pinned host buffer is allocated once for the engines' largest profile shapes; a call only copies
its inputs in, enqueues, and copies its outputs out. The image embedding never leaves the GPU: with one box
the decoder reads it straight from the encoder's output buffer.

An engine only runs on the TensorRT version and the GPU model it was built for: both are checked against
the manifest before deserialising, and refused with a one-line reason.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from imedsam_core import contract
from imedsam_core.errors import UserError
from imedsam_deploy.backends.base import Backend, Embedding
from imedsam_deploy.manifest import Artifact

PRECISIONS = ("fp16", "fp32")  # preference order when none is asked for


def _import() -> tuple[Any, Any]:
    """(tensorrt, cuda.bindings.runtime) or a one-line UserError."""
    try:
        import tensorrt as trt
    except ImportError:
        raise UserError("tensorrt is not installed: pip install 'imedsam[tensorrt]' (needs a CUDA GPU)") from None
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6 layout (cuda.cudart is gone in 13)
    except ImportError:
        raise UserError("cuda-python is not installed: pip install 'imedsam[tensorrt]'") from None
    return trt, cudart


def _check(result: Any) -> Any:
    """cuda-python calls return (err, *values): raise on error, return the value(s)."""
    from cuda.bindings import runtime as cudart

    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else tuple(values)


def _handle(obj: Any) -> int:
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # int(obj) is deprecated in cuda-bindings 13
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def gpu_identity() -> tuple[str, str]:
    """(device name, compute capability "major.minor") of CUDA device 0."""
    _, cudart = _import()
    prop = _check(cudart.cudaGetDeviceProperties(0))
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return name, f"{prop.major}.{prop.minor}"


def _pick(artifact: Artifact, precision: str | None) -> tuple[str, dict[str, Any]]:
    if not artifact.engines:
        raise UserError(f"{artifact.path}: artifact has no TensorRT engines (export with imedsam-export --engine on this GPU)")
    order = [precision] if precision else [p for p in PRECISIONS if p in artifact.engines]
    for p in order:
        if p in artifact.engines:
            return p, artifact.engines[p]
    raise UserError(f"{artifact.path}: artifact has no {precision} TensorRT engines (has {', '.join(artifact.engines)})")


def engine_mismatch(entry: dict[str, Any], trt_version: str, gpu: str, compute: str) -> str | None:
    """Why engines described by a manifest ``engines`` entry cannot run here, or None."""
    built = str(entry.get("tensorrt", "?"))
    if built != trt_version:
        return f"engines built with TensorRT {built}, this is TensorRT {trt_version}: rebuild with imedsam-export --engine"
    want_cc, want_gpu = str(entry.get("compute_capability", "?")), str(entry.get("gpu", "?"))
    if want_cc != compute or want_gpu != gpu:
        return (f"engines built for {want_gpu} (compute {want_cc}), this GPU is {gpu} (compute {compute}): "
                "rebuild with imedsam-export --engine")
    return None


def compatibility(artifact: Artifact, precision: str | None = None) -> str | None:
    """None if the engines were built for this TensorRT version and this GPU, else the reason."""
    trt, _ = _import()
    _, entry = _pick(artifact, precision)
    try:
        name, cc = gpu_identity()
    except RuntimeError as e:
        return f"no usable CUDA GPU ({e})"
    return engine_mismatch(entry, trt.__version__, name, cc)


def probe(artifact: Artifact) -> str | None:
    try:
        return compatibility(artifact)
    except UserError as e:
        return str(e)


def create(artifact: Artifact, precision: str | None = None) -> TensorRTBackend:
    return TensorRTBackend(artifact, precision)


@dataclass
class _Buffer:
    """One I/O tensor: a device buffer and a pinned host buffer, both sized for the profile's max shape."""

    name: str
    dtype: np.dtype
    nbytes: int
    device: int
    host: np.ndarray  # flat pinned memory, dtype ``dtype``
    host_ptr: int


class _Engine:
    def __init__(self, trt: Any, cudart: Any, runtime: Any, path: Any, max_shapes: dict[str, tuple[int, ...]]) -> None:
        self.cudart = cudart
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise UserError(f"{path}: TensorRT cannot deserialise this engine (other TensorRT version or GPU?)")
        self.engine = engine
        self.context = engine.create_execution_context()
        self.names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in self.names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        # Output shapes at the largest inputs size the output buffers.
        for n in self.inputs:
            hi = tuple(engine.get_tensor_profile_shape(n, 0)[2])
            if n in max_shapes and any(a > b for a, b in zip(max_shapes[n], hi, strict=True)):
                raise UserError(f"{path}: engine profile max {hi} for {n} is below the manifest's {max_shapes[n]}")
            self.context.set_input_shape(n, hi)
        self.buffers: dict[str, _Buffer] = {}
        for n in self.names:
            shape = tuple(self.context.get_tensor_shape(n))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(n)))
            nbytes = int(np.prod(shape)) * dtype.itemsize
            dev = int(_check(cudart.cudaMalloc(nbytes)))
            hptr = int(_check(cudart.cudaMallocHost(nbytes)))
            raw = np.ctypeslib.as_array(ctypes.cast(hptr, ctypes.POINTER(ctypes.c_uint8)), (nbytes,))
            self.buffers[n] = _Buffer(n, dtype, nbytes, dev, raw.view(dtype), hptr)
            self.context.set_tensor_address(n, dev)

    def upload(self, name: str, value: np.ndarray, stream: Any) -> None:
        buf = self.buffers[name]
        flat = np.ascontiguousarray(value, dtype=buf.dtype).reshape(-1)
        buf.host[: flat.size] = flat
        _check(self.cudart.cudaMemcpyAsync(buf.device, buf.host_ptr, flat.nbytes,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))

    def run(self, shapes: dict[str, tuple[int, ...]], stream: Any) -> None:
        for n, shape in shapes.items():
            if not self.context.set_input_shape(n, shape):
                raise RuntimeError(f"TensorRT rejected shape {shape} for {n}")
        if not self.context.execute_async_v3(_handle(stream)):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def download(self, name: str, stream: Any) -> np.ndarray:
        """Enqueue the copy of output ``name`` (its current shape) into pinned memory; a view, valid after sync."""
        buf = self.buffers[name]
        shape = tuple(self.context.get_tensor_shape(name))
        count = int(np.prod(shape))
        _check(self.cudart.cudaMemcpyAsync(buf.host_ptr, buf.device, count * buf.dtype.itemsize,
                                           self.cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
        return buf.host[:count].reshape(shape)

    def free(self) -> None:
        for buf in self.buffers.values():
            self.cudart.cudaFree(buf.device)
            self.cudart.cudaFreeHost(buf.host_ptr)
        self.buffers.clear()


@dataclass(frozen=True)
class _DeviceEmbedding:
    row: int
    generation: int


class TensorRTBackend(Backend):
    name = "tensorrt"

    def __init__(self, artifact: Artifact, precision: str | None = None) -> None:
        trt, cudart = _import()
        self.precision, entry = _pick(artifact, precision)
        reason = compatibility(artifact, self.precision)
        if reason:
            raise UserError(f"{artifact.path}: {reason}")
        super().__init__(artifact.max_batch, artifact.max_points)
        self.trt, self.cudart = trt, cudart
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream = _check(cudart.cudaStreamCreate())
        s, (c, g, g2), b, n = artifact.input_size, artifact.embedding_shape, artifact.max_batch, artifact.max_points
        self.emb_row_bytes = c * g * g2
        self.enc = _Engine(trt, cudart, self.runtime, artifact.file(entry["encoder"]),
                           {contract.ENC_IN_IMAGE: (b, 3, s, s)})
        self.dec = _Engine(trt, cudart, self.runtime, artifact.file(entry["decoder"]),
                           {contract.DEC_IN_EMBEDDING: (b, c, g, g2), contract.DEC_IN_BOXES: (b, 4),
                            contract.DEC_IN_COORDS: (b, n, 2)})
        self.emb_shape = (c, g, g2)
        enc_dt = self.enc.buffers[contract.ENC_OUT_EMBEDDING].dtype
        dec_dt = self.dec.buffers[contract.DEC_IN_EMBEDDING].dtype
        if enc_dt != dec_dt:  # the decoder reads the encoder's output buffer in place
            raise UserError(f"{artifact.path}: encoder engine outputs {enc_dt}, decoder engine expects {dec_dt}")
        self.emb_item = enc_dt.itemsize
        self.generation = 0
        self.gpu = gpu_identity()[0]

    @property
    def description(self) -> str:
        return f"tensorrt (TensorRT {self.trt.__version__}, {self.gpu}, {self.precision} engines)"

    def encode(self, images: np.ndarray) -> Sequence[Embedding]:
        if images.shape[0] > self.max_batch:
            raise ValueError(f"encode batch {images.shape[0]} > max_batch {self.max_batch}")
        self.generation += 1  # handles of the previous encode point into a buffer about to be overwritten
        self.enc.upload(contract.ENC_IN_IMAGE, images, self.stream)
        self.enc.run({contract.ENC_IN_IMAGE: tuple(images.shape)}, self.stream)
        return [_DeviceEmbedding(i, self.generation) for i in range(images.shape[0])]

    def decode(self, embedding: Embedding, boxes: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not isinstance(embedding, _DeviceEmbedding) or embedding.generation != self.generation:
            raise ValueError("stale embedding handle: decode an image before encoding the next batch")
        b, n = boxes.shape[0], coords.shape[1]
        if b > self.max_batch or n > self.max_points:
            raise ValueError(f"decode of {b} boxes x {n} points exceeds {self.max_batch} x {self.max_points}")
        ctx, cudart = self.dec.context, self.cudart
        src = self.enc.buffers[contract.ENC_OUT_EMBEDDING].device + embedding.row * self.emb_row_bytes * self.emb_item
        dst = self.dec.buffers[contract.DEC_IN_EMBEDDING]
        if b == 1:
            ctx.set_tensor_address(contract.DEC_IN_EMBEDDING, src)  # zero copy from the encoder's output
        else:
            size = self.emb_row_bytes * self.emb_item
            for i in range(b):
                _check(cudart.cudaMemcpyAsync(dst.device + i * size, src, size,
                                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream))
            ctx.set_tensor_address(contract.DEC_IN_EMBEDDING, dst.device)
        self.dec.upload(contract.DEC_IN_BOXES, boxes, self.stream)
        self.dec.upload(contract.DEC_IN_COORDS, coords, self.stream)
        self.dec.run({contract.DEC_IN_EMBEDDING: (b, *self.emb_shape), contract.DEC_IN_BOXES: (b, 4),
                      contract.DEC_IN_COORDS: (b, n, 2)}, self.stream)
        views = [self.dec.download(name, self.stream) for name in contract.DECODER_OUTPUTS]
        _check(cudart.cudaStreamSynchronize(self.stream))
        coarse, fine, unc = (v.astype(np.float32, copy=True) for v in views)  # pinned buffers are reused
        return coarse, fine, unc

    def host_embedding(self, embedding: Embedding) -> np.ndarray:
        if not isinstance(embedding, _DeviceEmbedding) or embedding.generation != self.generation:
            raise ValueError("stale embedding handle: read an image's embedding before encoding the next batch")
        view = self.enc.download(contract.ENC_OUT_EMBEDDING, self.stream)
        _check(self.cudart.cudaStreamSynchronize(self.stream))
        return view[embedding.row : embedding.row + 1].astype(np.float32, copy=True)  # pinned buffers are reused

    def close(self) -> None:
        if getattr(self, "stream", None) is not None:
            self.cudart.cudaStreamSynchronize(self.stream)
            self.enc.free()
            self.dec.free()
            self.cudart.cudaStreamDestroy(self.stream)
            self.stream = None
