"""gpu_check's results (no torch): a failure as one line, a timing row's cells (times, speed-up, agreement with
the reference, stage times), gpu_check.json (rewritten after every row) and the short table printed last."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from imedsam_deploy.bench import Inputs, Timings


def failure(e: BaseException) -> str:
    """One line, but the whole message up to 800 characters: a Triton CompilationError's first line only
    places the error ("at 26:18:"); its source excerpt and cause follow (session 7 needed them)."""
    text = " | ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return f"{type(e).__name__}: {text[:800]}"


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
