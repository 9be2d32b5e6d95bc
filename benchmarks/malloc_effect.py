"""Eager PyTorch on the CPU with malloc as the torch commands set it (``imedsam_core.malloc``: freed memory kept)
against glibc's defaults ($IMEDSAM_MALLOC=glibc), same machine, same run.

    python -m benchmarks.malloc_effect [--rounds 3] [--repeat 4] [--threads 2] [--workload NAME ...] [--json FILE]

Workloads, each timed in a fresh process per setting (malloc is set once per process), the settings' order
alternating per round:
- ``litemedsam``: zero-shot LiteMedSAM's eager pipeline end to end (``LiteMedSAMBaseline``: preprocess, TinyViT,
  prompt encoder, mask decoder, crop and resize) on one bundled sample image and its tight box: the reference of
  ``imedsam-bench --reference`` and ``benchmarks/lite_speed.py``;
- ``lite-eval``: the shipped lite model's eval-mode prediction (``evaluate.predict_logits``: encoder, full-grid
  INR decode at 256 px), as ``imedsam-eval`` runs it;
- ``lite-train``: a training step of the lite model's encoder, batch 2 (forward and backward through the frozen
  TinyViT with LoRA and the frequency adapters trainable), as ``imedsam-train`` phase 2 runs it.
Per process: one warm-up, then ``--repeat`` timed calls: the median seconds, the kernel (system) seconds and minor
page faults a call, and the process's peak resident memory. Prints a table of medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WORKLOADS = ("litemedsam", "lite-eval", "lite-train")
SETTINGS = ("glibc", "tuned")
REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "kvasir-sessile"


def _workload(name: str) -> Any:
    """A no-argument callable running ``name`` once."""
    import numpy as np
    import torch

    if name == "litemedsam":
        from imedsam_train.data.boxes import mask_box
        from imedsam_train.data.folder import read_pair
        from imedsam_train.pretrained import LiteMedSAMBaseline, lite_medsam

        stem = (SAMPLE / "splits" / "test.txt").read_text().split()[0]
        image, mask = read_pair(SAMPLE, stem)
        box = mask_box(mask)
        assert box is not None
        base = LiteMedSAMBaseline(lite_medsam())

        def run_base() -> None:
            base.forget()  # a whole frame each call: its embedding not kept
            base(image, np.asarray(box, np.float64), max(image.shape[:2]))

        return run_base
    from imedsam_train.checkpoint import load_checkpoint
    from imedsam_train.weights import shipped_checkpoint

    model, _ = load_checkpoint(shipped_checkpoint())
    s = model.cfg.input_size
    gen = torch.Generator().manual_seed(0)
    if name == "lite-eval":
        from imedsam_train.evaluate import predict_logits

        x, box = torch.rand(1, 3, s, s, generator=gen), torch.tensor([[0.25 * s, 0.25 * s, 0.75 * s, 0.75 * s]])
        return lambda: predict_logits(model, x, box, s)
    model.train()
    xb = torch.rand(2, 3, s, s, generator=gen)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        model.encode(xb).float().square().mean().backward()
        for p in trainable:
            p.grad = None

    return step


def _worker(name: str, repeat: int, threads: int) -> dict[str, Any]:
    from imedsam_core import malloc

    state = malloc.keep_freed_memory()
    import torch

    torch.set_num_threads(threads)
    run = _workload(name)
    run()
    secs, sys_s, faults = [], [], []
    for _ in range(repeat):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        run()
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        secs.append(t1 - t0)
        sys_s.append(r1.ru_stime - r0.ru_stime)
        faults.append(r1.ru_minflt - r0.ru_minflt)
    return {"malloc": state, "seconds": statistics.median(secs), "system_seconds": statistics.median(sys_s),
            "minor_faults": statistics.median(faults),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _spawn(name: str, setting: str, repeat: int, threads: int) -> dict[str, Any]:
    env = {**os.environ, "IMEDSAM_MALLOC": setting, "OMP_NUM_THREADS": str(threads)}
    res = subprocess.run([sys.executable, "-m", "benchmarks.malloc_effect", "--worker", name,
                          "--repeat", str(repeat), "--threads", str(threads)],
                         capture_output=True, text=True, cwd=REPO, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{name} ({setting}) failed: {res.stderr.strip().splitlines()[-1:]}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", action="append", choices=WORKLOADS, help="default: all")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--worker", choices=WORKLOADS, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a.worker, a.repeat, a.threads)))
        return 0
    if a.rounds < 1 or a.repeat < 1 or a.threads < 1:
        ap.error("--rounds, --repeat and --threads must be at least 1")
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {w: {s: [] for s in SETTINGS} for w in a.workload or WORKLOADS}
    for r in range(a.rounds):
        for w in rows:
            for setting in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                got = _spawn(w, setting, a.repeat, a.threads)
                rows[w][setting].append(got)
                print(f"round {r + 1} {w} {setting}: {got['seconds']:.3f} s ({got['malloc']})", file=sys.stderr)

    def med(w: str, s: str, k: str) -> float:
        return statistics.median(x[k] for x in rows[w][s])

    summary = {"threads": a.threads, "rounds": a.rounds, "repeat": a.repeat, "runs": rows,
               "median": {w: {s: {k: med(w, s, k) for k in ("seconds", "system_seconds", "minor_faults", "peak_rss_mb")}
                              for s in SETTINGS} for w in rows}}
    if a.json:
        from imedsam_core.atomic import atomic_write_text

        atomic_write_text(a.json, json.dumps(summary, indent=2) + "\n")
    print(f"{'workload':<12}{'glibc s':>9}{'tuned s':>9}{'speed-up':>10}{'sys s glibc/tuned':>19}"
          f"{'peak MB glibc/tuned':>21}")
    for w in rows:
        g, t = summary["median"][w]["glibc"], summary["median"][w]["tuned"]
        print(f"{w:<12}{g['seconds']:>9.3f}{t['seconds']:>9.3f}{g['seconds'] / t['seconds']:>9.2f}x"
              f"{g['system_seconds']:>10.3f} / {t['system_seconds']:.3f}"
              f"{g['peak_rss_mb']:>13.0f} / {t['peak_rss_mb']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
