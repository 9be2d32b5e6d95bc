"""gpu_check's command line and timing plan (no torch): the arguments, the order of the timing rows, the time
budget that rows and sections start within, and each row's warm-up and timed run counts."""

from __future__ import annotations

import argparse
import os
from typing import Any

PARTS = ("correctness", "encoder", "decoder", "profile", "memory", "timing")
COMPILED_ROW_ROOM_S = 180  # a compiled row compiles first: it starts only with this much of the budget left


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The command line; ``description`` is the help text (gpu_check's docstring)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def lean_of(a: argparse.Namespace) -> bool | None:
    """--lean-layers as the backends take it (None: the backend's own default)."""
    return None if a.lean_layers is None else a.lean_layers == "on"


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
