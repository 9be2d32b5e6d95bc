"""One-call GPU check (H100 / H200): correctness and timing of our PyTorch CUDA paths against the reference.

Run from the repository root, in one call, on a machine with a CUDA GPU:

    python -m benchmarks.gpu_check            # vit_b, random weights, 384^2 input; writes $OUT/gpu_check.json

Variants, each timed on the same inputs in the same process, interleaved run by run (device-side timing:
CUDA events around each frame):
- ``reference``: the released code's compute, eager fp32, one image at a time (imedsam_cuda/reference.py);
- ``full``: our torch-cuda backend (bf16 with fp32 islands, CUDA graphs) through the runtime: batched
  encode, full-grid decode in chunks, UGS merge on the device (an fp32 run checks it first);
- ``fused``: encoder + full-grid decoder + on-device UGS merge in ONE CUDA graph, mask left on the device
  (batch 1); ``fused-sparse``: encoder + box part + the device sparse planner in ONE CUDA graph (batch 1);
- ``sparse`` / ``box``: what ``imedsam-infer --backend torch-cuda`` runs (as ``full`` does): the runtime's
  Segmenter (via the bench's FrameRunner) in the sparse and box query modes; sparse runs its planner on
  the device (one CUDA graph per box), ``sparse host`` the numpy planner with a host round trip per level;
- ``*+triton`` (``--triton-kernels on``, the default where Triton runs): ``full``, ``sparse``, ``fused`` and
  ``fused-sparse`` with torch-cuda's Triton kernels on (fused encoder norms, attention operands and frequency
  chain, point rows, uncertainty, planner levels) and the box part in fp32 with its norms fused too (each off by
  default until timed), the end-to-end figure of switching them all on;
- ``*+compile``: ``sparse`` and ``fused`` with every captured function compiled by ``torch.compile``
  (inductor) first (batch 1; compilation happens in the warm-up and is not timed, but takes minutes on vit_b
  and counts against the time budget: ``--compile only`` runs these rows alone, in a second call).
Encoder options (before/after of each, bf16, CUDA graphs, batch 1 and 8): the encoder alone with its
attention as explicit GEMMs or one ``scaled_dot_product_attention`` call, and with the frequency chain in line
or on a second stream, with the embedding's difference from the plain encoder.
Decoder options (before/after, bf16, sparse and full frames at batch 1 and each output size): the per-point
decoder's two map samples as ``grid_sample`` calls (torch-cuda's default) or as the exported graph's Gather taps,
its odd-width layers zero-padded (default on CUDA) or not, with GEMM epilogues or not, each point's input row as
one Triton kernel or not, the uncertainty as one Triton kernel or not, the device planner's levels as four
Triton kernels or not, its MLPs as torch layers or one Triton kernel, with the masks' agreement with the
default's.
Memory (batch 1, full and sparse frames at the input size, 896² and 2048², or ``--memory-sizes``): the GPU memory one frame adds
over what is held between frames (weights, graph pools), the chunk budget's bound on the output's growth.
Kernel profiles: the encoder and a whole sparse and full frame run eagerly under the profiler (kernels per call,
their summed time, the heaviest), to set beside the graph replays' times: kernel-bound or gap-bound.
Agreement: in every row, each variant's masks against the reference's on the same inputs (pixels inside the
box, Dice), plus an fp32 check first. The JSON is rewritten after every row, so a run cut short keeps what
it measured; the batch-1 timing rows come first (after the fp32 check), then the option tables, profiles and
memory, then the compiled rows and batches 8 and 32 (fewer runs: max(5, repeat / batch)); ``--budget-s`` skips
the tables and rows that would start after it. A variant that fails (out
of memory, a compile error) is reported in its row and the run goes on.
``--device cpu --model tiny --quick`` exercises the same code on a CPU.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported in main (after the friendly checks): a module import must not need torch
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_deploy.bench import BenchOptions, FrameRunner, Inputs, Timings
    from imedsam_deploy.manifest import Artifact
    from imedsam_deploy.runtime import Segmenter

PARTS = ("correctness", "encoder", "decoder", "profile", "memory", "timing")
CHECK_MODULES = ("imedsam_core.atomic", "imedsam_core.contract", "imedsam_core.errors", "imedsam_cuda.reference",
                 "imedsam_cuda.torch_cuda", "imedsam_cuda.torch_models", "imedsam_deploy.bench",
                 "imedsam_cuda.torch_settings", "imedsam_deploy.preprocess", "imedsam_deploy.runtime",
                 "imedsam_train.build")
COMPILED_ROW_ROOM_S = 180  # a compiled row compiles first: it starts only with this much of the budget left


class _Skip(Exception):
    """A section left out by --parts."""


def _need(mod: str) -> None:
    try:
        __import__(mod)
    except ImportError as e:
        sys.exit(f"gpu_check: cannot import {mod} ({e}); install the repo with `pip install -e .[train]`")


# ---------------------------------------------------------------- arguments, budget, results (no torch)
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--input-size", type=int, default=384)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 896])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--ref-repeat", type=int, default=3)
    ap.add_argument("--compile", choices=("after", "none", "only"), default="after",
                    help="torch.compile rows (batch 1; minutes of compilation on vit_b): after the others, "
                         "none, or only them (a second device call)")
    ap.add_argument("--budget-s", type=float, default=480.0, help="skip rows that start after this many seconds")
    ap.add_argument("--quick", action="store_true", help="few repeats (CPU dry run)")
    ap.add_argument("--memory-sizes", type=int, nargs="+", default=None,
                    help="output sizes of the memory part (default: the input size, 896 and 2048)")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                    help="which sections to run (a short second call can run a few)")
    ap.add_argument("--align-matmuls", choices=("on", "off"), default=None,
                    help="the timing rows' bf16 backends with the decoder's odd-width layers zero-padded or not "
                         "(default: the backend's own default)")
    ap.add_argument("--lean-layers", choices=("on", "off"), default=None,
                    help="every backend's encoder and box part with imedsam_cuda.encoder_rewrites and "
                         "box_part_rewrites or not (default: the backend's own: on with CUDA); the encoder-options "
                         "table times both forms either way")
    ap.add_argument("--triton-kernels", choices=("on", "off"), default="on",
                    help="also time full, sparse and fused frames (not compiled) with the fused norms, point rows, "
                         "uncertainty and planner Triton kernels on, as a bf16+triton backend (skipped where Triton "
                         "cannot run)")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/gpu_check"))
    a = ap.parse_args(argv)
    if a.quick:
        a.repeat, a.ref_repeat = 2, 1
    return a


def timing_plan(a: argparse.Namespace) -> tuple[list[tuple[int, int, bool]], list[tuple[int, int, bool]]]:
    """The timing rows (output size, batch, compiled) in two runs: the batch-1 rows (the latency targets, every
    variant against the reference) first, before the option tables, so that a device call cut short by its time
    limit keeps them; then the compiled variants (perhaps the fastest path), then throughput."""
    plain = [] if a.compile == "only" else [(o, b, False) for b in sorted(a.batches) for o in sorted(a.sizes)]
    compiled_rows = [] if a.compile == "none" else [(o, 1, True) for o in sorted(a.sizes)]
    if "timing" not in a.parts:
        plain, compiled_rows = [], []
    early = [r for r in plain if r[1] == 1]
    late = compiled_rows + [r for r in plain if r[1] != 1]
    return early, late


def row_over_budget(budget_s: float, elapsed_s: float, compiled: bool) -> str | None:
    """Why a timing row does not start (its budget spent), or None."""
    left = budget_s - elapsed_s
    if left < (COMPILED_ROW_ROOM_S if compiled else 0):  # a compiled row compiles first: give it room
        return f"time budget ({budget_s:.0f} s) spent"
    return None


def section_wanted(a: argparse.Namespace, name: str, elapsed_s: float, results: dict[str, Any]) -> bool:
    """Whether to run an option table or profile (asked for, and time left in the budget); a section the budget
    leaves out is recorded in ``results["skipped_sections"]``."""
    if a.compile == "only" or name not in a.parts:
        return False
    if elapsed_s > a.budget_s:
        results.setdefault("skipped_sections", []).append(name)
        print(f"gpu_check: {name} skipped: time budget ({a.budget_s:.0f} s) spent", flush=True)
        return False
    return True


def timed_runs(repeat: int, bsz: int) -> int:
    """Timed runs of a timing row: a batch row times bsz frames per run."""
    return max(min(5, repeat), repeat // bsz)


def warmup_runs(name: str) -> int:
    """Warm-up runs of a variant: graph capture, compilation, cuFFT plans, planner budgets."""
    return 1 if name.startswith("reference") else 5 if name.startswith("sparse") else 2


def failure(e: BaseException) -> str:
    """One line, but the whole message up to 800 characters: a Triton CompilationError's first line only
    places the error ("at 26:18:"); its source excerpt and cause follow (session 7 needed them)."""
    text = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {text[:800]}"


def as_masks(m: Any, out: int) -> list[np.ndarray]:
    if isinstance(m, list):
        return [x.reshape(-1, out, out) for x in m]
    return [x.reshape(-1, out, out) for x in m.cpu().numpy()]  # the fused graph's (B, K, N) on the device


def timing_cells(times: dict[str, list[float]], masks: dict[str, list[np.ndarray]], inp: Inputs, bsz: int,
                 stage_t: dict[str, Timings]) -> dict[str, dict[str, Any]]:
    """A timing row's cell per variant that ran: p50, min, per image, the speed-up over the reference and the
    masks' agreement with its; stage times (taken out of ``stage_t``) where the runtime's frames recorded them."""
    from imedsam_deploy.bench import agreement

    cells: dict[str, dict[str, Any]] = {}
    ref_ms = float(np.median(times["reference fp32"])) if times.get("reference fp32") else None
    for name, ts in times.items():
        if not ts:
            continue
        p50 = float(np.median(ts))
        cell: dict[str, Any] = {"p50_ms": p50, "min_ms": float(np.min(ts)), "per_image_ms": p50 / bsz,
                                "n": len(ts)}
        if ref_ms is not None and not name.startswith("reference"):
            cell["speedup_vs_reference"] = ref_ms / p50
        if "reference fp32" in masks and not name.startswith("reference"):
            ag = [agreement(m, r, bx, im.shape[:2]) for m, r, bx, im
                  in zip(masks[name], masks["reference fp32"], inp.boxes, inp.images, strict=True)]
            cell["agreement"] = {k: float(np.mean([g[k] for g in ag])) for k in ag[0]}
        st = stage_t.pop(name, None)
        if st is not None and st.total:
            cell["stages_p50_ms"] = {k: float(np.median(v)) for k, v in st.stages.items() if v}
            cell["points_per_frame"] = st.points / len(st.total)
        cells[name] = cell
    return cells


def save(results: dict[str, Any], out_dir: Path, t_start: float) -> None:
    """gpu_check.json, rewritten after every row: a run cut short keeps what it measured."""
    from imedsam_core.atomic import atomic_write_text

    results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    results["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    atomic_write_text(out_dir / "gpu_check.json", json.dumps(results, indent=2) + "\n")


def summary_lines(results: dict[str, Any], model: str, input_size: int) -> list[str]:
    """The short table printed last: timing rows, option tables, memory, profiles, correctness."""
    info, checks = results["info"], results["correctness"]
    lines = [f"\n== gpu_check on {info['device']} ({model}, {input_size}^2 input, random weights, "
             f"{results['elapsed_s']:.0f} s) ==",
             f"{'out':>5} {'batch':>5} {'variant':<26} {'p50 ms':>9} {'per img':>9} {'x ref':>7} {'in-box %':>9}  "
             "stages p50 ms"]
    for r in results["timing"]:
        if "skipped" in r:
            lines.append(f"{r['out_size']:>5} {r['batch']:>5} skipped: {r['skipped']}")
            continue
        for name, c in r.items():
            if not isinstance(c, dict) or "p50_ms" not in c:
                continue
            sx = f"{c['speedup_vs_reference']:.1f}" if "speedup_vs_reference" in c else "-"
            ag = f"{100 * c['agreement']['pixel_in_box']:.2f}" if "agreement" in c else "-"
            stages = " ".join(f"{k[:3]} {v:.2f}" for k, v in c.get("stages_p50_ms", {}).items())
            lines.append(f"{r['out_size']:>5} {r['batch']:>5} {name:<26} {c['p50_ms']:>9.2f} "
                         f"{c['per_image_ms']:>9.2f} {sx:>7} {ag:>9}  {stages}")
        for name, err in r.get("errors", {}).items():
            lines.append(f"{r['out_size']:>5} {r['batch']:>5} {name:<26} FAILED {err}")
    for c in results.get("encoder_options", []):
        opt = (f"encoder b{c['batch']} lean={int(c.get('lean_encoder', 0))} sdpa={int(c['fused_attention'])} "
               f"stream={int(c['overlap_frequency'])} norms={int(c.get('fused_norms', 0))} "
               f"operands={int(c.get('fused_operands', 0))} chain={int(c.get('fused_frequency', 0))} "
               f"box32={int(c.get('fp32_box_part', 0))}")
        lines.append(f"{opt:<69} " + (
            f"FAILED {c['error']}" if "error" in c else f"skipped: {c['skipped']}" if "skipped" in c else
            f"{c['p50_ms']:.3f} ms (min {c['min_ms']:.3f}), max abs diff {c['max_abs_diff_vs_plain']:.2e}"
            + (f", box part {c['box_part_p50_ms']:.3f} ms" if "box_part_p50_ms" in c else "")))
    for c in results.get("decoder_options", []):
        fused = (", aligned" if c.get("align_matmuls") else "") + (", ReLU epilogues" if c.get("relu_epilogue") else "") + (
            ", fused rows" if c.get("fused_features") else "") + (", fused unc" if c.get("fused_uncertainty") else "") + (
            ", fused planner" if c.get("fused_planner") else "")
        opt = (f"{c.get('out_size', '')} {c.get('query', '')} frame "
               f"{'grid_sample' if c['grid_sample'] else 'Gather taps'}{fused}")
        if "error" in c or "skipped" in c:
            lines.append(f"{opt:<42} " + (f"FAILED {c['error']}" if "error" in c else f"skipped: {c['skipped']}"))
            continue
        agree = f", masks {100 * c['mask_agreement']:.3f}% as the default's" if "mask_agreement" in c else ""
        lines.append(f"{opt:<42} {c['p50_ms']:.3f} ms (min {c['min_ms']:.3f}){agree}; stages " + " ".join(
            f"{k[:3]} {v:.2f}" for k, v in c["stages_p50_ms"].items()))
    for c in results.get("memory", []):
        got = (f"FAILED {c['error']}" if "error" in c else
               f"frame peak {c['frame_peak_mb']:.0f} MB over {c['held_mb']:.0f} MB held" if "frame_peak_mb" in c
               else "ran (no device memory figure on a CPU)")
        lines.append(f"memory {c['query']} {c['out_size']}²: {got}")
    for name, pr in results.get("kernel_profiles", {}).items():
        if "error" in pr:
            lines.append(f"kernel profile {name}: FAILED {pr['error']}")
            continue
        lines.append(f"kernel profile {name} (eager): {pr['kernels_per_call']:.0f} kernels, "
                     f"{pr['kernel_ms_per_call']:.3f} ms of kernel time per call; heaviest: " + "; ".join(
                         f"{t['name'][:40]} {t['ms_per_call']:.3f} ms x{t['count_per_call']:.0f}" for t in pr["top"][:4]))
    for k, v in checks.items():
        lines.append(f"correctness {k}: " + (f"FAILED {v['error']}" if "error" in v else
                                             f"{100 * v['pixel_in_box']:.3f}% in box, Dice {v['dice']:.4f}"))
    return lines


# ---------------------------------------------------------------- clocks (the device's, where there is one)
class Clock:
    """Synchronisation and one call's time: CUDA events around the call on a GPU (device-side), else the host's
    clock."""

    def __init__(self, torch: Any, dev: Any) -> None:
        self.torch, self.dev, self.cuda = torch, dev, dev.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.dev)

    def timed(self, fn: Callable[[], Any]) -> float:
        torch = self.torch
        self.sync()
        if self.cuda:
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            fn()
            e1.record()
            e1.synchronize()
            return float(e0.elapsed_time(e1))
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


# ---------------------------------------------------------------- the variants' backends and frames
def backend(model: Any, a: argparse.Namespace, maxb: int, precision: str, lean_layers: bool | None,
            compile: bool = False, triton: bool = False) -> TorchBackend:
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_cuda.torch_settings import TorchCudaSettings

    return TorchBackend(model, a.device, TorchCudaSettings(
        precision=precision, max_batch=maxb, max_points=65536, compile=compile,
        device_planner=True, device_merge=True,  # also in a CPU dry run
        lean_encoder=lean_layers, lean_box_part=lean_layers,
        fp32_box_part=triton,  # the box part's fused norms need it
        fused_norms=triton, fused_operands=triton, fused_frequency=triton,
        fused_features=triton, fused_uncertainty=triton, fused_planner=triton))


def lean_of(a: argparse.Namespace) -> bool | None:
    """--lean-layers as the backends take it (None: the backend's own default)."""
    return None if a.lean_layers is None else a.lean_layers == "on"


@dataclass
class Check:
    """What every part of the check shares: the arguments, the clock, the model, its artifact, our backends
    (one per precision variant) and their frame runners, and the reference."""

    a: argparse.Namespace
    clock: Clock
    model: Any
    art: Artifact
    opts: BenchOptions
    ours: dict[str, TorchBackend]
    ref: Any
    info: dict[str, Any]
    t_start: float
    runners: dict[str, tuple[FrameRunner, FrameRunner, FrameRunner]] = field(default_factory=dict)  # sparse, box, full
    fused: dict[str, Callable[[Inputs, int], Any]] = field(default_factory=dict)
    fused_sparse: dict[str, Callable[[Inputs, int], Any]] = field(default_factory=dict)
    stage_t: dict[str, Timings] = field(default_factory=dict)  # the timed runs' stage times, per variant

    @property
    def S(self) -> int:
        return int(self.a.input_size)

    @property
    def maxb(self) -> int:
        return max(self.a.batches)

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.t_start


def prepared(inp: Inputs, S: int) -> tuple[np.ndarray, np.ndarray]:
    from imedsam_deploy.preprocess import box_to_model, to_model_input

    imgs = np.stack([to_model_input(im, S) for im in inp.images])
    boxes = np.concatenate([box_to_model(b[None], im.shape[:2], S)
                            for b, im in zip(inp.boxes, inp.images, strict=True)])
    return imgs, boxes


def ref_frame(c: Check, inp: Inputs, out: int) -> list[np.ndarray]:
    import torch

    dev = c.clock.dev
    imgs, boxes = prepared(inp, c.S)
    res = []
    for i in range(len(imgs)):  # the released code infers one image at a time
        x = torch.from_numpy(imgs[i : i + 1]).to(dev)
        lg = c.ref(x, torch.from_numpy(boxes[i : i + 1]).to(dev), (out, out))
        res.append((lg > 0).reshape(-1, out, out).cpu().numpy())
    return res


def fused_runner(be: TorchBackend, S: int, fraction: float) -> Callable[[Inputs, int], Any]:
    """Encoder + full-grid decoder + on-device UGS merge in one CUDA graph (batch 1)."""
    import torch

    from imedsam_core.contract import refine_count
    from imedsam_cuda.torch_cuda import ugs_merge_device
    from imedsam_deploy.preprocess import grid_coords

    def fn(img: Any, coords: Any, *box_inputs: Any) -> Any:
        up = be._raw_prompt(be._raw_encode(img), *box_inputs)  # the backend's own stages, in one graph
        c, f, u = (o.float() for o in be.decoder.point_outputs(up, coords))
        return ugs_merge_device(c, f, u, refine_count(coords.shape[1], fraction)) > 0

    graph_fn = torch.compile(fn, fullgraph=True, dynamic=False) if be.compiled else fn
    grids: dict[int, Any] = {}  # the full grid's coordinates, uploaded once per output size

    def run(inp: Inputs, out: int) -> Any:
        imgs, boxes = prepared(inp, S)
        if out not in grids:
            grids[out] = be._tensor(grid_coords(out, out)[None])
        return be._run(("fused", out), graph_fn, [be._tensor(imgs), grids[out], *be._box_inputs(boxes)])
    return run


def fused_sparse_runner(be: TorchBackend, seg: Segmenter, S: int, fraction: float,
                        host_runner: FrameRunner) -> Callable[[Inputs, int], Any]:
    """Encoder + box part + the device sparse planner in one CUDA graph (batch 1, one box): the whole
    frame is one replay; the host prepares the image and takes back the region's decisions. A frame over the
    device planner's budget runs on ``host_runner`` (the bf16 sparse runner), as the runtime does."""
    import torch

    def run(inp: Inputs, out: int) -> list[np.ndarray]:
        imgs, boxes = prepared(inp, S)
        img = inp.images[0]
        region = seg.region_for(np.asarray(inp.boxes[0], np.float64), img.shape[:2], (out, out))
        h, w = region.shape
        planner = be.planner((out, out), fraction, seg.sparse_cfg)
        if not planner.usable(h, w):
            raise ValueError(f"a {h} x {w} region is planned on the host")

        def fn(x: Any, reg: Any, table: Any, *box_inputs: Any) -> tuple[Any, ...]:
            up = be._raw_prompt(be._raw_encode(x), *box_inputs)
            return planner.plan(lambda c: tuple(o[0] if planner.fused else o[0].float()  # the kernel widens them
                                                for o in be.decoder.point_outputs(up, c[None])), reg, table)

        graph_fn = torch.compile(fn, fullgraph=True, dynamic=False) if be.compiled else fn
        reg, table = planner.region_inputs(region.r0, h, region.c0, w)  # made and uploaded as the runtime's
        planned = be.run_planner(("fused-sparse", out), planner, graph_fn,
                                 [be._tensor(imgs), be._tensor(reg, np.int64), be._tensor(table),
                                  *be._box_inputs(boxes)])
        if planned is None:  # over budget: this frame on the host planner, as the runtime does
            return host_runner.run(inp, (out, out), None)
        d = planned[1]
        mask = np.zeros((d.shape[0], out, out), bool)
        mask[:, region.r0 : region.r1, region.c0 : region.c1] = d[:, :h, :w].cpu().numpy()
        return [mask]
    return run


def host_planner(c: Check, r: FrameRunner, inp: Inputs, out: int) -> list[np.ndarray]:
    """The sparse mode with the numpy planner (a host round trip per level), for comparison."""
    be = c.ours["bf16"]
    keep = be.settings
    be.settings = replace(keep, device_planner=False)  # read per box by sparse_region: nothing to rebuild
    try:
        return r.run(inp, (out, out), c.stage_t.get("sparse bf16 host"))
    finally:
        be.settings = keep


def variants(c: Check, bsz: int, out: int, compiled: bool) -> dict[str, Callable[[Inputs], Any]]:
    """name -> frame function over Inputs (the reference is added by the caller). Compiled variants come
    in rows of their own, at batch 1 only (each shape is its own compilation, minutes on vit_b)."""
    stage_t, fused, fused_sparse = c.stage_t, c.fused, c.fused_sparse
    v: dict[str, Callable[[Inputs], Any]] = {}
    for p, (sp, bx, fu) in c.runners.items():
        if p.endswith("+compile") != compiled:
            continue
        if compiled:  # the two candidates for the fastest paths only: every compiled shape costs minutes
            v[f"sparse {p}"] = lambda inp, r=sp, n=f"sparse {p}": r.run(inp, (out, out), stage_t.get(n))
            v[f"fused {p}"] = lambda inp, f=fused[p]: f(inp, out)
            continue
        v[f"full {p}"] = lambda inp, r=fu, n=f"full {p}": r.run(inp, (out, out), stage_t.get(n))
        v[f"sparse {p}"] = lambda inp, r=sp, n=f"sparse {p}": r.run(inp, (out, out), stage_t.get(n))
        if p.endswith("+triton"):  # the Triton kernels' end-to-end figure: the box mode and host planner add nothing
            if bsz == 1:
                v[f"fused {p}"] = lambda inp, f=fused[p]: f(inp, out)
                v[f"fused-sparse {p}"] = lambda inp, f=fused_sparse[p]: f(inp, out)
            continue
        v["sparse bf16 host"] = lambda inp, r=sp: host_planner(c, r, inp, out)
        v[f"box {p}"] = lambda inp, r=bx, n=f"box {p}": r.run(inp, (out, out), stage_t.get(n))
        if bsz == 1:
            v[f"fused {p}"] = lambda inp, f=fused[p]: f(inp, out)
            v[f"fused-sparse {p}"] = lambda inp, f=fused_sparse[p]: f(inp, out)
    return v


# ---------------------------------------------------------------- the parts, in the order main runs them
def correctness(c: Check) -> dict[str, Any]:
    """fp32 correctness at the input size, batch 1 (every variant's agreement is in its timing rows)."""
    from imedsam_deploy.bench import FrameRunner, agreement, synthetic_inputs

    S = c.S
    inp = synthetic_inputs(S, 1, seed=1)
    checks: dict[str, Any] = {}
    try:
        if "correctness" not in c.a.parts:
            raise _Skip
        full_fp32 = FrameRunner(c.ours["fp32"], c.art, "full", c.opts).run(inp, (S, S), None)
        checks["full fp32"] = agreement(full_fp32[0], ref_frame(c, inp, S)[0],
                                        inp.boxes[0], inp.images[0].shape[:2])
        print(f"correctness full fp32: {json.dumps(checks['full fp32'])}", flush=True)
    except _Skip:
        pass
    except Exception as e:
        checks["full fp32"] = {"error": failure(e)}
    return checks


def timing_row(c: Check, out: int, bsz: int, compiled: bool) -> dict[str, Any]:
    """One timing row: every variant (and the reference) warmed up, then timed run by run, interleaved."""
    import torch

    from imedsam_deploy.bench import Timings, synthetic_inputs

    a, ours, stage_t = c.a, c.ours, c.stage_t
    row: dict[str, Any] = {"out_size": out, "batch": bsz, "compiled": compiled}
    inp = synthetic_inputs(c.S, bsz, seed=2)
    fns = variants(c, bsz, out, compiled)
    fns["reference fp32"] = lambda i, o=out: ref_frame(c, i, o)
    times: dict[str, list[float]] = {k: [] for k in fns}
    masks: dict[str, list[np.ndarray]] = {}
    errors: dict[str, str] = {}
    fallbacks0 = {p: be.planner_fallbacks for p, be in ours.items()}
    for name in list(fns):  # warm-up: graph capture, compilation, cuFFT plans, planner budgets
        try:
            for _ in range(warmup_runs(name)):
                masks[name] = as_masks(fns[name](inp), out)
        except Exception as e:  # report and go on: one broken variant must not cost the run
            errors[name] = failure(e)
            del fns[name]
            if c.clock.cuda:
                torch.cuda.empty_cache()
    fallbacks1 = {p: be.planner_fallbacks for p, be in ours.items()}
    for i in range(timed_runs(a.repeat, bsz)):  # a batch row times bsz frames per run
        for name, fn in fns.items():
            if name.startswith("reference") and i >= a.ref_repeat:
                continue
            stage_t[name] = stage_t.get(name) or Timings()
            times[name].append(c.clock.timed(lambda fn=fn, inp=inp: fn(inp)))
    row.update(timing_cells(times, masks, inp, bsz, stage_t))
    if errors:
        row["errors"] = errors
    # boxes the device planner handed to the host planner (over budget) in warm-up / timed runs
    row["planner_fallbacks"] = {p: [fallbacks1[p] - fallbacks0[p], be.planner_fallbacks - fallbacks1[p]]
                                for p, be in ours.items()}
    # the device planner's point budgets (what each pass's decoder call evaluates) after the warm-up
    row["planner_budgets"] = {p: [list(pl.budget_key()) for pl_key, pl in be._planners.items()
                                  if pl_key[0] == (out, out)] for p, be in ours.items()}
    if c.clock.cuda:
        row["gpu_peak_mb"] = torch.cuda.max_memory_allocated(c.clock.dev) / 2**20
    return row


def run_timing(c: Check, rows: list[tuple[int, int, bool]], results: dict[str, Any], out_dir: Path) -> None:
    """The timing rows in order, each appended to ``results["timing"]`` and saved; a row the budget leaves out
    is recorded as skipped."""
    for out, bsz, compiled in rows:
        why = row_over_budget(c.a.budget_s, c.elapsed_s(), compiled)
        if why is not None:
            row: dict[str, Any] = {"out_size": out, "batch": bsz, "compiled": compiled, "skipped": why}
            results["timing"].append(row)
            print(f"timing {json.dumps(row)}", flush=True)
            continue
        row = timing_row(c, out, bsz, compiled)
        results["timing"].append(row)
        save(results, out_dir, c.t_start)
        print(f"timing {json.dumps(row)}", flush=True)


def timing_settings(c: Check) -> None:
    """The timing rows' backend settings from the command line (after the decoder options, which restore the
    backends' own)."""
    if c.a.align_matmuls is not None:  # after the decoder options, which restore the backends' own settings
        for p, be in c.ours.items():
            if p != "fp32":
                be.configure(replace(be.settings, align_matmuls=c.a.align_matmuls == "on"))
    c.info["align_matmuls"] = c.ours["bf16"].settings.align_matmuls


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


def kernel_profile(clock: Clock, be: TorchBackend, fn: Callable[[], Any], calls: int = 3) -> dict[str, Any]:
    """``fn`` run eagerly (the backend's graphs off) under the profiler: kernels per call, their summed
    time, and the heaviest. Set beside the graph replay's time, it says whether a stage is bound by its
    kernels' work or by the gaps between many small ones (what fusion would buy)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = clock.cuda
    act, kind = (ProfilerActivity.CUDA, DeviceType.CUDA) if cuda else (ProfilerActivity.CPU, DeviceType.CPU)
    graphs, be.use_graphs = be.use_graphs, False
    try:
        for _ in range(2):
            fn()
        clock.sync()
        with profile(activities=[act]) as prof:
            for _ in range(calls):
                fn()
            clock.sync()
    finally:
        be.use_graphs = graphs
    rows = []
    for e in prof.key_averages():
        if e.device_type == kind:
            us = e.self_device_time_total if cuda else e.self_cpu_time_total
            rows.append((us / calls / 1e3, e.count / calls, e.key))
    rows.sort(reverse=True)
    return {"kernels_per_call": sum(r[1] for r in rows), "kernel_ms_per_call": sum(r[0] for r in rows),
            "top": [{"ms_per_call": ms, "count_per_call": n, "name": k[:90]} for ms, n, k in rows[:15]]}


def kernel_profiles(c: Check) -> dict[str, Any]:
    """Kernel profiles (eager) of the encoder and of a whole sparse and full frame at the input size."""
    from imedsam_deploy.bench import synthetic_inputs
    from imedsam_deploy.preprocess import to_model_input

    S, runners = c.S, c.runners
    prof_inp = synthetic_inputs(S, 1, seed=4)
    px = np.stack([to_model_input(im, S) for im in prof_inp.images])
    be16 = c.ours["bf16"]
    profiles: dict[str, Any] = {}
    for name, fn in (("encoder", lambda: be16.encode(px)),
                     ("sparse frame", lambda: runners["bf16"][0].run(prof_inp, (S, S), None)),
                     ("full frame", lambda: runners["bf16"][2].run(prof_inp, (S, S), None))):
        try:
            profiles[name] = kernel_profile(c.clock, be16, fn)
        except Exception as e:
            profiles[name] = {"error": failure(e)}
        print(f"kernel profile {name}: " + json.dumps({k: v for k, v in profiles[name].items() if k != "top"}),
              flush=True)
    return profiles


def memory(c: Check) -> list[dict[str, Any]]:
    """Memory against output size: each runtime mode's own peak, one frame at a time (batch 1)."""
    import torch

    from imedsam_deploy.bench import synthetic_inputs

    S, runners, dev, cuda, sync = c.S, c.runners, c.clock.dev, c.clock.cuda, c.clock.sync
    mem_inp = synthetic_inputs(S, 1, seed=6)
    cells: list[dict[str, Any]] = []
    for size in c.a.memory_sizes or (S, 896, 2048):
        for query, runner in (("full", runners["bf16"][2]), ("sparse", runners["bf16"][0])):
            cell: dict[str, Any] = {"out_size": size, "query": query}
            try:
                runner.run(mem_inp, (size, size), None)  # capture and warm-up outside the measurement
                sync()
                if cuda:
                    base = torch.cuda.memory_allocated(dev)
                    torch.cuda.reset_peak_memory_stats(dev)
                runner.run(mem_inp, (size, size), None)
                sync()
                if cuda:  # what a frame adds over what is held between frames (weights, graphs' pools)
                    cell["frame_peak_mb"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
                    cell["held_mb"] = base / 2**20
            except Exception as e:
                cell["error"] = failure(e)
            cells.append(cell)
            print(f"memory {json.dumps(cell)}", flush=True)
    return cells


# ---------------------------------------------------------------- set-up and the whole check
def set_up(a: argparse.Namespace, t_start: float) -> Check:
    """The model (random weights, seed 0), its in-process artifact, our backends and their frame runners, and the
    reference on the same weights."""
    import torch

    from imedsam_core.errors import UserError
    from imedsam_cuda.reference import ReferenceIMedSAM
    from imedsam_cuda.torch_models import model_artifact
    from imedsam_deploy.bench import BenchOptions, FrameRunner
    from imedsam_train.build import build

    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible to torch")
    cuda = dev.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (the reference's precision)
    torch.backends.cudnn.allow_tf32 = False
    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                            "device": torch.cuda.get_device_name(dev) if cuda else platform.processor(),
                            "model": a.model, "input_size": a.input_size, "weights": "random (seed 0)"}
    try:  # the kernels' compiler: the device image's differs from ours (benchmarks/kernel_build.py)
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    print(f"gpu_check: {info}", flush=True)
    clock = Clock(torch, dev)

    torch.manual_seed(0)
    model, _ = build(a.model, input_size=a.input_size)
    model = model.eval()
    maxb = max(a.batches)
    cfg = model.cfg
    art = model_artifact(model, max_batch=maxb)  # the runtime reads the manifest's figures: no export needed
    opts = BenchOptions()
    fraction = cfg.decoder.refine_fraction

    lean = lean_of(a)
    ours = {"fp32": backend(model, a, maxb, "fp32", lean), "bf16": backend(model, a, maxb, "bf16", lean)}
    if a.triton_kernels == "on":
        try:
            ours["bf16+triton"] = backend(model, a, maxb, "bf16", lean, triton=True)
        except UserError as e:  # no triton, no CUDA device, or not the lean encoder
            info["triton_kernels_skipped"] = str(e)
            print(f"gpu_check: no bf16+triton rows: {e}", flush=True)
    if a.compile != "none":
        ours["bf16+compile"] = backend(model, a, maxb, "bf16", lean, compile=True)
    bf16 = ours["bf16"].settings
    info["lean_encoder"], info["lean_box_part"] = bf16.lean_encoder, bf16.lean_box_part
    info["relu_epilogue"] = ours["bf16"].decoder.relu_epilogue
    info["fused_features"] = bf16.fused_features
    info["fused_uncertainty"] = bf16.fused_uncertainty
    info["fused_planner"] = bf16.fused_planner
    info["parts"] = a.parts
    ref = ReferenceIMedSAM(model.to(dev))
    c = Check(a=a, clock=clock, model=model, art=art, opts=opts, ours=ours, ref=ref, info=info, t_start=t_start)
    c.runners = {p: (FrameRunner(be, art, "sparse", opts), FrameRunner(be, art, "box", opts),
                     FrameRunner(be, art, "full", opts)) for p, be in ours.items() if p != "fp32"}
    c.fused = {p: fused_runner(ours[p], c.S, fraction) for p in c.runners}
    c.fused_sparse = {p: fused_sparse_runner(ours[p], c.runners[p][0].seg, c.S, fraction, c.runners["bf16"][0])
                      for p in c.runners}
    return c


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    for mod in ("torch", "segment_anything", "imedsam_core", "imedsam_train", "imedsam_export", "imedsam_deploy"):
        _need(mod)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    for mod in CHECK_MODULES:  # imported before the clock starts: the budget counts the work, not the imports
        importlib.import_module(mod)

    t_start = time.perf_counter()
    c = set_up(a, t_start)
    results: dict[str, Any] = {"info": c.info, "correctness": {}, "timing": []}
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---- 1. fp32 correctness at the input size, batch 1
    results["correctness"] = correctness(c)
    save(results, out_dir, t_start)

    early, late = timing_plan(a)
    # ---- 2a. timing, batch 1 first (the rest after the option tables, section 2b)
    if early:
        timing_settings(c)
        run_timing(c, early, results, out_dir)

    # ---- 1b. the encoder's options on their own (bf16, CUDA graphs): before/after figures for each
    if section_wanted(a, "encoder", c.elapsed_s(), results):
        results["encoder_options"] = encoder_options(c, c.ours["bf16"], sorted({1, min(8, c.maxb)}))
        save(results, out_dir, t_start)

    # ---- 1b'. the decoder's map sampling on its own: before/after of grid_sample in a sparse frame
    if section_wanted(a, "decoder", c.elapsed_s(), results):
        results["decoder_options"] = decoder_options(c, c.ours["bf16"], {"sparse": c.runners["bf16"][0],
                                                                          "full": c.runners["bf16"][2]})
        save(results, out_dir, t_start)

    # ---- 1c. kernel profiles (eager) of the encoder and of a whole sparse frame at the input size
    if section_wanted(a, "profile", c.elapsed_s(), results):
        results["kernel_profiles"] = kernel_profiles(c)
        save(results, out_dir, t_start)

    # ---- 1d. memory against output size: each runtime mode's own peak, one frame at a time (batch 1)
    if section_wanted(a, "memory", c.elapsed_s(), results):
        results["memory"] = memory(c)
        save(results, out_dir, t_start)

    # ---- 2b. timing: the compiled variants of batch 1, then the larger batches
    if not early:
        timing_settings(c)
    run_timing(c, late, results, out_dir)

    save(results, out_dir, t_start)
    for line in summary_lines(results, a.model, c.S):
        print(line)
    print(f"wrote {out_dir / 'gpu_check.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
