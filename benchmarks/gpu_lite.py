"""The shipped lite model against zero-shot LiteMedSAM, both eager PyTorch on one device, same images and boxes.

    python -m benchmarks.gpu_lite --data data/sample/kvasir-sessile [--device cuda] [--out-size 256 896]
        [--repeat 5] [--json FILE]

Per case (``imedsam-eval``'s cases: tight boxes, the model-frame image), interleaved, each timed end to end
from the model input to the mask on the host, the device synchronised before each clock read:
- ``lite``: the shipped checkpoint, eval mode, every output pixel queried (``predict_logits``), fp32;
- ``lite-amp``: the same under ``torch.autocast`` float16 (what training on a GPU runs); its masks' Dice
  against fp32's says whether half precision holds;
- ``litemedsam``: ``LiteMedSAMBaseline`` (preprocess, TinyViT, prompt encoder, mask decoder, resize), fp32.
The median of ``--repeat`` runs per case after one warm-up case; Dice against the ground truth per model.
On the CPU it is a dry run of the same code (slow); the figures that matter come from a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from imedsam_train.metrics import dice  # the evaluation's own Dice, in percent


def timed(fn: Callable[[], np.ndarray], sync: Callable[[], None], repeat: int) -> tuple[float, np.ndarray]:
    """(median seconds, the last result) of ``repeat`` runs, the device synchronised around each."""
    times, out = [], np.zeros(0)
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def run(data: Path, split: Path | None, device: str, out_sizes: list[int], repeat: int,
        limit: int) -> dict[str, Any]:
    import torch

    from imedsam_train.checkpoint import load_checkpoint
    from imedsam_train.data import kvasir_dataset
    from imedsam_train.evaluate import cases_from_dataset, predict_logits
    from imedsam_train.preprocess import input_boxes, to_input
    from imedsam_train.pretrained import LiteMedSAMBaseline, lite_medsam
    from imedsam_train.weights import shipped_checkpoint

    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    model, _ = load_checkpoint(shipped_checkpoint())
    model = model.eval().to(dev)
    base = LiteMedSAMBaseline(lite_medsam(), dev)
    s, pre = model.cfg.input_size, model.cfg.preprocess
    ds = kvasir_dataset(data, split if split is not None else "test")
    rows: list[dict[str, Any]] = []
    for o in out_sizes:
        cases = list(cases_from_dataset(ds, s, o, 0.0, 0, keep_original=True, pre=pre))[:limit]
        for n, c in enumerate(cases):
            valid = c.valid or (s, s)
            box_in = input_boxes(c.box[None], pre, c.orig_size, s)
            x = to_input(c.image, pre, valid)[None]

            def ours(amp: bool, x: torch.Tensor = x, box_in: torch.Tensor = box_in,
                     valid: tuple[int, int] = valid, o: int = o, k: int = c.cls) -> np.ndarray:
                with torch.no_grad(), torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
                    return (predict_logits(model, x, box_in, o, valid=valid)[k] > 0).numpy().reshape(o, o)

            def theirs(c: Any = c, o: int = o) -> np.ndarray:
                base._cached = None  # the encoder runs every time, as for a new frame
                return base(c.original, c.box, o)

            if n == 0:  # warm-up: kernels, allocator, cuDNN plans
                ours(False), ours(True), theirs()
            t_l, m_l = timed(lambda: ours(False), sync, repeat)
            t_a, m_a = timed(lambda: ours(True), sync, repeat)
            t_b, m_b = timed(theirs, sync, repeat)
            rows.append({"stem": c.stem, "out_size": o, "lite_s": t_l, "lite_amp_s": t_a, "litemedsam_s": t_b,
                         "dice_lite": dice(m_l, c.gt), "dice_lite_amp": dice(m_a, c.gt),
                         "dice_litemedsam": dice(m_b, c.gt), "dice_amp_vs_fp32": dice(m_a, m_l)})
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "repeat": repeat, "rows": rows}


def summary(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per output size: medians of the times, means of the Dice figures."""
    out = []
    for o in sorted({r["out_size"] for r in res["rows"]}):
        rs = [r for r in res["rows"] if r["out_size"] == o]
        med = {k: statistics.median(r[k] for r in rs) for k in ("lite_s", "lite_amp_s", "litemedsam_s")}
        mean = {k: float(np.mean([r[k] for r in rs]))
                for k in ("dice_lite", "dice_lite_amp", "dice_litemedsam", "dice_amp_vs_fp32")}
        out.append({"out_size": o, "n": len(rs), **med, **mean,
                    "speedup_fp32": med["litemedsam_s"] / med["lite_s"],
                    "speedup_amp": med["litemedsam_s"] / med["lite_amp_s"]})
    return out


def table(lines: list[dict[str, Any]], device: str) -> str:
    head = (f"{device}: per case, ms (median) | Dice vs ground truth (mean)\n"
            "out  n   lite  lite-amp  litemedsam  speedup(fp32/amp) | lite  lite-amp  litemedsam  amp-vs-fp32")
    body = [f"{r['out_size']:<4} {r['n']:<3} {1e3 * r['lite_s']:6.2f} {1e3 * r['lite_amp_s']:8.2f} "
            f"{1e3 * r['litemedsam_s']:11.2f}  {r['speedup_fp32']:5.2f}x/{r['speedup_amp']:.2f}x      | "
            f"{r['dice_lite']:5.2f} {r['dice_lite_amp']:8.2f} {r['dice_litemedsam']:10.2f} {r['dice_amp_vs_fp32']:11.2f}"
            for r in lines]
    return "\n".join([head, *body])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("data/sample/kvasir-sessile"))
    ap.add_argument("--split", type=Path, default=None, help="stem list (default: the data's test split)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out-size", type=int, nargs="+", default=[256, 896])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--limit", type=int, default=1000, help="cases per output size at most")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    res = run(a.data, a.split, a.device, a.out_size, a.repeat, a.limit)
    res["summary"] = summary(res)
    if a.json is not None:
        from imedsam_core.atomic import atomic_write_text

        atomic_write_text(a.json, json.dumps(res, indent=1) + "\n")
    print(table(res["summary"], res["device"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
