"""gpu_check's option tables: the encoder alone and the sparse and full frames under each setting of
torch-cuda's encoder and decoder options (before/after figures, the embedding's or masks' difference from the
first setting's), the backend's own settings restored after each table."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.gpu_check_report import failure
from benchmarks.gpu_check_runners import Check, backend

if TYPE_CHECKING:
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_deploy.bench import FrameRunner


def encoder_options(c: Check, be: TorchBackend, batches: list[int]) -> list[dict[str, Any]]:
    """The encoder alone under each combination of torch-cuda's two encoder options (attention as one
    SDPA call; the frequency chain on a second stream), on ``be``'s encoder and then, with both options
    on, on the other form of it (lean or plain: ``lean_encoder`` and ``lean_box_part``, a second backend),
    and on the lean one with its adds and norms as Triton kernels (``fused_norms``; skipped without CUDA), then
    its attention operands too (``fused_operands``), then its frequency chain too (``fused_frequency``), then
    the operands alone, and last ``be``'s with its box part in fp32 from host-made tokens
    (``fp32_box_part``, switched on by ``configure``: its box part's time is the row's point), without
    and with fused norms
    (the encoder's and the fp32 box part's):
    p50 per batch, and the embedding's max abs difference from the first row's on the same images (the
    second stream should be bitwise equal); at batch 1 also the box part's p50 (one box, its graph replayed
    with the memo cleared). The backend's own settings are restored afterwards."""
    from imedsam_core.errors import UserError
    from imedsam_deploy.bench import synthetic_inputs
    from imedsam_deploy.preprocess import to_model_input

    a, S, timed = c.a, c.S, c.clock.timed
    keep = be.settings
    other = backend(c.model, a, c.maxb, "bf16", lean_layers=not be.settings.lean_encoder)
    box = np.array([[0.3 * S, 0.3 * S, 0.7 * S, 0.65 * S]], np.float32)

    def box_part(b: TorchBackend, emb: Any) -> None:
        b._box_cache = None  # the memo would answer without running the box part
        b.box_features(emb, box)

    out: list[dict[str, Any]] = []
    for bsz in batches:
        x = np.stack([to_model_input(im, S) for im in synthetic_inputs(S, bsz, seed=3).images])
        base = None
        lean_be = be if be.settings.lean_encoder else other
        for b, fused_attn, overlap, norms, operands, chain, box32 in (
                (be, False, False, False, False, False, False), (be, True, False, False, False, False, False),
                (be, False, True, False, False, False, False), (be, True, True, False, False, False, False),
                (other, True, True, False, False, False, False), (lean_be, True, True, True, False, False, False),
                (lean_be, True, True, True, True, False, False), (lean_be, True, True, True, True, True, False),
                (lean_be, True, False, True, True, True, False), (lean_be, True, True, False, True, False, False),
                (be, True, True, False, False, False, True), (be, True, True, True, False, False, True)):
            what = {"batch": bsz, "lean_encoder": b.settings.lean_encoder, "fused_attention": fused_attn,
                    "overlap_frequency": overlap, "fused_norms": norms, "fused_operands": operands,
                    "fused_frequency": chain, "fp32_box_part": box32 and b.precision != "fp32"}
            try:  # recaptured with these options
                b.configure(replace(b.settings, fused_attention=fused_attn, overlap_frequency=overlap,
                                    fp32_box_part=box32 and b.precision != "fp32", fused_norms=norms,
                                    fused_operands=operands, fused_frequency=chain))
            except UserError as e:  # no triton, or no CUDA device for it
                out.append({**what, "skipped": str(e)})
                print(f"encoder option {json.dumps(out[-1])}", flush=True)
                continue
            try:
                emb = b.encode(x)[0]
                for _ in range(3):
                    b.encode(x)
                ts = [timed(lambda b=b, x=x: b.encode(x)) for _ in range(a.repeat)]
                cell: dict[str, Any] = {**what, "p50_ms": float(np.median(ts)), "min_ms": float(np.min(ts))}
                if bsz == 1:
                    for _ in range(3):
                        box_part(b, emb)
                    cell["box_part_p50_ms"] = float(np.median(
                        [timed(lambda b=b, e=emb: box_part(b, e)) for _ in range(a.repeat)]))
                if base is None:
                    base = emb
                cell["max_abs_diff_vs_plain"] = float((emb.float() - base.float()).abs().max())
            except Exception as e:
                cell = {**what, "error": failure(e)}
            out.append(cell)
            print(f"encoder option {json.dumps(cell)}", flush=True)
    be.configure(keep)
    del other
    return out


def decoder_options(c: Check, be: TorchBackend, frames: dict[str, FrameRunner]) -> list[dict[str, Any]]:
    """Sparse and full frames (batch 1, at each output size) with the per-point decoder's map samples
    as ``grid_sample`` calls or as the exported graph's Gather taps (~35 small kernels per map per decoder
    call), its odd-width layers zero-padded to multiples of 8 or not (``align_matmuls``), its Linear -> ReLU
    pairs with GEMM epilogues or not (``relu_epilogue``, with the padded layers), each point's input row as
    one Triton kernel or not (``fused_features``, with both; skipped without CUDA), then the uncertainty as one
    Triton kernel too (``fused_uncertainty``), then the device planner's levels as five Triton kernels
    (``fused_planner``): p50 per frame, per-stage p50, and each variant's masks against the first's
    (grid_sample, unpadded, no epilogues).
    The backend's settings are restored."""
    from imedsam_core.errors import UserError
    from imedsam_deploy.bench import Timings, synthetic_inputs

    a, timed = c.a, c.clock.timed

    def apply(o: dict[str, Any]) -> None:  # the decoder's graphs are recaptured
        be.configure(replace(be.settings, **o))

    now = be.settings
    keep = {"grid_sample": now.grid_sample, "align_matmuls": now.align_matmuls, "relu_epilogue": now.relu_epilogue,
            "fused_features": now.fused_features, "fused_uncertainty": now.fused_uncertainty,
            "fused_planner": now.fused_planner}
    inp = synthetic_inputs(c.S, 1, seed=5)
    out: list[dict[str, Any]] = []
    masks: dict[tuple[Any, ...], np.ndarray] = {}
    default = {**{k: False for k in keep}, "grid_sample": True}
    options, on = [default, {**default, "grid_sample": False}], default
    for option in ("align_matmuls", "relu_epilogue", "fused_features", "fused_uncertainty", "fused_planner"):
        on = {**on, option: True}  # each on top of the ones before
        options.append(on)
    for what in options:  # the default first: the others are compared with it
        v = tuple(what.values())
        try:
            apply(what)
        except UserError as e:  # no triton, or no CUDA device for it
            cell = {**what, "skipped": str(e)}
            out.append(cell)
            print(f"decoder option {json.dumps(cell)}", flush=True)
            continue
        for size in sorted(a.sizes):
            for query, runner in frames.items():
                cell = {**what, "query": query, "out_size": size}
                try:
                    for _ in range(5):  # capture, planner budgets
                        masks[(*v, query, size)] = runner.run(inp, (size, size), None)[0]
                    st = Timings()
                    ts = [timed(lambda st=st, r=runner, o=size: r.run(inp, (o, o), st)) for _ in range(a.repeat)]
                    cell.update({"p50_ms": float(np.median(ts)), "min_ms": float(np.min(ts)),
                                 "stages_p50_ms": {k: float(np.median(t)) for k, t in st.stages.items() if t}})
                    ref = masks.get((*default.values(), query, size))
                    if ref is not None and what != default:
                        cell["mask_agreement"] = float((masks[(*v, query, size)] == ref).mean())
                except Exception as e:
                    cell["error"] = failure(e)
                out.append(cell)
                print(f"decoder option {json.dumps(cell)}", flush=True)
    apply(keep)
    return out
