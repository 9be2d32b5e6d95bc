"""Operator counts of torch-cuda's captured stages, counted on the CPU: roughly the kernels each CUDA graph
replays per frame.

Inside a CUDA graph a kernel still costs a few microseconds however little it does, so at 384² a stage of a
thousand small elementwise kernels is milliseconds of GPU time on its own: what the count shows is what op
fusion (``torch.compile``) has to remove. Counted with a dispatch mode: every aten call but views and
metadata-only ops, run eagerly with torch-cuda's CUDA defaults (SDPA attention, frequency chain first).

    python -m benchmarks.op_count --model vit_b            # encoder, box part, one decoder call, planner
    python -m benchmarks.op_count --model vit_b --gather-taps   # the decoder sampling as the ONNX graph does
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops that only make views or read metadata: no kernel on a GPU
VIEWS = {"view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "slice", "select", "unsqueeze",
         "squeeze", "as_strided", "alias", "detach", "unbind", "split", "split_with_sizes", "lift_fresh",
         "_reshape_alias", "unfold", "diagonal", "narrow", "chunk", "sym_size", "sym_stride", "sym_numel", "dim",
         "size", "stride", "is_same_size", "_local_scalar_dense",
         "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resolve_conj", "resolve_neg"}


class OpCounter(TorchDispatchMode):
    active: list[OpCounter] = []  # the counters entered, innermost last

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __enter__(self) -> OpCounter:
        OpCounter.active.append(self)
        return super().__enter__()  # type: ignore[no-any-return]

    def __exit__(self, *exc: Any) -> None:
        OpCounter.active.pop()
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        out = func(*args, **(kwargs or {}))
        if name not in VIEWS:  # in-place ops (copy_, index_put_ ...) are kernels too
            self.ops[name] += 1
        return out


def one_launch(fn: Any, name: str) -> Any:
    """``fn`` (a kernel's work done by torch ops, or by Triton's interpreter) counted as one op, ``name``."""
    def run(*args: Any, **kwargs: Any) -> Any:
        counter = OpCounter.active[-1]
        before = collections.Counter(counter.ops)
        out = fn(*args, **kwargs)
        counter.ops = before  # the kernel's work, not counted
        counter.ops[name] += 1
        return out
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--input-size", type=int, default=384)
    ap.add_argument("--out-sizes", type=int, nargs="+", default=[384, 896])
    ap.add_argument("--top", type=int, default=8, help="most frequent ops listed per stage")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="bf16: under CPU autocast, which casts as CUDA autocast does (its cast kernels counted)")
    ap.add_argument("--gather-taps", action="store_true",
                    help="the decoder's map samples as the exported graph's Gather taps (not grid_sample)")
    ap.add_argument("--plain-layers", action="store_true",
                    help="the encoder, the box part and the decoder's trunks without torch-cuda's lean_encoder / "
                         "lean_box_part / relu_epilogue rewrites (imedsam_cuda.encoder_rewrites, box_part_rewrites, "
                         "DecoderGraph.use_relu_epilogue)")
    ap.add_argument("--fused-norms", action="store_true",
                    help="the lean encoder's adds and norms as fused_add_norm's Triton kernel (needs triton): each "
                         "launch counts as one op, computed by torch uncounted")
    ap.add_argument("--fused-operands", action="store_true",
                    help="the lean encoder's attention operands as fused_attention_operands' Triton kernel (needs "
                         "triton): each launch counts as one op, computed by torch uncounted")
    ap.add_argument("--fused-frequency", action="store_true",
                    help="every block's frequency adapter as fused_frequency_chain's one Triton kernel (needs triton): "
                         "its launch counts as one op, computed by torch uncounted")
    ap.add_argument("--fp32-box-part", action="store_true",
                    help="the box part in fp32 from host-made transformer tokens (torch-cuda's fp32_box_part)")
    ap.add_argument("--fused-features", action="store_true",
                    help="each point's decoder input row as fused_point_features' Triton kernel (needs triton): each "
                         "launch counts as one op, the rows computed by torch uncounted")
    ap.add_argument("--fused-uncertainty", action="store_true",
                    help="the decoder's uncertainty as fused_uncertainty's Triton kernel (needs triton): each launch "
                         "counts as one op, computed by torch uncounted")
    ap.add_argument("--fused-planner", action="store_true",
                    help="the device planner's per-level bookkeeping as fused_planner's five Triton kernels (needs "
                         "triton; they run in its interpreter here): each launch counts as one op")
    a = ap.parse_args(argv)
    import os

    if not a.fused_planner or os.environ.get("TRITON_INTERPRET") == "1":
        return _count(a)
    # the planner's kernels run in Triton's interpreter here, which must be on before triton is first imported
    # (its own jitted helpers, tl.sum's included, are made then): counted in a process started with it
    import subprocess
    import sys
    from pathlib import Path

    args = sys.argv[1:] if argv is None else argv
    res = subprocess.run([sys.executable, "-m", "benchmarks.op_count", *args], capture_output=True, text=True,
                         env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).resolve().parents[1])
    print(res.stdout, end="")
    print(res.stderr, end="", file=sys.stderr)
    return res.returncode


def _count(a: argparse.Namespace) -> int:
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings
    from imedsam_cuda.torch_sparse import DevicePlanner
    from imedsam_deploy.sparse import SparseConfig
    from imedsam_train.build import build

    torch.manual_seed(0)
    model, _ = build(a.model, input_size=a.input_size)
    be = TorchBackend(model.eval(), "cpu", TorchCudaSettings(  # torch-cuda's defaults
        precision=a.precision, fused_attention=True, overlap_frequency=True, grid_sample=not a.gather_taps,
        align_matmuls=True, lean_encoder=not a.plain_layers, lean_box_part=not a.plain_layers,
        relu_epilogue=not a.plain_layers, fp32_box_part=a.fp32_box_part))
    if a.fused_norms:
        import imedsam_cuda.fused_add_norm as fan
        from imedsam_cuda.box_part_rewrites import use_fused_box_norms
        from imedsam_cuda.encoder_rewrites import use_fused_norms

        def add_norm(x: torch.Tensor, a_: torch.Tensor | None, b_: torch.Tensor | None, norm: Any,
                     out_dtype: torch.dtype, write_sum: bool = True, a_rows: torch.Tensor | None = None,
                     ) -> tuple[torch.Tensor | None, torch.Tensor]:
            if a_ is not None:
                a_ = (a_ if a_rows is None else a_[:, a_rows]).view(x.shape)
            s_ = x + a_ if a_ is not None else x
            s_ = s_ + b_ if b_ is not None else s_
            with torch.autocast(x.device.type, enabled=False):
                y = torch.nn.functional.layer_norm(s_, norm.normalized_shape, norm.weight, norm.bias,
                                                   norm.eps).to(out_dtype)
            return (s_ if write_sum else None), y

        def add_norm_post(x: torch.Tensor, a_: torch.Tensor | None, norm: Any, post: torch.Tensor,
                          out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            y = add_norm(x, a_, None, norm, out_dtype, write_sum=False)[1]
            return y, y + post

        fan.add_norm = one_launch(add_norm, "fused_add_norm")  # type: ignore[assignment]  # this process only
        fan.add_norm_post = one_launch(add_norm_post, "fused_add_norm")  # type: ignore[assignment]
        use_fused_norms(be.model.image_encoder, True)
        use_fused_box_norms(be.model.mask_decoder.transformer, True)  # where the box part is fp32
    if a.fused_operands:
        import imedsam_cuda.fused_attention_operands as fao
        from imedsam_cuda.encoder_rewrites import use_fused_operands

        fao.attention_operands = one_launch(  # type: ignore[assignment]  # this process only
            lambda block, qkv: block.operands(block.windows(qkv)), "fused_attention_operands")
        use_fused_operands(be.model.image_encoder, True)
    if a.fused_frequency:
        from imedsam_cuda.encoder_rewrites import use_fused_frequency

        encoder = be.model.image_encoder
        blocks = list(encoder.blocks)

        def chain(f: torch.Tensor) -> torch.Tensor:
            adds = []
            for blk in blocks:
                f, add = blk.frequency_step(f)
                adds.append(add)
            return torch.stack(adds)

        use_fused_frequency(encoder, True)
        encoder.adapter_chain = one_launch(chain, "fused_frequency_chain")
    if a.fused_features:
        from imedsam_cuda.fused_point_features import FusedPointFeatures

        dec, rows_kernel = be.decoder, FusedPointFeatures(be.decoder)

        def rows(up: torch.Tensor, coords: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
            dec.point_features = None  # the unfused rows, the same values
            try:
                return dec._point_rows(up, coords).to(dtype)
            finally:
                dec.point_features = rows_kernel

        rows_kernel.forward = one_launch(rows, "fused_point_features")  # type: ignore[method-assign]
        dec.point_features = rows_kernel
    if a.fused_uncertainty:
        unfused = be.decoder.uncertainty

        class _Unc(torch.nn.Module):
            forward = staticmethod(one_launch(lambda h, logits: unfused(h, logits), "fused_uncertainty"))

        be.decoder.point_uncertainty = _Unc()
    if a.fused_planner:  # each kernel run in the interpreter (this process was started under it), counted once
        from imedsam_cuda import fused_planner as pk

        for kernel in ("cells", "fill", "scatter", "need", "coords"):
            setattr(pk, f"level_{kernel}", one_launch(getattr(pk, f"level_{kernel}"), f"planner_{kernel}"))
    s = a.input_size
    img = np.random.default_rng(0).random((1, 3, s, s), dtype=np.float32)
    box = np.array([[0.3 * s, 0.3 * s, 0.7 * s, 0.65 * s]], np.float32)
    rows: list[tuple[str, OpCounter, str]] = []
    # no_grad, not inference_mode: under inference_mode the dispatch mode sees composite ops (matmul, pad,
    # linear...) whole, hiding the copies they launch (a broadcast matmul's expanded operands, say)
    with torch.no_grad(), be._autocast():
        with OpCounter() as enc:
            emb = be._fns["enc"](torch.from_numpy(img))
        rows.append(("encoder", enc, ""))
        with OpCounter() as prompt:
            tokens = [] if be._prompt_tokens is None else [torch.from_numpy(be._prompt_tokens(box))]  # uploaded
            up = be._fns["prompt"](emb, torch.from_numpy(box), *tokens)
        rows.append(("box part", prompt, ""))
        coords = torch.zeros(1, 1024, 2)  # made outside the count: not the decoder's
        with OpCounter() as pts:
            be._fns["points"](up, coords)
        rows.append(("one decoder call", pts, "any point count"))
        for out in a.out_sizes:
            planner = DevicePlanner((out, out), model.cfg.decoder.refine_fraction, SparseConfig(), "cpu")
            planner.fused = a.fused_planner
            reg, table = (torch.from_numpy(v) for v in planner.region_inputs(out // 4, out // 2, out // 4, out // 2))
            with OpCounter() as plan:  # as torch-cuda's: the region's inputs made on the host
                points = be.decoder.point_outputs if a.fused_planner else be._fns["points"]
                res = planner.plan(lambda c, p=points: tuple(o[0] for o in p(up, c[None])), reg, table)
            rows.append((f"sparse planner {out}²", plan,
                         f"{len(planner.levels) + 1} decoder calls inside, {int(res[2])} points"))
    taps = "Gather taps" if a.gather_taps else "grid_sample"
    form = ("plain" if a.plain_layers else "lean") + " layers" + (", fused encoder norms" if a.fused_norms else "") + (
        ", fused attention operands" if a.fused_operands else "") + (
        ", fused frequency chain" if a.fused_frequency else "") + (", fp32 box part" if a.fp32_box_part else "") + (
        ", fused point rows" if a.fused_features else "") + (", fused uncertainty" if a.fused_uncertainty else "") + (
        ", fused planner" if a.fused_planner else "")
    print(f"{a.model} at {s}², {a.precision}, eager, non-view aten ops (~ GPU kernels), {form}, decoder samples "
          f"by {taps}:")
    for name, c, note in rows:
        top = ", ".join(f"{k} {v}" for k, v in c.ops.most_common(a.top))
        print(f"{name:<22} {sum(c.ops.values()):>6}  {note:<36} {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
