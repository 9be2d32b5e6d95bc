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

# This file is the entry point (the docstring above is its --help): the set-up and the order of the parts
# (set_up, main). The parts live beside it: gpu_check_plan.py (arguments, timing plan, budget),
# gpu_check_report.py (cells, saving, the final table), gpu_check_runners.py (the frames, variants, correctness
# and timing rows), gpu_check_sweeps.py (the encoder and decoder option tables) and gpu_check_profile.py (kernel
# profiles, memory); each imports only those before it in this list, and none imports this file.

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run by path (python benchmarks/gpu_check.py): its modules are found from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpu_check_plan import lean_of, parse_args, section_wanted, timing_plan  # noqa: E402
from benchmarks.gpu_check_profile import kernel_profiles, memory  # noqa: E402
from benchmarks.gpu_check_report import save, summary_lines  # noqa: E402
from benchmarks.gpu_check_runners import (  # noqa: E402
    Check,
    Clock,
    backend,
    correctness,
    fused_runner,
    fused_sparse_runner,
    run_timing,
    timing_settings,
)
from benchmarks.gpu_check_sweeps import decoder_options, encoder_options  # noqa: E402

CHECK_MODULES = ("imedsam_core.atomic", "imedsam_core.contract", "imedsam_core.errors", "imedsam_cuda.reference",
                 "imedsam_cuda.torch_cuda", "imedsam_cuda.torch_models", "imedsam_deploy.bench",
                 "imedsam_cuda.torch_settings", "imedsam_deploy.preprocess", "imedsam_deploy.runtime",
                 "imedsam_train.build")


def _need(mod: str) -> None:
    try:
        __import__(mod)
    except ImportError as e:
        sys.exit(f"gpu_check: cannot import {mod} ({e}); install the repo with `pip install -e .[train]`")


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
    a = parse_args(argv, __doc__)
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
