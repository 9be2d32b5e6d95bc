"""ONNX Runtime backend: TensorRT, CUDA or CPU execution provider, inputs and outputs through I/O binding.

On a GPU provider the image embedding stays on the device (an OrtValue) and is bound straight into the
decoder for every box and every chunk of query points: it crosses the bus once per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from imedsam_core import contract
from imedsam_core.errors import UserError
from imedsam_core.paths import cache_dir
from imedsam_deploy.backends.base import Backend, Embedding
from imedsam_deploy.manifest import Artifact

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "trt": "TensorrtExecutionProvider"}
FORCE_SPINNING_STOP = "session.force_spinning_stop"  # ONNX Runtime session config key
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def probe(artifact: Artifact, provider: str) -> str | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime, or onnxruntime-gpu)"
    if PROVIDERS[provider] not in ort.get_available_providers():
        hint = "" if provider == "cpu" else " (needs onnxruntime-gpu and a CUDA GPU)"
        return f"onnxruntime has no {PROVIDERS[provider]}{hint}"
    return None


TAKES_THREADS = True  # its sessions' intra-op pools


def opt_in_precisions(artifact: Artifact, provider: str) -> tuple[str, ...]:
    """The int8 encoder on the CPU provider, where exported: run only with ``--precision int8``."""
    return ("int8",) if provider == "cpu" and "int8" in artifact.graphs else ()


def create(artifact: Artifact, provider: str, precision: str | None = None, threads: int | None = None) -> OrtBackend:
    return OrtBackend(artifact, provider, precision or "fp32", threads=threads)


def _trt_profile(artifact: Artifact, part: str, level: str) -> str:
    """ORT TensorRT EP profile shapes ("name:dxdxd,...") for min / opt / max."""
    s, (c, g, g2) = artifact.input_size, artifact.embedding_shape
    b = {"min": 1, "opt": 1, "max": artifact.max_batch}[level]
    n = {"min": 1, "opt": min(artifact.max_points, 16384), "max": artifact.max_points}[level]
    if part == "encoder":
        return f"{contract.ENC_IN_IMAGE}:{b}x3x{s}x{s}"
    return (f"{contract.DEC_IN_EMBEDDING}:{b}x{c}x{g}x{g2},{contract.DEC_IN_BOXES}:{b}x4,"
            f"{contract.DEC_IN_COORDS}:{b}x{n}x2")


class OrtBackend(Backend):
    def __init__(self, artifact: Artifact, provider: str, precision: str | None = "fp32", threads: int | None = None,
                 with_encoder: bool = True) -> None:
        import onnxruntime as ort

        super().__init__(artifact.max_batch, artifact.max_points)
        self.ort = ort
        self.name = f"ort-{provider}"
        self.provider = PROVIDERS[provider]
        self.precision = precision = precision or "fp32"
        if precision == "int8" and provider != "cpu":
            raise UserError(f"{artifact.path}: int8 graphs are for ONNX Runtime's CPU provider "
                            f"(dynamic MatMulInteger); use fp16 on GPUs")
        self.device = "cpu" if provider == "cpu" else "cuda"
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # Each session has its own intra-op pool, whose threads keep spinning after a Run by default: the
        # encoder's then fight the decoder's for the cores. Stopping the spin at the end of every Run cut the
        # sparse decode of a vit_b frame from 243-283 to 170-198 ms on 2 cores (benchmarks/RESULTS.md).
        so.add_session_config_entry(FORCE_SPINNING_STOP, "1")
        if threads:
            so.intra_op_num_threads = threads
        self.sessions = {}
        # the decoder split per box / per point where the artifact has it: the box-conditioned part
        # (prompt encoder, two-way transformer, upscaling) then runs once per box instead of once per chunk
        # (not under the TensorRT provider, whose optimisation profiles are written for the one-graph decoder)
        self.split = provider != "trt" and artifact.has_split_decoder(precision)
        parts: tuple[str, ...] = ("encoder", "decoder_prompt", "decoder_points") if self.split else ("encoder", "decoder")
        if not with_encoder:  # another runtime encodes (ov-cpu); this one decodes
            parts = parts[1:]
        self._box_cache: tuple[Any, np.ndarray, Any] | None = None
        for part in parts:
            path = artifact.graph(part, precision)
            providers: list[Any] = [self.provider]
            if provider == "trt":
                cache = cache_dir() / "ort-trt"
                cache.mkdir(parents=True, exist_ok=True)
                providers = [(self.provider, {
                    "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                    "trt_profile_min_shapes": _trt_profile(artifact, part, "min"),
                    "trt_profile_opt_shapes": _trt_profile(artifact, part, "opt"),
                    "trt_profile_max_shapes": _trt_profile(artifact, part, "max"),
                }), "CUDAExecutionProvider"]
            try:
                sess = ort.InferenceSession(str(path), so, providers=providers)
            except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
                raise UserError(f"{path}: onnxruntime cannot load it ({' '.join(str(e).split())[:200]})") from None
            if sess.get_providers()[0] != self.provider:
                # ORT silently falls back to the CPU when a GPU provider fails to initialise.
                raise UserError(f"{path}: {self.provider} did not initialise (got {sess.get_providers()[0]})")
            self.sessions[part] = sess
        self.in_types = {p: {i.name: _NP.get(i.type, np.float32) for i in s.get_inputs()} for p, s in self.sessions.items()}

    @property
    def description(self) -> str:
        return f"{self.name} (onnxruntime {self.ort.__version__}, {self.provider}, {self.precision})"

    def _bind_input(self, io: Any, part: str, name: str, value: Any) -> None:
        if isinstance(value, np.ndarray):
            io.bind_cpu_input(name, np.ascontiguousarray(value, dtype=self.in_types[part][name]))
        else:
            io.bind_ortvalue_input(name, value)

    def encode(self, images: np.ndarray) -> Sequence[Embedding]:
        sess = self.sessions["encoder"]
        io = sess.io_binding()
        self._bind_input(io, "encoder", contract.ENC_IN_IMAGE, images)
        io.bind_output(contract.ENC_OUT_EMBEDDING, self.device)
        sess.run_with_iobinding(io)
        if self.device == "cpu":
            emb = io.copy_outputs_to_cpu()[0].astype(np.float32, copy=False)
            return [emb[i : i + 1] for i in range(emb.shape[0])]
        out = io.get_outputs()[0]
        if images.shape[0] == 1:
            return [out]  # stays on the device
        emb = out.numpy()
        return [self.ort.OrtValue.ortvalue_from_numpy(emb[i : i + 1].copy(), self.device, 0) for i in range(len(emb))]

    def box_features(self, embedding: Embedding, boxes: np.ndarray) -> Any:
        """The split decoder's per-box part, memoised for the last (embedding object, boxes) pair: the
        runtime decodes a box's points in several chunks (and the sparse planner in several levels). Keyed on
        the embedding's identity: embeddings are never modified in place."""
        c = self._box_cache
        if c is not None and c[0] is embedding and np.array_equal(c[1], boxes):
            return c[2]
        emb = self._repeat(embedding, boxes.shape[0])
        sess = self.sessions["decoder_prompt"]
        io = sess.io_binding()
        self._bind_input(io, "decoder_prompt", contract.DEC_IN_EMBEDDING, emb)
        self._bind_input(io, "decoder_prompt", contract.DEC_IN_BOXES, boxes)
        io.bind_output(contract.DEC_BOX_FEATURES, self.device)
        sess.run_with_iobinding(io)
        out = io.get_outputs()[0]
        feats = out.numpy() if self.device == "cpu" else out
        self._box_cache = (embedding, boxes.copy(), feats)
        return feats

    def _repeat(self, embedding: Embedding, b: int) -> Embedding:
        if b == 1:
            return embedding
        return np.repeat(self.host_embedding(embedding), b, axis=0)  # one row per box

    def host_embedding(self, embedding: Embedding) -> np.ndarray:
        return embedding if isinstance(embedding, np.ndarray) else embedding.numpy()  # an OrtValue on the device

    def decode(self, embedding: Embedding, boxes: np.ndarray, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.split:
            part = "decoder_points"
            sess = self.sessions[part]
            io = sess.io_binding()
            self._bind_input(io, part, contract.DEC_BOX_FEATURES, self.box_features(embedding, boxes))
        else:
            part = "decoder"
            sess = self.sessions[part]
            io = sess.io_binding()
            self._bind_input(io, part, contract.DEC_IN_EMBEDDING, self._repeat(embedding, boxes.shape[0]))
            self._bind_input(io, part, contract.DEC_IN_BOXES, boxes)
        self._bind_input(io, part, contract.DEC_IN_COORDS, coords)
        for name in contract.DECODER_OUTPUTS:
            io.bind_output(name, "cpu")
        sess.run_with_iobinding(io)
        coarse, fine, unc = (o.astype(np.float32, copy=False) for o in io.copy_outputs_to_cpu())
        return coarse, fine, unc

    def close(self) -> None:
        self.sessions.clear()
