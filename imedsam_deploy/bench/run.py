"""The benchmark itself: every (batch, output size) configuration warmed up, then timed ``repeat`` times on each
backend and query mode, with the reference interleaved when asked for; the JSON-able report."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from imedsam_core.errors import UserError
from imedsam_deploy.bench.inputs import Inputs, synthetic_inputs
from imedsam_deploy.bench.options import BenchOptions
from imedsam_deploy.bench.reference import against_reference, check_reference, open_reference, reference_kind
from imedsam_deploy.bench.reports import row_line, summarise
from imedsam_deploy.bench.targets import open_backends, share_options
from imedsam_deploy.bench.timing import (
    STAGES,
    FrameRunner,
    Timings,
    machine,
    peak_rss_mb,
    percentiles,
    reset_peak_rss,
)
from imedsam_deploy.bench.tuning import tune_backends
from imedsam_deploy.manifest import Artifact, load_artifact
from imedsam_deploy.runtime import DEFAULT_CHUNK, QUERY_MODES, QueryMode, check_tta

QUERIES = QUERY_MODES


def default_out_sizes(input_size: int, reference: bool) -> tuple[int, ...]:
    """The input size first (the summary's row), then a third of it and 7/3 of it: the paper's 384 -> 128 / 896
    cross-resolution settings, so the latency-against-output-size plot has a curve. With the reference, the
    input size alone: the released code's full-grid compute at 896² takes minutes and gigabytes on a CPU."""
    if reference:
        return (input_size,)
    return (input_size, max(1, round(input_size / 3)), round(input_size * 7 / 3))


def run_bench(artifact_path: Path | Artifact, opts: BenchOptions, model: Any | None = None,
              inputs_for: Callable[[int, int], Inputs] | None = None,
              log: Callable[[str], None] = print,
              progress: Any = None) -> dict[str, Any]:
    """Benchmark ``artifact_path`` (or an already loaded / in-process ``Artifact``); ``model`` (the same
    weights, in-process) enables torch backends and the reference without a checkpoint. Returns the JSON-able
    report."""
    artifact = artifact_path if isinstance(artifact_path, Artifact) else load_artifact(artifact_path)
    s = artifact.input_size
    if opts.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(opts.threads))
    for q in opts.queries:
        if q not in QUERIES:
            raise UserError(f"query mode {q!r} not one of {', '.join(QUERIES)}")
    if opts.tta:
        check_tta(artifact)
    if opts.reference:
        check_reference(artifact, opts.tta)
    shares = share_options(opts.backends, opts.backend_options, opts.reference)
    backends, skipped = open_backends(artifact, opts.backends, opts.precision, model, opts.threads, log, shares)
    checkpoint = shares.get("reference", {}).get("checkpoint")
    ref = open_reference(artifact, model, opts.threads, Path(checkpoint) if checkpoint else None, opts.tta) \
        if opts.reference else None
    make_inputs = inputs_for or (lambda size, batch: synthetic_inputs(size, batch))
    sizes = opts.out_sizes or default_out_sizes(s, opts.reference)
    tunings = tune_backends(backends, artifact, opts, make_inputs(s, opts.batches[0]), sizes[0] or s, log) \
        if opts.tune else []
    results: list[dict[str, Any]] = []
    reference_rows: list[dict[str, Any]] = []
    rounds = 0
    if progress is not None:  # cli_common.Progress: timed rounds done, their rate and the time left
        progress.set_total(len(opts.batches) * len(sizes) * (opts.warmup + opts.repeat))
    for batch in opts.batches:
        for out_size in sizes:
            osz = out_size or s
            out_hw = (osz, osz)
            inputs = make_inputs(s, batch)
            runners = [(b, q, FrameRunner(b, artifact, cast(QueryMode, q), opts))  # queries checked above
                       for b in backends for q in opts.queries]
            timings = [Timings() for _ in runners]
            ref_times: list[float] = []
            ref_masks = None
            peaks: list[float] = [0.0] * len(runners)
            gpu_peaks: list[float | None] = [None] * len(runners)
            for i in range(opts.warmup + opts.repeat):
                timed = i >= opts.warmup
                for j, (be, _q, fr) in enumerate(runners):
                    reset_peak_rss()
                    torch_mod: Any = getattr(be, "torch", None)
                    on_gpu = torch_mod is not None and getattr(be, "device", None).type == "cuda"  # type: ignore[union-attr]
                    if on_gpu:
                        torch_mod.cuda.reset_peak_memory_stats()
                    fr.run(inputs, out_hw, timings[j] if timed else None)
                    peaks[j] = max(peaks[j], peak_rss_mb())
                    if on_gpu:
                        gpu_peaks[j] = max(gpu_peaks[j] or 0.0, torch_mod.cuda.max_memory_allocated() / 2**20)
                if ref is not None and (timed or i == 0):
                    # the reference is slow: one warm-up pass at most, then interleaved with ours
                    masks = ref.run(inputs, out_hw, ref_times if timed else None)
                    ref_masks = ref_masks if ref_masks is not None else masks
                rounds += 1
                if progress is not None:
                    progress.update(rounds)
            ref_e2e = percentiles(ref_times) if ref_times else None
            if ref_e2e is not None:
                reference_rows.append({"batch": batch, "out_size": osz, "e2e_ms": ref_e2e,
                                       "fps": batch / ref_e2e["p50"] * 1e3})
            for j, (be, q, fr) in enumerate(runners):
                t = timings[j]
                e2e = percentiles(t.total)
                row: dict[str, Any] = {
                    "backend": be.name, "description": be.description, "precision": getattr(be, "precision", opts.precision),
                    "query": q, "batch": batch, "out_size": osz,
                    "stages_ms": {st: percentiles(t.stages[st]) for st in STAGES}, "e2e_ms": e2e,
                    "fps": batch / e2e["p50"] * 1e3,
                    "decoder_points_per_frame": t.points / max(1, len(t.total)),
                    "decoder_points_per_s": t.points / t.decoder_s if t.decoder_s > 0 else None,
                    "peak_rss_mb": peaks[j], "gpu_peak_mb": gpu_peaks[j],
                }
                if ref_e2e is not None and ref_masks is not None:
                    row.update(against_reference(ref_e2e, ref_times, t.total, e2e["p50"],
                                                 fr.run(inputs, out_hw, None), ref_masks, inputs))
                results.append(row)
                log(row_line(row))
    for b in backends:
        b.close()
    report: dict[str, Any] = {
        "format": "imedsam-bench", "version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(), "artifact": str(artifact.path), "model": artifact.manifest.get("model", {}).get("name"),
        "input_size": s,
        "settings": {"precision": opts.precision, "batches": list(opts.batches),
                     "out_sizes": [o or s for o in sizes], "queries": list(opts.queries),
                     "chunk": opts.chunk or DEFAULT_CHUNK, "warmup": opts.warmup, "repeat": opts.repeat,
                     "margin": opts.margin, "sparse": opts.sparse.__dict__, "threads": opts.threads,
                     "backend_options": dict(opts.backend_options),
                     "tta": opts.tta, "reference_device": str(ref.device) if ref else None,
                     "reference": reference_kind(artifact) if ref else None},
        "skipped": skipped, "results": results, "reference": reference_rows,
        "backends": summarise(results),
    }
    if opts.tune:
        report["tuning"] = tunings
    return report
