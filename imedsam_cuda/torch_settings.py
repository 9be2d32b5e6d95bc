"""torch-cuda's options as one typed, frozen value, and the environment variables that set them, read here only.

A backend is built from a ``TorchCudaSettings`` (``TorchBackend(model, device, settings)``); another setting is
another build (``TorchBackend.configure(dataclasses.replace(be.settings, ...))``), which the tuner
(``torch_tuning``) varies. ``None`` means "the device's default", fixed by ``resolved`` when the backend is built.
No torch import: the runtime reads this module whatever backend it opens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

PRECISIONS = ("fp32", "bf16", "fp16")
CHECKPOINT_ENV = "IMEDSAM_TORCH_CHECKPOINT"  # the PyTorch checkpoint behind an artifact (``source_checkpoint``)
COMPILE_ENV = "IMEDSAM_TORCH_COMPILE"  # any value but 0: ``compile``
TRITON_ENV = "IMEDSAM_TORCH_TRITON"  # any value but 0: every Triton option, and ``fp32_box_part``
TUNED_ENV = "IMEDSAM_TORCH_TUNED"  # "0": torch-cuda opens with its defaults, whatever was tuned
# the options that run hand-written Triton kernels (TRITON_ENV turns them all on; not with compile)
TRITON_OPTIONS = ("fused_norms", "fused_operands", "fused_frequency", "fused_features", "fused_uncertainty",
                  "fused_planner")


@dataclass(frozen=True)
class TorchCudaSettings:
    """How torch-cuda runs a model. Each option is exact, or within its precision's rounding, and has its own test;
    the Triton ones are off by default (timed once, on an H200 on 2026-12-04: benchmarks/RESULTS.md)."""

    precision: str = "bf16"
    """fp32, or bf16 / fp16 autocast with fp32 islands, Linear and convolution weights stored in that dtype."""
    max_batch: int = 8
    """The most images an encode takes (the artifact's)."""
    max_points: int = 65536
    """The most points a decode takes (the artifact's)."""
    cuda_graphs: bool | None = None
    """Capture each stage in one CUDA graph per input shape and replay it (default: on CUDA)."""
    compile: bool | str = False
    """Compile each captured function with ``torch.compile`` first: True is inductor, a string names another
    backend (tests use "aot_eager": the same whole-graph capture, no code generation)."""
    bucket_points: bool | None = None
    """Pad decodes to ``point_bucket`` sizes, so graphs are reused (default: with CUDA graphs or compile)."""
    device_planner: bool | None = None
    """Run the sparse mode's planner on the device, one graph per box (default: on CUDA)."""
    device_merge: bool | None = None
    """Keep the full and box modes' decoder outputs on the device and UGS-merge there (default: on CUDA)."""
    fused_attention: bool | None = None
    """The encoder's and the box part's attention as one ``scaled_dot_product_attention`` call each (flash /
    memory-efficient kernels) instead of two GEMMs and a softmax (default: on CUDA)."""
    overlap_frequency: bool | None = None
    """Issue the frequency-adapter chain, which never reads the tokens, on a second stream beside them (default:
    on CUDA without compile: dynamo's fullgraph capture does not take streams)."""
    grid_sample: bool = True
    """Sample the decoder's two maps with ``grid_sample`` (one kernel each) instead of the exported graph's Gather
    taps (~35 small ops each)."""
    align_matmuls: bool | None = None
    """Zero-pad the per-point layers' odd widths to multiples of 8, for cuBLAS's aligned GEMMs (default: on
    CUDA)."""
    lean_encoder: bool | None = None
    """Run the encoder with ``imedsam_cuda.encoder_rewrites`` (about 30% fewer kernels; default: on CUDA)."""
    lean_box_part: bool | None = None
    """Run the box part with ``imedsam_cuda.box_part_rewrites`` (its dense positional map made once, the
    upscaling's norm as one ``layer_norm``; default: on CUDA)."""
    relu_epilogue: bool | None = None
    """The per-point trunks' Linear -> ReLU pairs as one GEMM with its epilogue each (default: on CUDA)."""
    fused_norms: bool = False
    """The lean encoder's residual adds and norms as ``fused_add_norm`` Triton kernels (with an fp32 box part, its
    two-way transformer's too)."""
    fused_operands: bool = False
    """Each lean block's attention operands as one ``fused_attention_operands`` Triton kernel."""
    fused_frequency: bool = False
    """Every block's frequency adapter as one ``fused_frequency_chain`` Triton kernel a frame."""
    fused_features: bool = False
    """Each point's decoder input row as one ``fused_point_features`` Triton kernel."""
    fused_uncertainty: bool = False
    """The closed-form uncertainty as one ``fused_uncertainty`` Triton kernel."""
    fused_planner: bool = False
    """Each device-planner level's bookkeeping as five ``fused_planner`` Triton kernels."""
    fp32_box_part: bool = False
    """The box part in fp32 with its weights kept in fp32, from transformer tokens made on the host in float64
    (nothing to do in an fp32 backend; on an H200 it made the box part slower: benchmarks/HISTORY.md, session 17)."""
    gelu_epilogue: bool = False
    """Each encoder block's first MLP layer and its GELU as one GEMM (on CUDA the tanh approximation of GELU; the
    tuner found it no faster on an H200, 2026-12-04)."""

    def resolved(self, cuda: bool) -> TorchCudaSettings:
        """Every device default fixed for a backend on CUDA (``cuda``) or not; an fp32 backend's box part is fp32
        already."""
        graphs = cuda if self.cuda_graphs is None else self.cuda_graphs

        def default(value: bool | None, on: bool) -> bool:
            return on if value is None else value

        return replace(
            self, cuda_graphs=graphs,
            bucket_points=default(self.bucket_points, graphs or bool(self.compile)),
            device_planner=default(self.device_planner, cuda), device_merge=default(self.device_merge, cuda),
            fused_attention=default(self.fused_attention, cuda),
            overlap_frequency=default(self.overlap_frequency, cuda and not self.compile),
            align_matmuls=default(self.align_matmuls, cuda), lean_encoder=default(self.lean_encoder, cuda),
            lean_box_part=default(self.lean_box_part, cuda), relu_epilogue=default(self.relu_epilogue, cuda),
            fp32_box_part=self.fp32_box_part and self.precision != "fp32",
        )


def _on(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def from_env(settings: TorchCudaSettings) -> TorchCudaSettings:
    """``settings`` with the environment's opt-ins, as ``imedsam-infer`` and ``imedsam-bench`` open torch-cuda (any
    value but 0 turns one on): ``IMEDSAM_TORCH_COMPILE`` compiles its stages with ``torch.compile``;
    ``IMEDSAM_TORCH_TRITON`` runs its Triton kernels (each off by default), and the box
    part in fp32 (``fp32_box_part``), whose norms the fused-norms kernel then runs too."""
    triton = _on(TRITON_ENV)
    opts: dict[str, Any] = {"compile": _on(COMPILE_ENV), **dict.fromkeys(TRITON_OPTIONS, triton),
                            "fp32_box_part": triton}
    return replace(settings, **opts)


def tuned_wanted() -> bool:
    """Whether torch-cuda opens with the tuning saved for it (``IMEDSAM_TORCH_TUNED=0``: no)."""
    return os.environ.get(TUNED_ENV, "") != "0"


def checkpoint_from_env() -> Path | None:
    """``IMEDSAM_TORCH_CHECKPOINT``, the checkpoint to use instead of the artifact's, if set."""
    env = os.environ.get(CHECKPOINT_ENV)
    return Path(env) if env else None
