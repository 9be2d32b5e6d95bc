"""gpu_check's kernel profiles and memory: the encoder and a whole sparse and full frame run eagerly under the
profiler (kernels per call, their time, the heaviest), and one frame's own GPU memory peak per output size."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.gpu_check_report import failure
from benchmarks.gpu_check_runners import Check, Clock

if TYPE_CHECKING:
    from imedsam_cuda.torch_cuda import TorchBackend


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
