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
- optionally (settings ``compile=True``, or ``--backend-option compile=1``) each captured function is first compiled
  by ``torch.compile`` (inductor: fused elementwise kernels, autotuned GEMMs), still replayed as a CUDA graph;
- optionally (``--backend-option triton=1``, or the six options) hand-written Triton kernels replace torch ops: the
  encoder's residual adds and norms, its attention operands and its frequency-adapter chain, each decoder point's
  input row, the decoder's uncertainty, the sparse planner's per-level bookkeeping.

Weights: an artifact holds ONNX graphs, not PyTorch weights, so ``create`` needs the checkpoint the artifact
was exported from (manifest ``source.checkpoint``, or ``--backend-option checkpoint=PATH``);
``TorchBackend(model)`` takes an in-process model (benchmarks, tests). What the commands' ``--backend-option``s
set (``OPTIONS``) is ``torch_settings.OpenOptions``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from imedsam_core import contract
from imedsam_core.errors import UserError
from imedsam_cuda.torch_settings import (
    OPTIONS as OPTIONS,  # what torch-cuda takes (``--backend-option``): the registry reads it here
)
from imedsam_cuda.torch_settings import (
    PRECISIONS,
    TRITON_OPTIONS,
    OpenOptions,
    TorchCudaSettings,
)
from imedsam_deploy.backends.base import Backend, Embedding
from imedsam_deploy.manifest import Artifact
from imedsam_deploy.preprocess import Region, axis_centres

POINT_BUCKET_MIN = 1024  # the smallest padded decode: below it a graph replay costs the same whatever N
# settings read only as frames run, never by the build: a change of these alone keeps the inference copy and its
# stages' functions, and drops only what was captured or made under the old setting (``TorchBackend.configure``)
RUN_TIME_SETTINGS = frozenset({"bucket_points", "device_planner", "device_merge", "fused_planner"})


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
    layers' fp32 weights: ``TorchCudaSettings.fp32_box_part``.)"""
    layers = weight_layers(module)
    for m in layers:
        m.weight.data = m.weight.data.to(dtype)
        if m.bias is not None:
            m.bias.data = m.bias.data.to(dtype)
    return len(layers)


def _check(settings: TorchCudaSettings) -> None:
    """Refuse, in one line, settings no backend runs."""
    if settings.precision not in PRECISIONS:
        raise UserError(f"backend torch: precision {settings.precision!r} not one of {', '.join(PRECISIONS)}")
    if settings.compile and any(getattr(settings, k) for k in TRITON_OPTIONS):
        # two ways to the same end (inductor writes its own fused kernels); together they are untested
        raise UserError("backend torch: torch.compile (compile=1) and the hand-written Triton kernels (triton=1) "
                        "are alternatives: set one")


def _no_cuda_reason() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install 'imedsam[train]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device visible to torch (torch.cuda.is_available() is False)"
    return None


def source_checkpoint(artifact: Artifact, given: Path | None = None) -> Path | None:
    """The PyTorch checkpoint behind ``artifact``: ``given`` (``--backend-option checkpoint=PATH``), else manifest
    source.checkpoint."""
    if given is not None:
        return given
    src = artifact.manifest.get("source")
    ck = src.get("checkpoint") if isinstance(src, dict) else None
    if not ck:
        return None
    p = Path(ck)
    return p if p.is_absolute() else artifact.path / p


def probe(artifact: Artifact, options: dict[str, Any] | None = None) -> str | None:
    """None where torch-cuda can run ``artifact`` here, opened with ``options`` (``OPTIONS``' keys, typed), else
    why not."""
    opened = OpenOptions.of(options)
    if artifact.resize != contract.RESIZE_MODE:
        # its rewrites, kernels and on-device query paths are written for the SAM-ViT model's stretch frame
        return f"runs SAM-ViT artifacts only; {artifact.path} is a lite ({artifact.resize}) artifact"
    reason = _no_cuda_reason()
    if reason:
        return reason
    ck = source_checkpoint(artifact, opened.checkpoint)
    if ck is None or not ck.is_file():
        return ("needs the PyTorch checkpoint the artifact came from (its manifest's source.checkpoint, or "
                "--backend-option checkpoint=PATH)")
    return None


def create(artifact: Artifact, precision: str | None = None, options: dict[str, Any] | None = None) -> TorchBackend:
    reason = probe(artifact, options)
    if reason:
        raise UserError(f"backend torch-cuda: {reason}")
    from imedsam_train.checkpoint import load_checkpoint

    ck = source_checkpoint(artifact, OpenOptions.of(options).checkpoint)
    assert ck is not None
    model, _ = load_checkpoint(ck)
    return open_model(model, "cuda", precision or "bf16", artifact, options)


def open_model(model: Any, device: str, precision: str, artifact: Artifact,
               options: dict[str, Any] | None = None) -> TorchBackend:
    """The torch backend of ``model`` as the commands open it: with the opt-ins of ``options`` (the
    ``--backend-option``s, typed: ``torch_settings.OpenOptions``), then, unless ``tuned`` is off, with what
    ``imedsam-bench --tune`` found fastest on this machine, if it ran."""
    from imedsam_cuda.torch_tuning import apply_saved, default_root

    opened = OpenOptions.of(options)
    settings = TorchCudaSettings(precision=precision, max_batch=artifact.max_batch, max_points=artifact.max_points)
    be = TorchBackend(model, device, opened.apply(settings))
    if opened.tuned:
        apply_saved(be, default_root())
    return be


class TorchBackend(Backend):
    """``Backend`` over an in-process IMedSAM, run as ``settings`` say (``TorchCudaSettings``: each option, its
    default and its test). device "cuda" is the product; "cpu" (fp32, no graphs) is the same code path for tests
    and as a CPU comparison. The trained model is LoRA-merged and BatchNorm-folded once (verified, kept in fp32 on
    the host); ``configure`` builds the inference copy from it for other settings (``torch_tuning`` times them on
    the machine), or keeps it where only settings read as frames run changed (``RUN_TIME_SETTINGS``). ``settings`` holds them with the device's defaults resolved; ``built_settings`` those it was
    built with."""

    settings: TorchCudaSettings  # as it runs now (the device's defaults resolved)

    def __init__(self, model: Any, device: str = "cuda", settings: TorchCudaSettings | None = None) -> None:
        settings = TorchCudaSettings() if settings is None else settings
        super().__init__(settings.max_batch, settings.max_points)
        _check(settings)
        if device.startswith("cuda"):
            reason = _no_cuda_reason()
            if reason:
                raise UserError(f"backend torch-cuda: {reason}")
        import torch

        from imedsam_export.merge import merge_for_export

        self.torch = torch
        self.device = torch.device(device)
        self.name = "torch-cuda" if self.device.type == "cuda" else "torch-cpu"
        if any(p.device.type != "cpu" for p in model.parameters()):  # the folding check runs on the CPU
            import copy

            model = copy.deepcopy(model).cpu()
        # LoRA merged, BatchNorm folded, verified against model; kept on the host, each build copies it
        self._folded = merge_for_export(model)[0].eval()
        self.tuned_from: Path | None = None  # the tuning file applied (torch_tuning.apply_saved), if any
        self.planner_fallbacks = 0  # boxes the device planner handed back to the host planner (over budget)
        self._build(settings.resolved(self.device.type == "cuda"))
        # what a tuning starts from and is keyed by (torch_tuning)
        self.built_settings = self.settings

    def configure(self, settings: TorchCudaSettings) -> None:
        """Run as ``settings`` say from now on (``dataclasses.replace(be.settings, ...)``): bitwise a backend built
        with them. Where only settings read as frames run changed (``RUN_TIME_SETTINGS``: the point buckets, the
        device planner and merge, the planner's kernels), the inference copy and its stages' functions are kept
        and only the captured graphs, planners and plans are dropped; otherwise the copy is built again from the
        folded model, every graph, compiled function and planner made anew. An fp32 box part asked of an fp32
        backend (nothing to do) is refused in one line: the tuner reports it as not tried."""
        _check(settings)
        if settings.fp32_box_part and settings.precision == "fp32":
            raise UserError(f"backend {self.name}: fp32 box part: the backend runs in fp32 already")
        s = settings.resolved(self.device.type == "cuda")
        changed = {f.name for f in fields(s) if getattr(s, f.name) != getattr(self.settings, f.name)}
        if not changed <= RUN_TIME_SETTINGS:
            self._build(s)
            return
        if s.fused_planner:
            self._need_triton("fused planner")
        self.settings = s
        self._drop_captures()

    def _drop_captures(self) -> None:
        """Forget every captured graph (and its memory pool), the memoised box part, the planners and their plans:
        what a frame makes under the settings it runs with."""
        self._graphs: dict[tuple[Any, ...], tuple[Any, list[Any], Any]] = {}
        self._box_cache: tuple[Any, np.ndarray, Any] | None = None
        self._points_pool: Any = None
        self._planners: dict[tuple[Any, ...], Any] = {}
        self._plans: dict[tuple[Any, ...], Callable[..., Any]] = {}  # the planner's captured (or compiled) function

    def _build(self, s: TorchCudaSettings) -> None:
        """The inference copy of the folded model for ``s`` (resolved), its stages' functions and empty caches."""
        import copy

        torch = self.torch
        from torch import nn

        from imedsam_cuda.encoder_attention import inference_attention
        from imedsam_cuda.encoder_loop import InferenceEncoder
        from imedsam_cuda.encoder_rewrites import (
            lean_encoder,
            use_fused_frequency,
            use_fused_norms,
            use_fused_operands,
            use_gelu_epilogue,
        )
        from imedsam_cuda.prompt_attention import use_fused_prompt_attention
        from imedsam_export.graphs import DecoderGraph

        cuda = self.device.type == "cuda"
        if s.cuda_graphs and not cuda:
            raise UserError("backend torch: CUDA graphs need a CUDA device")
        lean_needed = None if s.lean_encoder else "it needs the lean encoder (lean_encoder=True)"
        for option, what, why in (("fused_features", "fused point features", None),
                                  ("fused_uncertainty", "fused uncertainty", None),
                                  ("fused_planner", "fused planner", None),
                                  ("fused_norms", "fused encoder norms", lean_needed),
                                  ("fused_operands", "fused attention operands", lean_needed),
                                  ("fused_frequency", "fused frequency chain", None)):
            if getattr(s, option):
                self._need_triton(what, why)
        self.settings = s
        self.max_batch, self.max_points = s.max_batch, s.max_points
        self.precision = s.precision
        self.amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[s.precision]
        self.use_graphs, self.compiled = bool(s.cuda_graphs), bool(s.compile)
        amp = self.amp_dtype
        folded = copy.deepcopy(self._folded).to(self.device).eval()
        self.model = folded
        # the encoder with the chain-first loop (its frequency stream, the fused options' steps)
        encoder = InferenceEncoder(folded.image_encoder, frequency_first=bool(s.overlap_frequency))
        folded.image_encoder = encoder
        if s.lean_encoder:  # from the fp32 layers; store_weights_in below casts the new ones too
            lean_encoder(encoder, amp or torch.float32)
        fp32_box = s.fp32_box_part and amp is not None  # (in an fp32 backend the box part is fp32 already)
        if s.lean_box_part:  # an fp32 box part runs without autocast: the lean two-way transformer then too
            from imedsam_cuda.box_part_rewrites import lean_box_part

            lean_box_part(folded, None if fp32_box else amp)
        # the folded copy's weights never change: its relative-position tables are gathered, cast and padded once
        inference_attention(folded, bool(s.fused_attention), amp or torch.float32)
        use_fused_prompt_attention(folded, bool(s.fused_attention))  # the box part's two-way transformer too
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
        # an fp32 box part keeps its layers' fp32 weights and biases: ~16 MB at vit_b
        box_layers = [m for part in (folded.prompt_encoder, folded.mask_decoder) for m in weight_layers(part)]
        masters = {m: (m.weight.data, None if m.bias is None else m.bias.data) for m in box_layers} if fp32_box else {}
        if amp is not None:  # self.model's layers included (the decoder holds it)
            store_weights_in(self.decoder, amp)
        for m, (w, b) in masters.items():
            m.weight.data = w
            if b is not None:
                m.bias.data = b
        self._prompt_tokens: Any = None
        if fp32_box:
            from imedsam_cuda.box_part_rewrites import HostPromptTokens

            self._prompt_tokens = HostPromptTokens(folded)
        self.num_classes = folded.cfg.num_classes
        self._drop_captures()
        self._make_functions(s.compile)
        self._axes: dict[tuple[int, int], tuple[Any, ...]] = {}  # output size -> device (x, y) pixel centres
        dec = self.decoder
        dec.use_grid_sample(s.grid_sample)
        dec.align_matmuls(bool(s.align_matmuls))
        dec.use_relu_epilogue(bool(s.relu_epilogue))
        if s.fused_features:
            from imedsam_cuda.fused_point_features import FusedPointFeatures

            dec.point_features = FusedPointFeatures(dec).to(self.device)
        if s.fused_uncertainty:
            from imedsam_cuda.fused_uncertainty import FusedUncertainty
            from imedsam_export.graphs import PointUncertainty

            inner = next(m for m in dec.uncertainty.modules() if isinstance(m, PointUncertainty))
            dec.point_uncertainty = FusedUncertainty(inner.w2).to(self.device)
        # what runs, where an option has nothing to act on (no adapters, no exact GELU, no epilogue op): description
        self._gelu_on = use_gelu_epilogue(encoder, s.gelu_epilogue) > 0
        use_fused_norms(encoder, s.fused_norms)
        if s.lean_box_part:  # the box part's norms too where it runs the lean two-way transformer (fp32_box_part)
            from imedsam_cuda.box_part_rewrites import use_fused_box_norms

            use_fused_box_norms(folded.mask_decoder.transformer, s.fused_norms)
        use_fused_operands(encoder, s.fused_operands)
        self._frequency_on = use_fused_frequency(encoder, s.fused_frequency)

    def _make_functions(self, compile: bool | str) -> None:
        """The stages' functions (encode, box part, per-point part), compiled with ``compile`` if asked."""
        torch = self.torch
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

    def _need_triton(self, what: str, why: str | None = None) -> None:
        """Refuse a Triton option in one line where its kernel cannot run here (or for ``why``)."""
        from imedsam_cuda.triton_support import available

        why = available(self.device) or why
        if why:
            raise UserError(f"backend {self.name}: {what}: {why}")

    @property
    def fused_box_norms(self) -> bool:
        """Whether the box part's norms run as ``fused_add_norm`` kernels (``fused_norms`` with an fp32 box part)."""
        return bool(getattr(self.model.mask_decoder.transformer, "fused_norms", False))

    def planner(self, out_hw: tuple[int, int], fraction: float, cfg: Any) -> Any:
        """The device sparse planner for this output size and config (made once; its budgets grow)."""
        from imedsam_cuda.torch_sparse import DevicePlanner

        key = (tuple(out_hw), fraction, cfg)
        if key not in self._planners:
            self._planners[key] = DevicePlanner(out_hw, fraction, cfg, self.device)
            self._planners[key].fused = self.settings.fused_planner
        return self._planners[key]

    @property
    def description(self) -> str:
        gpu = f" on {self.torch.cuda.get_device_name(self.device)}" if self.device.type == "cuda" else ""
        graphs = ", CUDA graphs" if self.use_graphs else ""
        compiled = ", torch.compile" if self.compiled else ""
        st = self.settings
        # what runs, in this order (the fused frequency chain and GELU epilogues where they had something to act on)
        shown: tuple[tuple[str, bool | None], ...] = (
            ("SDPA attention", st.fused_attention), ("frequency stream", st.overlap_frequency),
            ("grid_sample taps", st.grid_sample), ("aligned decoder matmuls", st.align_matmuls),
            ("lean encoder", st.lean_encoder), ("lean box part", st.lean_box_part),
            ("ReLU epilogues", self.decoder.relu_epilogue), ("fp32 box part", st.fp32_box_part),
            ("fused encoder norms", st.fused_norms), ("(box part too)", self.fused_box_norms),
            ("fused attention operands", st.fused_operands), ("fused frequency chain", self._frequency_on),
            ("GELU epilogues", self._gelu_on), ("fused point features", st.fused_features),
            ("fused uncertainty", st.fused_uncertainty), ("fused planner", st.fused_planner),
            ("tuned", self.tuned_from is not None))
        opts = "".join((f" {what}" if what.startswith("(") else f", {what}") for what, on in shown if on)
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
        bucket = point_bucket(n, self.max_points) if self.settings.bucket_points else n
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

    def host_embedding(self, embedding: Embedding) -> np.ndarray:
        return embedding.float().cpu().numpy()  # type: ignore[no-any-return]

    def decode_merged(self, embedding: Embedding, boxes: np.ndarray, region: Region, out_hw: tuple[int, int],
                      chunk: int, k: int) -> np.ndarray | None:
        """All of one box's region decoded into device buffers and UGS-merged there (``topk``), its coordinates
        built on the device: only the merged logits cross the bus (not the coordinates, nor three float
        arrays for a host ``argpartition``)."""
        if not self.settings.device_merge:
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
        if not self.settings.device_planner:
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
            elif self.settings.fused_planner:  # the logits as the decoder leaves them: the scatter kernel widens them
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
