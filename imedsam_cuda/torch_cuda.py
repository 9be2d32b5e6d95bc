"""PyTorch CUDA backend: the fast GPU path where TensorRT is not installed.

torch (and the model / export code) is imported only when this backend is chosen, so the runtime stays
torch-free otherwise. What it does:
- LoRA merged and BatchNorm folded (``imedsam_export.merge.merge_for_export``, verified there);
- the decoder is the exporter's ``DecoderGraph`` (positional map's first layer precomputed, Gather-based
  bilinear taps, Fourier encoding from raw coordinates): the same function as the ONNX decoder;
- the FFT runs on the device (``torch.fft`` in the model's spectrum, fp32 whatever the autocast state);
- bf16 (or fp16) autocast with fp32 islands, Linear and convolution weights stored in that dtype (autocast
  would cast them on every replay): FFT and Fourier encoding (forced fp32 in the model code),
  LayerNorm and softmax (fp32 under CUDA autocast; the encoder's softmax inside the fused attention kernel,
  with fp32 statistics), the closed-form uncertainty (forced fp32 here, its ranking picks the refined points);
- the relative-position gather index is a precomputed buffer (model code), so capture works;
- the decoder runs split like the ONNX Runtime backend's: the box part (prompt encoder, two-way transformer,
  upsampling) once per (embedding, boxes), memoised, then the per-point part per chunk or planner level;
- encoder, box part and per-point part are each captured in one CUDA graph per input shape and replayed;
  the point count is padded up to a quarter octave (``point_bucket``), so a video's varying regions and the
  sparse planner's levels replay a bounded set of graphs instead of capturing one per distinct count (each
  capture costs milliseconds); the per-point graphs share one memory pool, since each one's outputs are
  copied out right after its replay (to the host, or to the merge buffers), so the set costs the memory of
  the largest;
- the encoder's attention is one ``scaled_dot_product_attention`` call (the relative-position bias is folded
  into q and k, so there is no mask: flash / memory-efficient kernels), and the frequency-adapter chain runs
  on a second stream beside the token chain (it never reads the tokens);
- the sparse mode's planner runs on the device (``torch_sparse.DevicePlanner``: one graph per box), and the
  full and box modes UGS-merge on the device: only final logits are copied to the host;
- optionally (``compile=True`` or IMEDSAM_TORCH_COMPILE=1) each captured function is first compiled by
  ``torch.compile`` (inductor: fused elementwise kernels, autotuned GEMMs), still replayed as a CUDA graph;
- optionally (IMEDSAM_TORCH_TRITON=1, or the six options) hand-written Triton kernels replace torch ops: the
  encoder's residual adds and norms, its attention operands and its frequency-adapter chain, each decoder point's
  input row, the decoder's uncertainty, the sparse planner's per-level bookkeeping.

Weights: an artifact holds ONNX graphs, not PyTorch weights, so ``create`` needs the checkpoint the artifact
was exported from (manifest ``source.checkpoint``, or the ``IMEDSAM_TORCH_CHECKPOINT`` variable);
``TorchBackend(model)`` takes an in-process model (benchmarks, tests).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imedsam_core import contract
from imedsam_core.errors import UserError
from imedsam_deploy.backends.base import Backend, Embedding
from imedsam_deploy.manifest import Artifact
from imedsam_deploy.preprocess import Region, axis_centres

PRECISIONS = ("fp32", "bf16", "fp16")
CHECKPOINT_ENV = "IMEDSAM_TORCH_CHECKPOINT"
COMPILE_ENV = "IMEDSAM_TORCH_COMPILE"
TRITON_ENV = "IMEDSAM_TORCH_TRITON"
# the TorchBackend options that run hand-written Triton kernels (TRITON_ENV turns them all on; not with compile)
TRITON_OPTIONS = ("fused_norms", "fused_operands", "fused_frequency", "fused_features", "fused_uncertainty",
                  "fused_planner")
POINT_BUCKET_MIN = 1024  # the smallest padded decode: below it a graph replay costs the same whatever N


def point_bucket(n: int, max_points: int) -> int:
    """The point count a decode of ``n`` points runs at: rounded up to a quarter octave (1024, 1280, 1536,
    1792, 2048, 2560, ...), so padding wastes under 25% and 65536 points need 25 graphs; at least
    POINT_BUCKET_MIN, at most ``max_points``. Points are independent in the per-point decoder: padding is
    exact."""
    if n > max_points:
        raise ValueError(f"{n} points exceed max_points {max_points}")
    if n <= POINT_BUCKET_MIN:
        return min(max_points, POINT_BUCKET_MIN)
    step = 1 << ((n - 1).bit_length() - 3)  # n in (4 step, 8 step]
    return min(max_points, -(-n // step) * step)


def ugs_merge_device(coarse: Any, fine: Any, unc: Any, k: int) -> Any:
    """``runtime.ugs_merge`` on (..., N) tensors: the fine logit at the k most uncertain points of each row,
    the coarse one elsewhere (``topk``: no host synchronisation, so it can sit inside a CUDA graph)."""
    k = min(k, coarse.shape[-1])
    if k <= 0:
        return coarse
    idx = unc.topk(k, dim=-1).indices
    return coarse.scatter(-1, idx, fine.gather(-1, idx))


def weight_layers(module: Any) -> list[Any]:
    """The Linear and convolution layers under ``module``: those whose weights ``store_weights_in`` stores."""
    from torch import nn

    return [m for m in module.modules() if isinstance(m, nn.Linear | nn.Conv2d | nn.ConvTranspose2d)]


def store_weights_in(module: Any, dtype: Any) -> int:
    """Store the weight and bias of every Linear and convolution under ``module`` in the autocast dtype;
    returns how many layers. Autocast would otherwise cast each fp32 weight and bias on every call, to the
    same values: inside a CUDA graph that is two more kernels per layer per replay and the weights read and
    written again (the vit_b encoder's 85 M parameters: ~0.5 GB of traffic a frame; its 72 Linears' biases:
    72 cast kernels a frame). Norms and buffers stay fp32. Every layer's output is bitwise the same; the one
    bias added outside its layer (the windowed attention's, after a bias-free projection) is now added in
    the autocast dtype, as the layer itself would, so the attention after it runs in that dtype too instead
    of being promoted to fp32 (and cast back by every autocast op it feeds). (An fp32 box part restores its
    layers' fp32 weights: ``TorchBackend.set_box_precision``.)"""
    layers = weight_layers(module)
    for m in layers:
        m.weight.data = m.weight.data.to(dtype)
        if m.bias is not None:
            m.bias.data = m.bias.data.to(dtype)
    return len(layers)


def _no_cuda_reason() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install 'imedsam[train]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device visible to torch (torch.cuda.is_available() is False)"
    return None


def source_checkpoint(artifact: Artifact) -> Path | None:
    """The PyTorch checkpoint behind ``artifact``: $IMEDSAM_TORCH_CHECKPOINT, else manifest source.checkpoint."""
    env = os.environ.get(CHECKPOINT_ENV)
    if env:
        return Path(env)
    src = artifact.manifest.get("source")
    ck = src.get("checkpoint") if isinstance(src, dict) else None
    if not ck:
        return None
    p = Path(ck)
    return p if p.is_absolute() else artifact.path / p


def probe(artifact: Artifact) -> str | None:
    if artifact.resize != contract.RESIZE_MODE:
        # its rewrites, kernels and on-device query paths are written for the SAM-ViT model's stretch frame
        return f"runs SAM-ViT artifacts only; {artifact.path} is a lite ({artifact.resize}) artifact"
    reason = _no_cuda_reason()
    if reason:
        return reason
    ck = source_checkpoint(artifact)
    if ck is None or not ck.is_file():
        return f"needs the PyTorch checkpoint the artifact came from (set {CHECKPOINT_ENV})"
    return None


def create(artifact: Artifact, precision: str | None = None) -> TorchBackend:
    reason = probe(artifact)
    if reason:
        raise UserError(f"backend torch-cuda: {reason}")
    from imedsam_train.checkpoint import load_checkpoint

    ck = source_checkpoint(artifact)
    assert ck is not None
    model, _ = load_checkpoint(ck)
    return open_model(model, "cuda", precision or "bf16", artifact)


def open_model(model: Any, device: str, precision: str, artifact: Artifact) -> TorchBackend:
    """The torch backend of ``model`` as the commands open it: on CUDA with the environment's opt-ins
    (``env_options``), then with what ``imedsam-bench --tune`` found fastest on this machine, if it ran."""
    from imedsam_cuda.torch_tuning import apply_saved, default_root

    be = TorchBackend(model, device, precision, max_batch=artifact.max_batch, max_points=artifact.max_points,
                      **(env_options() if device.startswith("cuda") else {}))
    apply_saved(be, default_root())
    return be


def env_options() -> dict[str, bool]:
    """torch-cuda's opt-in settings from the environment, as ``imedsam-infer`` and ``imedsam-bench`` open it (any
    value but 0 turns one on): ``IMEDSAM_TORCH_COMPILE`` compiles its stages with ``torch.compile``;
    ``IMEDSAM_TORCH_TRITON`` runs its Triton kernels (the encoder's fused adds and norms, attention operands and
    frequency chain, the decoder's fused point rows and uncertainty, the planner's fused levels), each off by default until a GPU has timed it,
    and the box part in fp32 (``fp32_box_part``), whose norms the fused-norms kernel then runs too."""
    def on(name: str) -> bool:
        return os.environ.get(name, "") not in ("", "0")

    triton = on(TRITON_ENV)
    return {"compile": on(COMPILE_ENV), **dict.fromkeys(TRITON_OPTIONS, triton), "fp32_box_part": triton}


class TorchBackend(Backend):
    """``Backend`` over an in-process IMedSAM. device "cuda" is the product; "cpu" (fp32, no graphs) is the
    same code path for tests and as a CPU comparison. ``bucket_points`` (default: with CUDA graphs or compile) pads
    decodes to ``point_bucket`` sizes. ``compile``: True compiles with inductor; a string names another
    ``torch.compile`` backend (tests use "aot_eager": the same whole-graph capture, no code generation).
    ``device_planner`` (default: on CUDA) runs the sparse query mode's planner on the device
    (``torch_sparse.DevicePlanner``), one graph per box instead of a host round trip per level;
    ``device_merge`` (default: on CUDA) keeps the full and box modes' decoder outputs on the device and does
    the UGS merge there. ``fused_attention`` (default: on CUDA) runs the encoder's attention, and the box
    part's, as one ``scaled_dot_product_attention`` call each (flash / memory-efficient kernels) instead of
    two GEMMs and a softmax; ``overlap_frequency`` (default: on CUDA without compile) issues the frequency-adapter chain,
    which never reads the tokens, on a second stream beside them. Both exact (tests/test_model.py).
    ``grid_sample`` (default on) samples the decoder's two maps with ``grid_sample`` (one kernel each) instead
    of the exported graph's Gather taps (~35 small ops each); within fp32 rounding (tests/test_export.py).
    ``align_matmuls`` (default: on CUDA) zero-pads the per-point layers' odd
    widths to multiples of 8, so that cuBLAS takes its aligned Hopper GEMMs instead of align1 / align2 ones
    (exact: tests/test_export.py; an H200's vit_b sparse frame 8.4 -> 6.9 ms at 384², 18.4 -> 14.2 ms at 896²).
    ``lean_encoder`` (default: on CUDA) runs the encoder with ``imedsam_cuda.encoder_rewrites``: each block's
    relative-position attention with one batched GEMM and a gather, windows by index gathers, the patch
    embedding as one GEMM, the neck channels-last with ``layer_norm`` (the same arithmetic to fp32 rounding in
    about 30% fewer kernels: tests/test_encoder_rewrites.py); ``lean_box_part`` (default: on CUDA) the box
    part with ``imedsam_cuda.box_part_rewrites``: its dense positional map made once, the upscaling's norm as
    one ``layer_norm`` (tests/test_box_part_rewrites.py). Both fixed for the backend's life. ``fp32_box_part``
    (default off: not yet timed on a GPU; ``set_box_precision`` switches it) runs the box part (SAM's two-way
    transformer and the upscaling) in fp32 with its weights kept in fp32, from transformer tokens made on the
    host in float64 (``box_part_rewrites.HostPromptTokens``): about 50 fewer kernels a box (no autocast casts, no
    prompt-encoder arithmetic on the device), closer to the fp32 model (tests/test_box_part_rewrites.py).
    ``relu_epilogue``
    (default: on CUDA) runs the per-point trunks' Linear -> ReLU pairs as one GEMM with its epilogue each
    (``DecoderGraph.use_relu_epilogue``: tests/test_export.py). ``fused_norms`` (default off: not yet timed on a
    GPU) runs the lean encoder's residual adds and norms as ``imedsam_cuda.fused_add_norm`` Triton kernels in the
    frequency-first loop (tests/test_fused_add_norm.py); ``fused_operands`` (default off, likewise) builds each lean
    block's attention operands with one ``imedsam_cuda.fused_attention_operands`` kernel instead of four to six ops
    (tests/test_fused_attention_operands.py); ``fused_frequency`` (default off, likewise) runs every block's
    frequency adapter with one ``imedsam_cuda.fused_frequency_chain`` kernel a frame instead of seven ops a block
    (tests/test_fused_frequency_chain.py). ``fused_features`` (default off: not yet timed on a GPU)
    builds each point's decoder input row (both map samples, the Fourier encoding) with one
    ``imedsam_cuda.fused_point_features`` Triton kernel instead of 8 ops (tests/test_fused_point_features.py);
    ``fused_uncertainty`` (default off, likewise) computes the closed-form uncertainty with one
    ``imedsam_cuda.fused_uncertainty`` kernel instead of 9 fp32 ops (tests/test_fused_uncertainty.py);
    ``fused_planner`` (default off, likewise) runs each device-planner level's bookkeeping as five
    ``imedsam_cuda.fused_planner`` Triton kernels instead of ~60 ops (tests/test_device_planner.py).
    ``gelu_epilogue`` (default off: not yet timed on a GPU, and on CUDA the tanh approximation of GELU) runs each
    encoder block's first MLP layer and its GELU as one GEMM (``encoder_rewrites.use_gelu_epilogue``).
    ``set_*`` switch these after the backend is built; ``torch_tuning`` times them on the machine."""

    def __init__(
        self, model: Any, device: str = "cuda", precision: str = "bf16", cuda_graphs: bool | None = None,
        max_batch: int = 8, max_points: int = 65536, compile: bool | str = False, bucket_points: bool | None = None,
        device_planner: bool | None = None, device_merge: bool | None = None, fused_attention: bool | None = None,
        overlap_frequency: bool | None = None, grid_sample: bool = True,
        align_matmuls: bool | None = None, lean_encoder: bool | None = None, lean_box_part: bool | None = None,
        relu_epilogue: bool | None = None, fused_norms: bool = False, fused_features: bool = False,
        fused_uncertainty: bool = False, fused_planner: bool = False, fused_operands: bool = False,
        fused_frequency: bool = False, fp32_box_part: bool = False, gelu_epilogue: bool = False,
    ) -> None:
        super().__init__(max_batch, max_points)
        if precision not in PRECISIONS:
            raise UserError(f"backend torch: precision {precision!r} not one of {', '.join(PRECISIONS)}")
        given = locals()  # the arguments, by name
        if compile and any(given[k] for k in TRITON_OPTIONS):
            # two ways to the same end (inductor writes its own fused kernels); together they are untested
            raise UserError(f"backend torch: torch.compile ({COMPILE_ENV}) and the hand-written Triton kernels "
                            f"({TRITON_ENV}) are alternatives: set one")
        if device.startswith("cuda"):
            reason = _no_cuda_reason()
            if reason:
                raise UserError(f"backend torch-cuda: {reason}")
        import torch
        from torch import nn

        from imedsam_export.graphs import DecoderGraph
        from imedsam_export.merge import merge_for_export

        self.torch = torch
        self.device = torch.device(device)
        self.name = "torch-cuda" if self.device.type == "cuda" else "torch-cpu"
        self.precision = precision
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        self.use_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise UserError("backend torch: CUDA graphs need a CUDA device")
        if any(p.device.type != "cpu" for p in model.parameters()):  # the folding check runs on the CPU
            import copy

            model = copy.deepcopy(model).cpu()
        folded, _ = merge_for_export(model)  # LoRA merged, BatchNorm folded, verified against model
        folded = folded.to(self.device).eval()
        self.model = folded
        cuda = self.device.type == "cuda"
        from imedsam_cuda.encoder_loop import InferenceEncoder

        # the encoder with the chain-first loop (its frequency stream, the fused options' steps)
        self.encoder = InferenceEncoder(folded.image_encoder, frequency_first=False)
        folded.image_encoder = self.encoder
        self.lean_encoder = cuda if lean_encoder is None else lean_encoder
        if self.lean_encoder:  # from the fp32 layers; store_weights_in below casts the new ones too
            from imedsam_cuda.encoder_rewrites import lean_encoder as rewrite

            rewrite(self.encoder, self.amp_dtype or torch.float32)
        self.lean_box_part = cuda if lean_box_part is None else lean_box_part
        # the box part under the autocast here; set_box_precision (below) switches it to fp32
        self.fp32_box_part = False
        self._prompt_tokens: Any = None
        if self.lean_box_part:
            from imedsam_cuda.box_part_rewrites import lean_box_part as rewrite_box_part

            rewrite_box_part(folded, self.amp_dtype)
        self._graphs: dict[tuple[Any, ...], tuple[Any, list[Any], Any]] = {}
        self._box_cache: tuple[Any, np.ndarray, Any] | None = None
        # streams inside a compiled graph are not supported by dynamo's fullgraph capture
        self.set_encoder_options(cuda if fused_attention is None else fused_attention,
                                 (cuda and not compile) if overlap_frequency is None else overlap_frequency)
        decoder = DecoderGraph(folded)

        class _Fp32(nn.Module):  # an fp32 island inside autocast
            def __init__(self, inner: nn.Module) -> None:
                super().__init__()
                self.inner = inner

            def forward(self, *xs: Any) -> Any:
                with torch.autocast(device_type=xs[0].device.type, enabled=False):
                    return self.inner(*(x.float() for x in xs))

        decoder.uncertainty = _Fp32(decoder.uncertainty)  # type: ignore[assignment]
        self.decoder = decoder.to(self.device).eval()
        # the box part's layers' fp32 weights and biases, kept for an fp32 box part (set_box_precision): ~16 MB at vit_b
        self._box_masters = {m: (m.weight.data, None if m.bias is None else m.bias.data)
                             for part in (folded.prompt_encoder, folded.mask_decoder) for m in weight_layers(part)}
        if self.amp_dtype is not None:  # self.model's layers included (the decoder holds it)
            store_weights_in(self.decoder, self.amp_dtype)
        self.num_classes = folded.cfg.num_classes
        self.compiled = bool(compile)
        self.tuned_from: Path | None = None  # the tuning file applied (torch_tuning.apply_saved), if any
        # graphs and compiled code are both per shape: bucket the point count for either
        self.bucket_points = (self.use_graphs or self.compiled) if bucket_points is None else bucket_points
        self._points_pool: Any = None
        dec = self.decoder

        def encode_fn(im: Any) -> Any:
            return self.model.encode(im).float()

        def prompt_fn(e: Any, bb: Any, tokens: Any = None) -> Any:  # fp32 up map: sampled in fp32 by every decoder call
            if tokens is None:
                return self.model.decoder_features(e, bb)[0].float()
            with torch.autocast(device_type=e.device.type, enabled=False):  # fp32_box_part
                return self.model.decoder_features(e.float(), bb, tokens)[0]

        def points_fn(up: Any, c: Any) -> tuple[Any, Any, Any]:
            return tuple(o.float() for o in dec.point_outputs(up, c))  # type: ignore[return-value]

        scale = contract.PIXEL_SCALE

        def encode_pixels_fn(px: Any) -> Any:  # = preprocess.pixels_to_model (the float32 product rounds alike)
            return encode_fn(px.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format) * scale)

        fns: dict[str, Callable[..., Any]] = {"enc": encode_fn, "enc_pixels": encode_pixels_fn, "prompt": prompt_fn,
                                              "points": points_fn}
        # traced inside the compiled planner and whole-frame graphs (not a compiled call in a compiled one)
        self._raw_encode, self._raw_prompt, self._raw_points = encode_fn, prompt_fn, points_fn
        self._compile_backend: str | None = None
        if compile:
            import torch._dynamo

            # each (batch, bucket) shape is its own specialisation: allow more than dynamo's default 8
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            backend = compile if isinstance(compile, str) else "inductor"
            self._compile_backend = backend
            fns = {k: torch.compile(f, fullgraph=True, dynamic=False, backend=backend) for k, f in fns.items()}
        self._fns = fns
        self.device_planner = self.device.type == "cuda" if device_planner is None else device_planner
        self.device_merge = self.device.type == "cuda" if device_merge is None else device_merge
        self._planners: dict[tuple[Any, ...], Any] = {}
        self._plans: dict[tuple[Any, ...], Callable[..., Any]] = {}  # the planner's captured (or compiled) function
        self._axes: dict[tuple[int, int], tuple[Any, ...]] = {}  # output size -> device (x, y) pixel centres
        self.planner_fallbacks = 0  # boxes the device planner handed back to the host planner (over budget)
        self.set_decoder_sampling(grid_sample)
        self.set_decoder_alignment(self.device.type == "cuda" if align_matmuls is None else align_matmuls)
        self.set_decoder_epilogue(self.device.type == "cuda" if relu_epilogue is None else relu_epilogue)
        self.fused_features = self.fused_uncertainty = self.fused_planner = False
        if fused_features:
            self.set_decoder_features(True)
        if fused_uncertainty:
            self.set_decoder_uncertainty(True)
        if fused_planner:
            self.set_planner_kernels(True)
        self.fused_norms = self.fused_operands = self.fused_frequency = False
        self.set_encoder_gelu(gelu_epilogue)
        if fp32_box_part and self.amp_dtype is not None:  # (in an fp32 backend the box part is fp32 already)
            self.set_box_precision(True)
        if fused_norms:
            self.set_encoder_norms(True)
        if fused_operands:
            self.set_encoder_operands(True)
        if fused_frequency:
            self.set_encoder_frequency(True)
        from imedsam_cuda.torch_tuning import settings_of

        # the switchable options as built: what a tuning starts from and is keyed by (torch_tuning)
        self.built_settings = settings_of(self)

    def set_encoder_options(self, fused_attention: bool, overlap_frequency: bool) -> None:
        """Every attention (the encoder's and the box part's) as one SDPA call or explicit GEMMs, and the
        encoder's frequency chain on a second stream or in line (both exact); graphs captured under other
        options are dropped. The encoder attention's position tables are precomputed for the setting
        (``encoder_attention.InferenceAttention``)."""
        from imedsam_cuda.encoder_attention import inference_attention
        from imedsam_cuda.prompt_attention import use_fused_prompt_attention

        self.fused_attention, self.overlap_frequency = fused_attention, overlap_frequency
        # the folded copy's weights never change: its relative-position tables are gathered, cast and padded once
        inference_attention(self.model, fused_attention, self.amp_dtype or self.torch.float32)
        use_fused_prompt_attention(self.model, fused_attention)  # the box part's two-way transformer too
        self.encoder.frequency_first = overlap_frequency
        self._drop_encoder_graphs()
        self._drop_box_graphs()

    def set_encoder_norms(self, fused: bool) -> None:
        """The lean encoder's residual adds, LayerNorms and casts as ``fused_add_norm`` Triton kernels (two a block
        instead of seven; a windowed block's gather back to grid order read in the add, one kernel fewer) or as torch
        ops, in the frequency-first block loop; with an fp32 box part, its two-way transformer's adds, norms and
        positional adds too (nine kernels instead of 23); encoder and box-part graphs are dropped."""
        if fused:
            self._need_triton("fused encoder norms",
                              None if self.lean_encoder else "it needs the lean encoder (lean_encoder=True)")
        from imedsam_cuda.box_part_rewrites import use_fused_box_norms
        from imedsam_cuda.encoder_rewrites import use_fused_norms

        use_fused_norms(self.encoder, fused)
        # the box part's too where it runs the lean two-way transformer (fp32: fp32_box_part)
        use_fused_box_norms(self.model.mask_decoder.transformer, fused)
        self.fused_norms = fused
        self._drop_encoder_graphs()
        self._drop_box_graphs()

    def set_box_precision(self, fp32: bool) -> None:
        """The box part (prompt encoder, SAM's two-way transformer, the upscaling) in fp32 with its layers' fp32
        weights, from transformer tokens made on the host in float64 (``box_part_rewrites.HostPromptTokens``), with
        the lean two-way transformer where ``lean_box_part`` (and its norms fused where ``fused_norms``); or under
        the backend's autocast with its weights in that dtype. Bitwise a backend built either way (the fp32
        weights are kept); box-part graphs are dropped."""
        if self.amp_dtype is None:
            if fp32:
                raise UserError(f"backend {self.name}: fp32 box part: the backend runs in fp32 already")
            return
        from imedsam_cuda.box_part_rewrites import (
            HostPromptTokens,
            freeze_dense_pe,
            use_fused_box_norms,
            use_lean_two_way,
        )

        for m, (w, b) in self._box_masters.items():
            m.weight.data = w if fp32 else w.to(self.amp_dtype)
            if b is not None:
                m.bias.data = b if fp32 else b.to(self.amp_dtype)
        self._prompt_tokens = HostPromptTokens(self.model) if fp32 else None
        if self.lean_box_part:  # as lean_box_part(model, None if fp32 else autocast dtype) would have left it
            transformer = self.model.mask_decoder.transformer
            freeze_dense_pe(self.model, None if fp32 else self.amp_dtype)
            use_lean_two_way(transformer, fp32)
            use_fused_box_norms(transformer, fp32 and self.fused_norms)
        self.fp32_box_part = fp32
        self._drop_box_graphs()

    def set_encoder_operands(self, fused: bool) -> None:
        """The lean encoder blocks' attention operands (the extended queries, keys and values; a windowed block's
        window gather) as one ``fused_attention_operands`` Triton kernel a block instead of four to six torch ops;
        encoder graphs are dropped."""
        if fused:
            self._need_triton("fused attention operands",
                              None if self.lean_encoder else "it needs the lean encoder (lean_encoder=True)")
        from imedsam_cuda.encoder_rewrites import use_fused_operands

        use_fused_operands(self.encoder, fused)
        self.fused_operands = fused
        self._drop_encoder_graphs()

    def set_encoder_frequency(self, fused: bool) -> None:
        """Every block's frequency adapter as one ``fused_frequency_chain`` Triton kernel a frame instead of seven
        torch ops a block, or as torch ops; encoder graphs are dropped."""
        if fused:
            self._need_triton("fused frequency chain")
        from imedsam_cuda.encoder_rewrites import use_fused_frequency

        self.fused_frequency = use_fused_frequency(self.encoder, fused)
        self._drop_encoder_graphs()

    def set_encoder_gelu(self, on: bool) -> None:
        """Each encoder block's MLP with its first layer and GELU as one GEMM (``encoder_rewrites.use_gelu_epilogue``:
        cuBLASLt's GELU epilogue on CUDA, the tanh approximation) or as torch's layers; encoder graphs are dropped."""
        from imedsam_cuda.encoder_rewrites import use_gelu_epilogue

        self.gelu_epilogue = use_gelu_epilogue(self.encoder, on) > 0
        self._drop_encoder_graphs()

    def _need_triton(self, what: str, why: str | None = None) -> None:
        """Refuse a Triton option in one line where its kernel cannot run here (or for ``why``)."""
        from imedsam_cuda.triton_support import available

        why = available(self.device) or why
        if why:
            raise UserError(f"backend {self.name}: {what}: {why}")

    def set_decoder_sampling(self, grid_sample: bool) -> None:
        """The per-point decoder's two map samples as ``grid_sample`` calls or the exported graph's Gather taps
        (equal within fp32 rounding); graphs and compiled planners that contain the decoder are dropped."""
        self.grid_sample = grid_sample
        self.decoder.use_grid_sample(grid_sample)
        self._drop_decoder_graphs()

    def set_decoder_features(self, fused: bool) -> None:
        """Each point's decoder input row (both map samples, the Fourier encoding, the alignment zeros) as one
        Triton kernel (``fused_point_features``) or as torch ops; graphs and compiled planners that contain the
        decoder are dropped."""
        if fused:
            from imedsam_cuda.fused_point_features import FusedPointFeatures

            self._need_triton("fused point features")
            self.decoder.point_features = FusedPointFeatures(self.decoder).to(self.device)
        else:
            self.decoder.point_features = None
        self.fused_features = fused
        self._drop_decoder_graphs()

    def set_decoder_uncertainty(self, fused: bool) -> None:
        """The decoder's closed-form uncertainty as one Triton kernel (``fused_uncertainty``) or as its nine fp32
        torch ops; graphs and compiled planners that contain the decoder are dropped."""
        if fused:
            from imedsam_cuda.fused_uncertainty import FusedUncertainty
            from imedsam_export.graphs import PointUncertainty

            self._need_triton("fused uncertainty")
            inner = next(m for m in self.decoder.uncertainty.modules() if isinstance(m, PointUncertainty))
            self.decoder.point_uncertainty = FusedUncertainty(inner.w2).to(self.device)
        else:
            self.decoder.point_uncertainty = None
        self.fused_uncertainty = fused
        self._drop_decoder_graphs()

    def set_planner_kernels(self, fused: bool) -> None:
        """Each device-planner level's bookkeeping (recording, refinement, dilation, next candidates, fill) as
        five Triton kernels (``imedsam_cuda.fused_planner``) or as torch ops; graphs and compiled planners that contain a
        plan are dropped."""
        if fused:
            self._need_triton("fused planner")
        self.fused_planner = fused
        for pl in self._planners.values():
            pl.fused = fused
        self._drop_decoder_graphs()

    def set_decoder_alignment(self, on: bool) -> None:
        """The per-point layers with odd widths as zero-padded copies (``DecoderGraph.align_matmuls``: exact);
        graphs and compiled planners that contain the decoder are dropped."""
        self.decoder.align_matmuls(on)
        self.align_matmuls = on
        self._drop_decoder_graphs()

    def set_decoder_epilogue(self, on: bool) -> None:
        """The per-point trunks' Linear -> ReLU pairs as GEMMs with a bias-and-ReLU epilogue
        (``DecoderGraph.use_relu_epilogue``); graphs and compiled planners that contain the decoder are dropped."""
        self.decoder.use_relu_epilogue(on)
        self.relu_epilogue = self.decoder.relu_epilogue
        self._drop_decoder_graphs()

    def _drop_encoder_graphs(self) -> None:
        for key in [k for k in self._graphs if k[0] == "enc"]:
            del self._graphs[key]

    def _drop_box_graphs(self) -> None:
        for key in [k for k in self._graphs if k[0] == "prompt"]:
            del self._graphs[key]
        self._box_cache = None

    @property
    def fused_box_norms(self) -> bool:
        """Whether the box part's norms run as ``fused_add_norm`` kernels (``fused_norms`` with an fp32 box part)."""
        return bool(getattr(self.model.mask_decoder.transformer, "fused_norms", False))

    def _drop_decoder_graphs(self) -> None:
        for key in [k for k in self._graphs if k[0] not in ("enc", "prompt")]:
            del self._graphs[key]
        self._plans.clear()

    def planner(self, out_hw: tuple[int, int], fraction: float, cfg: Any) -> Any:
        """The device sparse planner for this output size and config (made once; its budgets grow)."""
        from imedsam_cuda.torch_sparse import DevicePlanner

        key = (tuple(out_hw), fraction, cfg)
        if key not in self._planners:
            self._planners[key] = DevicePlanner(out_hw, fraction, cfg, self.device)
            self._planners[key].fused = self.fused_planner
        return self._planners[key]

    @property
    def description(self) -> str:
        gpu = f" on {self.torch.cuda.get_device_name(self.device)}" if self.device.type == "cuda" else ""
        graphs = ", CUDA graphs" if self.use_graphs else ""
        compiled = ", torch.compile" if self.compiled else ""
        opts = (", SDPA attention" if self.fused_attention else "") + (
            ", frequency stream" if self.overlap_frequency else "") + (", grid_sample taps" if self.grid_sample else "") + (
            ", aligned decoder matmuls" if self.align_matmuls else "") + (
            ", lean encoder" if self.lean_encoder else "") + (", lean box part" if self.lean_box_part else "") + (
            ", ReLU epilogues" if self.relu_epilogue else "") + (", fp32 box part" if self.fp32_box_part else "") + (
            ", fused encoder norms" if self.fused_norms else "") + (" (box part too)" if self.fused_box_norms else "") + (
            ", fused attention operands" if self.fused_operands else "") + (
            ", fused frequency chain" if self.fused_frequency else "") + (
            ", GELU epilogues" if self.gelu_epilogue else "") + (
            ", fused point features" if self.fused_features else "") + (
            ", fused uncertainty" if self.fused_uncertainty else "") + (", fused planner" if self.fused_planner else "") + (
            ", tuned" if self.tuned_from is not None else "")
        return f"{self.name} ({self.precision}{graphs}{compiled}{opts}){gpu}"

    # --- plumbing ---
    def _autocast(self) -> Any:
        t = self.torch
        if self.amp_dtype is None:
            return t.autocast(device_type=self.device.type, enabled=False)
        return t.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _run(self, key: tuple[Any, ...], fn: Callable[..., Any], inputs: list[Any]) -> Any:
        """fn(*inputs) under autocast; on CUDA with graphs, captured once per input shape, then replayed."""
        t = self.torch
        with t.inference_mode():
            if not self.use_graphs:
                with self._autocast():
                    return fn(*inputs)
            entry = self._graphs.get(key)
            if entry is None:
                static_in = [x.clone() for x in inputs]
                side = t.cuda.Stream()
                side.wait_stream(t.cuda.current_stream())
                with t.cuda.stream(side), self._autocast():
                    for _ in range(2):  # warm-up: cuFFT plans, cuBLAS handles, autotuning
                        fn(*static_in)
                t.cuda.current_stream().wait_stream(side)
                graph = t.cuda.CUDAGraph()
                pool = None
                if key[0] == "points":  # outputs copied out right after each replay: sharing a pool is safe
                    if self._points_pool is None:
                        self._points_pool = t.cuda.graph_pool_handle()
                    pool = self._points_pool
                with t.cuda.graph(graph, pool=pool), self._autocast():
                    static_out = fn(*static_in)
                entry = (graph, static_in, static_out)
                self._graphs[key] = entry
            graph, static_in, static_out = entry
            for dst, src in zip(static_in, inputs, strict=True):
                dst.copy_(src)
            graph.replay()
            return static_out

    def _tensor(self, a: np.ndarray, dtype: Any = np.float32) -> Any:
        """Host array -> device tensor, through pinned memory on CUDA. An upload from pageable memory first waits
        for all the work queued on the stream: after ``encode`` launched the encoder's graph, the box part's
        upload would hold the host until the encoder finished, leaving the GPU idle while the host then
        prepares the box and planner graphs. From pinned memory the copy is queued like a kernel, and the host
        runs ahead. (The pinned block comes from torch's caching host allocator, which keeps it until the copy
        is done.)"""
        t = self.torch.from_numpy(np.ascontiguousarray(a, dtype=dtype))
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    # --- Backend interface ---
    def encode(self, images: np.ndarray) -> Sequence[Embedding]:
        return self._encode("enc", self._tensor(images))

    def encode_pixels(self, pixels: np.ndarray) -> Sequence[Embedding]:
        """Uploads the resized uint8 pixels (a third of the float32 bytes) and converts them inside the
        encoder's graph: no host float conversion or transpose."""
        return self._encode("enc_pixels", self._tensor(pixels, np.uint8))

    def _encode(self, fn: str, x: Any) -> list[Embedding]:
        emb = self._run(("enc", fn, tuple(x.shape)), self._fns[fn], [x])
        if self.use_graphs:  # the graph's output is overwritten by its next replay: handles own a copy
            emb = emb.clone()
        return [emb[i : i + 1] for i in range(emb.shape[0])]

    def box_features(self, embedding: Embedding, boxes: np.ndarray) -> Any:
        """The box part, memoised for the last (embedding object, boxes) pair, as in the ONNX Runtime backend:
        a box's points come in several chunks or planner levels. Keyed on the embedding's identity (``encode``
        returns new handles each call; a replayed graph's output is only overwritten by the next miss)."""
        c = self._box_cache
        if c is not None and c[0] is embedding and np.array_equal(c[1], boxes):
            return c[2]
        b = boxes.shape[0]
        emb = embedding.expand(b, -1, -1, -1) if embedding.shape[0] != b else embedding
        if not emb.is_contiguous(memory_format=self.torch.channels_last):  # the lean encoder's is channels-last
            emb = emb.contiguous()
        up = self._run(("prompt", tuple(emb.shape)), self._fns["prompt"], [emb, *self._box_inputs(boxes)])
        self._box_cache = (embedding, boxes.copy(), up)
        return up

    def _box_inputs(self, boxes: np.ndarray) -> list[Any]:
        """The box part's device inputs after the embedding: the boxes, and with an fp32 box part their
        transformer tokens made on the host (``prompt_fn``'s arguments)."""
        inputs = [self._tensor(boxes)]
        if self._prompt_tokens is not None:
            inputs.append(self._tensor(self._prompt_tokens(boxes)))
        return inputs

    def _points(self, up: Any, coords: Any) -> tuple[Any, Any, Any]:
        """The per-point part on the device for coords (B, N, 2), a numpy array or a device tensor: (B, K, N)
        tensors, views of a graph's outputs (valid until its next replay)."""
        n = coords.shape[1]
        host = isinstance(coords, np.ndarray)
        bucket = point_bucket(n, self.max_points) if self.bucket_points else n
        if bucket != n:  # padding points sit at the centre: valid, and dropped below
            shape = (coords.shape[0], bucket, 2)
            padded = np.zeros(shape, np.float32) if host else self.torch.zeros(shape, device=self.device)
            padded[:, :n] = coords
            coords = padded
        cc = self._tensor(coords) if host else coords
        outs = self._run(("points", tuple(up.shape), tuple(cc.shape)), self._fns["points"], [up, cc])
        return outs[0][..., :n], outs[1][..., :n], outs[2][..., :n]

    def _chunk_coords(self, region: Region, out_hw: tuple[int, int], start: int, stop: int) -> Any:
        """``preprocess.region_chunk_coords`` on the device: the same float32 pixel centres (gathered from the
        host's axis values, uploaded once per output size), with no host work or upload per chunk."""
        t = self.torch
        axes = self._axes.get(out_hw)
        if axes is None:
            axes = self._axes[out_hw] = tuple(self._tensor(axis_centres(n)) for n in (out_hw[1], out_hw[0]))
        xs, ys = axes
        idx = t.arange(start, stop, device=self.device)
        rw = region.c1 - region.c0
        return t.stack([xs[region.c0 + idx % rw], ys[region.r0 + idx // rw]], dim=-1)

    def decode(
        self, embedding: Embedding, boxes: np.ndarray, coords: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c, f, u = (o.cpu().numpy() for o in self._points(self.box_features(embedding, boxes), coords))
        return c, f, u

    def decode_merged(self, embedding: Embedding, boxes: np.ndarray, region: Region, out_hw: tuple[int, int],
                      chunk: int, k: int) -> np.ndarray | None:
        """All of one box's region decoded into device buffers and UGS-merged there (``topk``), its coordinates
        built on the device: only the merged logits cross the bus (not the coordinates, nor three float
        arrays for a host ``argpartition``)."""
        if not self.device_merge:
            return None
        t = self.torch
        up = self.box_features(embedding, boxes)
        n = region.size
        bufs = [t.empty((self.num_classes, n), dtype=t.float32, device=self.device) for _ in range(3)]
        for s in range(0, n, chunk):
            e = min(n, s + chunk)
            for buf, o in zip(bufs, self._points(up, self._chunk_coords(region, out_hw, s, e)[None]), strict=True):
                buf[:, s:e].copy_(o[0])
        coarse, fine, unc = bufs
        return ugs_merge_device(coarse, fine, unc, k).cpu().numpy()  # type: ignore[no-any-return]

    def sparse_region(
        self, embedding: Embedding, boxes: np.ndarray, region: tuple[int, int, int, int], out_hw: tuple[int, int],
        fraction: float, cfg: Any,
    ) -> tuple[np.ndarray, int] | None:
        """The sparse planner on the device: (logits (K, h, w), points queried), or None where the host
        planner must run (planner off, a region it does not handle, or a level over its point budget: the
        budgets then double for the next box, one graph replacing the other)."""
        if not self.device_planner:
            return None
        r0, r1, c0, c1 = region
        pkey = (tuple(out_hw), fraction, cfg)
        planner = self.planner(out_hw, fraction, cfg)
        if not planner.usable(r1 - r0, c1 - c0):
            return None
        up = self.box_features(embedding, boxes)
        plan = self._plans.get(pkey)
        if plan is None:
            points: Callable[..., Any]
            if self._compile_backend:
                points = self._raw_points
            elif self.fused_planner:  # the logits as the decoder leaves them: the scatter kernel widens them
                points = self.decoder.point_outputs
            else:
                points = self._fns["points"]

            def plan_fn(u: Any, reg: Any, table: Any) -> tuple[Any, ...]:
                return planner.plan(lambda c: tuple(o[0] for o in points(u, c[None])), reg, table)  # type: ignore[no-any-return]

            # compiled whole: the planner's own ~250 small elementwise ops and its decoder calls fuse together
            plan = plan_fn if self._compile_backend is None else self.torch.compile(
                plan_fn, fullgraph=True, dynamic=False, backend=self._compile_backend)
            self._plans[pkey] = plan
        reg, table = planner.region_inputs(r0, r1 - r0, c0, c1 - c0)  # on the host: ~20 kernels fewer in the plan
        out = self.run_planner(("sparse", tuple(up.shape), pkey), planner, plan,
                               [up, self._tensor(reg, np.int64), self._tensor(table)])
        if out is None:
            return None
        val, _, queried = out[:3]
        return val[:, : r1 - r0, : c1 - c0].cpu().numpy(), int(queried)

    def run_planner(self, key: tuple[Any, ...], planner: Any, fn: Callable[..., Any], inputs: list[Any]) -> Any:
        """``fn(*inputs)``, a function ending in ``planner.plan``, through ``_run`` (one graph per planner
        budget); None when a level overflowed its budget: the caller plans this box on the host, and the
        budgets grow to what the levels needed (``DevicePlanner.grow``; the outgrown graph is dropped)."""
        gkey = (*key, planner.budget_key())
        out = self._run(gkey, fn, inputs)
        if bool(out[3]):
            self._graphs.pop(gkey, None)
            planner.grow([int(n) for n in out[4].tolist()])
            self.planner_fallbacks += 1
            return None
        return out

    def close(self) -> None:
        self._graphs.clear()
        self._box_cache = None
        self._planners.clear()
        self._plans.clear()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()
