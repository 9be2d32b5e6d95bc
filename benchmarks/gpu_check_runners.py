"""gpu_check's frames and timing rows: the clock, the shared state (``Check``), our backends, the reference's,
the one-graph and host-planner frames, the variants of a row, the fp32 correctness check, and the timing rows
themselves (warm-up, interleaved timed runs, their cells). Torch is imported inside the functions only."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.gpu_check_plan import row_over_budget, timed_runs, warmup_runs
from benchmarks.gpu_check_report import failure, save, timing_cells

if TYPE_CHECKING:
    from imedsam_cuda.torch_cuda import TorchBackend
    from imedsam_deploy.bench import BenchOptions, FrameRunner, Inputs, Timings
    from imedsam_deploy.manifest import Artifact
    from imedsam_deploy.runtime import Segmenter


class _Skip(Exception):
    """A section left out by --parts."""


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


def as_masks(m: Any, out: int) -> list[np.ndarray]:
    if isinstance(m, list):
        return [x.reshape(-1, out, out) for x in m]
    return [x.reshape(-1, out, out) for x in m.cpu().numpy()]  # the fused graph's (B, K, N) on the device


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


# ---------------------------------------------------------------- correctness and the timing rows
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
