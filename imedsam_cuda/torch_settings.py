"""torch-cuda's options as one typed, frozen value, and the ``--backend-option``s the commands open it with.

A backend is built from a ``TorchCudaSettings`` (``TorchBackend(model, device, settings)``); another setting is
another build (``TorchBackend.configure(dataclasses.replace(be.settings, ...))``; the same build where only settings
read as frames run changed: ``torch_cuda.RUN_TIME_SETTINGS``), which the tuner (``torch_tuning``) varies. ``None`` means "the device's default", fixed by ``resolved`` when the backend is built.
The commands (``imedsam-infer``, ``imedsam-bench``, ``imedsam-serve``) open it as ``OpenOptions`` say: the keys
declared in ``OPTIONS`` (torch-cpu, the bench's CPU form: ``CPU_OPTIONS``), given as ``--backend-option KEY=VALUE``.
No torch import: the runtime reads the declarations by name whatever backend it opens.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from imedsam_core.errors import UserError
from imedsam_deploy.backends.options import FILE, FLAG, BackendOption

PRECISIONS = ("fp32", "bf16", "fp16")
# the options that run hand-written Triton kernels (``triton=1`` turns them all on; not with compile)
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


# what the commands' ``--backend-option KEY=VALUE`` sets when they open torch-cuda (``OpenOptions``)
OPTIONS: dict[str, BackendOption] = {
    "compile": BackendOption(FLAG, "torch.compile each stage first, the sparse planner as one function (default: "
                                   "off; not with triton)"),
    "triton": BackendOption(FLAG, "the hand-written Triton kernels, and the box part in fp32 (default: off; timed "
                                  "once on an H200, 2026-12-04)"),
    "tuned": BackendOption(FLAG, "open with the tuning imedsam-bench --tune saved for this machine (default: on)"),
    "checkpoint": BackendOption(FILE, "the PyTorch checkpoint the artifact was exported from (default: the "
                                      "manifest's source.checkpoint)"),
}
# torch-cpu (``imedsam-bench --model``: the model in process, so no checkpoint; no Triton kernels on a CPU)
CPU_OPTIONS: dict[str, BackendOption] = {k: OPTIONS[k] for k in ("compile", "tuned")}


@dataclass(frozen=True)
class OpenOptions:
    """How a command opens a torch backend: the ``--backend-option``s it was given (``OPTIONS``), typed."""

    compile: bool = False
    """``torch.compile`` each stage (``TorchCudaSettings.compile``)."""
    triton: bool = False
    """Every Triton option (``TRITON_OPTIONS``), and the box part in fp32 (``fp32_box_part``), whose norms the
    fused-norms kernel then runs too."""
    tuned: bool = True
    """Apply the tuning ``imedsam-bench --tune`` saved for this backend on this machine, if there is one."""
    checkpoint: Path | None = None
    """The checkpoint to run instead of the artifact's source (``torch_cuda.source_checkpoint``)."""

    def __post_init__(self) -> None:
        if self.compile and self.triton:  # two ways to the same end (inductor writes its own fused kernels)
            raise UserError("--backend-option compile=1 and triton=1: torch.compile and the hand-written Triton "
                            "kernels are alternatives: set one")

    @classmethod
    def of(cls, values: dict[str, Any] | None) -> OpenOptions:
        """From ``imedsam_deploy.backends.parse_options``'s typed values (keys of ``OPTIONS``)."""
        return cls(**(values or {}))

    def apply(self, settings: TorchCudaSettings) -> TorchCudaSettings:
        """``settings`` with these opt-ins (the rest as given)."""
        opts: dict[str, Any] = {"compile": self.compile, **dict.fromkeys(TRITON_OPTIONS, self.triton),
                                "fp32_box_part": self.triton}
        return replace(settings, **opts)
