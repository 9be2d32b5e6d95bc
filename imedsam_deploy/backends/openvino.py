"""``ov-cpu``: the encoder compiled by OpenVINO's CPU plugin, the decoder on ONNX Runtime's CPU provider in fp32.

Why: on a CPU with AMX (Intel Xeon since Sapphire Rapids) OpenVINO runs the encoder's matrix products and
convolutions in bf16 on the matrix units, which ONNX Runtime's CPU provider does not: the lite encoder took 0.17 s
there against 0.43 s in fp32 (2-core VM with AMX, benchmarks/RESULTS.md). The decoder
stays on ONNX Runtime: OpenVINO ran it about twice as slowly (its query-point count changes every call) and in
bf16 it moved the masks as much as the bf16 encoder did.

``bf16`` is an execution precision, not a stored graph: the artifact's fp32 encoder graph is compiled with
OpenVINO's ``INFERENCE_PRECISION_HINT`` (OpenVINO keeps its own fp32 islands). It is the default where it was
measured faster than fp32 (``bf16_pays``): where OpenVINO runs bf16 matrix products on AMX, and where it runs them
with AVX-512 BF16 on an AMD core (a real Zen 4, 2 cores: 0.30 s against fp32's 0.55 s). On an Intel core without
AMX (Cooper Lake; emulated on the AMX Xeon with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``) bf16 took 0.51 s against
fp32's 0.42 s, so fp32 is the default there and bf16 runs when asked for; on a CPU with no native bf16 at all it is
refused in one line.

``int8`` is a stored graph, run only when asked for (``--precision int8``): the artifact's OpenVINO int8 encoder
(``imedsam-export --ov-int8``: NNCF, calibrated; ``imedsam_export.ov_int8``), its float parts in fp32. It pays on an
Intel CPU without AMX whose int8 matrix products OpenVINO runs with its brgemm kernels (AVX-512, AVX-VNNI): with AMX
masked off the lite encoder took 0.26 s against fp32's 0.40 s. Not with AVX2 alone (0.74 s against 0.53 s), nor
where bf16 is the default (AMX: 0.18 s against 0.17; Zen 4: 0.39 s against 0.30). It is not a default: on
Kvasir-Sessile test its mean HD95 fell behind LiteMedSAM's (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Any

import numpy as np

from imedsam_core import contract
from imedsam_core.errors import UserError
from imedsam_deploy.backends.base import Embedding
from imedsam_deploy.backends.ort import OrtBackend
from imedsam_deploy.manifest import Artifact

PRECISIONS = ("fp32", "bf16", "int8")  # fp32 and bf16 run the artifact's fp32 graph, int8 its ov-int8 one
_HINT = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # OpenVINO's INFERENCE_PRECISION_HINT values


def openvino_version() -> str:
    """OpenVINO's release: "2026.4.1-22982-<hash>-releases/..." -> "2026.4.1"."""
    import openvino as ov

    return str(ov.__version__).split("-")[0]


def native_bf16(core: Any) -> bool:
    """Whether this CPU runs bf16 natively (OpenVINO's CPU plugin then reports the BF16 capability)."""
    return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@cache
def bf16_matmul_kernel() -> str:
    """The kernel OpenVINO's CPU plugin picks here for one small matrix product compiled in bf16, read back from
    its profile ("" where it cannot compile one). About 40 ms once per process. Asking the plugin rather than
    reading the CPU's flags gives what it will really run, on any OS, and honours ``ONEDNN_MAX_CPU_ISA``."""
    import openvino as ov
    import openvino.opset13 as ops

    x = ops.parameter([32, 64], ov.Type.f32, name="x")
    model = ov.Model([ops.matmul(x, ops.constant(np.ones((64, 64), np.float32)), False, False)], [x], "bf16_probe")
    try:
        req = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16", "PERF_COUNT": True,
                                                     "INFERENCE_NUM_THREADS": 1}).create_infer_request()
        req.infer({"x": np.ones((32, 64), np.float32)})
    except RuntimeError:  # no bf16 kernel at all
        return ""
    return next((p.exec_type for p in req.get_profiling_info() if p.node_type.startswith(("FullyConnected", "MatMul"))),
                "")


@cache
def cpu_name() -> str:
    """The CPU's brand string as OpenVINO reads it ("AMD EPYC ...", "Intel(R) Xeon(R) ..."), on any OS."""
    import openvino as ov

    return str(ov.Core().get_property("CPU", "FULL_DEVICE_NAME"))


def bf16_pays(kernel: str, cpu: str) -> bool:
    """Whether bf16 was measured faster than fp32 with this bf16 matrix-product kernel on this CPU: on AMX (2.5x
    on the lite encoder), and with AVX-512 BF16 on AMD (Zen 4: 1.8x). Not with AVX-512 BF16 on an Intel core
    (0.8x, emulated), nor with OpenVINO's emulated ``jit_gemm_bf16`` (a CPU without the instructions, or masked
    off)."""
    avx512_bf16 = "avx512" in kernel and "bf16" in kernel  # brgemm_avx512_bf16; the emulation is jit_gemm_bf16
    return "amx" in kernel or (avx512_bf16 and "AMD" in cpu.upper())


def default_precision(core: Any) -> str:
    """bf16 where it pays (``bf16_pays``), else fp32 (see the module's docstring)."""
    return "bf16" if native_bf16(core) and bf16_pays(bf16_matmul_kernel(), cpu_name()) else "fp32"


def probe(artifact: Artifact) -> str | None:
    try:
        import onnxruntime  # noqa: F401
        import openvino  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install {e.name}: imedsam's install brings it)"
    if "fp32" not in artifact.graphs:
        return "the artifact has no fp32 graphs, which ov-cpu runs"
    return None


TAKES_THREADS = True  # OpenVINO's inference threads and ONNX Runtime's decoder sessions


def opt_in_precisions(artifact: Artifact) -> tuple[str, ...]:
    """The ov-int8 encoder, where exported: never the default (module docstring), run with ``--precision int8``."""
    return ("int8",) if contract.OV_INT8 in artifact.graphs else ()


def create(artifact: Artifact, precision: str | None = None, threads: int | None = None) -> OvBackend:
    return OvBackend(artifact, precision, threads)


class OvEncoder:
    """The artifact's encoder compiled by OpenVINO for the CPU at ``precision``: fp32 or bf16 from its fp32 graph
    (default: bf16 where it pays, else fp32: ``default_precision``), int8 from its ov-int8 model."""

    def __init__(self, artifact: Artifact, precision: str | None = None, threads: int | None = None) -> None:
        import openvino as ov

        core = ov.Core()
        self.version = openvino_version()
        precision = precision or default_precision(core)
        if precision not in PRECISIONS:
            raise UserError(f"{artifact.path}: ov-cpu runs its encoder in {', '.join(PRECISIONS)}, not {precision} "
                            "(fp16 is for GPUs)")
        if precision == "int8" and contract.OV_INT8 not in artifact.graphs:
            raise UserError(f"{artifact.path}: no OpenVINO int8 encoder for ov-cpu --precision int8 (export with "
                            "imedsam-export --ov-int8)")
        if precision == "bf16" and not native_bf16(core):
            raise UserError(f"{artifact.path}: this CPU has no native bf16 (AMX or AVX-512 BF16) for ov-cpu; "
                            "use --precision fp32")
        self.precision = precision
        graphs = contract.OV_INT8 if precision == "int8" else "fp32"
        self.core, self.path, self.size = core, artifact.graph("encoder", graphs), artifact.input_size
        self.config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINT[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = threads
        # one compiled model per batch size, made on first use: with the batch fixed OpenVINO picks faster kernels
        # (the lite encoder at batch 1: 0.19 s against 0.235 s with the batch left dynamic, bf16, 2 threads)
        self.requests: dict[int, Any] = {}
        self.model: Any = None  # the graph as read, batch dynamic: each batch size compiles a reshaped clone
        self._request(1)  # compiled now, so a graph OpenVINO cannot compile is refused when the backend opens

    def _request(self, batch: int) -> Any:
        req = self.requests.get(batch)
        if req is None:
            try:
                if self.model is None:
                    self.model = self.core.read_model(str(self.path))
                model = self.model.clone()
                model.reshape({contract.ENC_IN_IMAGE: [batch, 3, self.size, self.size]})
                req = self.core.compile_model(model, "CPU", self.config).create_infer_request()
            except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
                raise UserError(f"{self.path}: OpenVINO cannot compile it ({' '.join(str(e).split())[:200]})") from None
            self.requests[batch] = req
        return req

    def encode(self, images: np.ndarray) -> list[np.ndarray]:
        """(B, 3, S, S) float32 -> B embeddings (1, C, G, G) float32, copied out of the request's buffers (the
        next call overwrites them)."""
        req = self._request(images.shape[0])
        res = req.infer({contract.ENC_IN_IMAGE: np.ascontiguousarray(images, np.float32)})
        emb = np.array(res[contract.ENC_OUT_EMBEDDING], np.float32)
        return [emb[i : i + 1] for i in range(emb.shape[0])]


class OvBackend(OrtBackend):
    """OpenVINO's encoder (``OvEncoder``) and ONNX Runtime's fp32 CPU decoder (``OrtBackend``'s, split per box
    and per point where the artifact has it)."""

    def __init__(self, artifact: Artifact, precision: str | None = None, threads: int | None = None) -> None:
        self.encoder = OvEncoder(artifact, precision, threads)  # first: a refused precision opens nothing else
        super().__init__(artifact, "cpu", "fp32", threads=threads, with_encoder=False)
        self.name = "ov-cpu"
        self.precision = self.encoder.precision

    @property
    def description(self) -> str:
        return (f"{self.name} (openvino {self.encoder.version} encoder in {self.precision}, onnxruntime "
                f"{self.ort.__version__} fp32 decoder)")

    def encode(self, images: np.ndarray) -> Sequence[Embedding]:
        return self.encoder.encode(images)

    def close(self) -> None:
        super().close()
        self.encoder.requests.clear()
        self.encoder.model = None
