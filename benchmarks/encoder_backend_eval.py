"""``imedsam-eval``'s protocol with the encoder run by an exported graph on a deployment backend: what a
reduced-precision CPU encoder (OpenVINO bf16 or int8, ONNX Runtime int8) costs in Dice and HD95 on real cases.

    python -m benchmarks.encoder_backend_eval --artifact EXPORT --data ../shared/data/Kvasir-Sessile \\
        [--checkpoint CKPT] [--split .../splits/test.txt] [--box-jitter 20] [--out-size 256] [--seed 0] \\
        [--encoder ort-fp32 --encoder ov-bf16 ...] [--baseline-litemedsam] [--threads 2] [--json FILE]

The checkpoint (default: the shipped model) is the one the artifact was exported from (checked by sha256 against
the manifest's source). Each ``--encoder`` replaces ``model.encode`` (``evaluate.run_cases(encode=...)``) by the
artifact's encoder graph on that backend and precision; the decoder stays the checkpoint's PyTorch fp32, as
``ov-cpu`` keeps ONNX Runtime's fp32 decoder (within 1e-4 of PyTorch: the export's parity check). Same cases,
same boxes (jitter and seed), same output grid as ``imedsam-eval``; ``torch`` is the checkpoint's own encoder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ENCODERS = ("torch", "ort-fp32", "ort-int8", "ov-fp32", "ov-bf16", "ov-int8")


def encoder_fn(name: str, artifact: object, threads: int) -> Callable[..., object] | None:
    """``model.encode``'s replacement for ``name`` (None: the checkpoint's own)."""
    import torch

    if name == "torch":
        return None
    from imedsam_deploy.backends import open_backend

    kind, prec = name.split("-")
    be, _ = open_backend(f"{kind}-cpu", artifact, prec, threads=threads)  # type: ignore[arg-type]

    def encode(x: torch.Tensor) -> torch.Tensor:
        (emb,) = be.encode(np.ascontiguousarray(x.numpy(), np.float32))
        return torch.from_numpy(np.asarray(emb, np.float32))

    return encode


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--checkpoint", type=Path, default=None, help="default: the shipped model")
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--split", type=Path, default=None, help="default: DATA/splits/test.txt")
    ap.add_argument("--box-jitter", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-size", type=int, default=None, help="default: the model's input size")
    ap.add_argument("--encoder", action="append", choices=ENCODERS, default=None)
    ap.add_argument("--baseline-litemedsam", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    from imedsam_core.malloc import keep_freed_memory

    keep_freed_memory()  # eager PyTorch (LiteMedSAM, the lite model) as the torch commands run it

    import torch

    from imedsam_core.atomic import atomic_write_text
    from imedsam_deploy.manifest import load_artifact
    from imedsam_train.build import sha256_file
    from imedsam_train.checkpoint import load_checkpoint
    from imedsam_train.data import folder_dataset
    from imedsam_train.evaluate import cases_from_dataset, run_cases
    from imedsam_train.metrics import summarise
    from imedsam_train.weights import shipped_checkpoint

    torch.set_num_threads(a.threads)
    ckpt = a.checkpoint or shipped_checkpoint()
    art = load_artifact(a.artifact)
    sha = sha256_file(ckpt)
    if art.manifest.get("source", {}).get("sha256") != sha:
        raise SystemExit(f"{a.artifact}: not exported from {ckpt} (the manifest's source sha256 differs)")
    model, _ = load_checkpoint(ckpt)
    model = model.eval()
    ds = folder_dataset(a.data, a.split or a.data / "splits" / "test.txt")
    o = a.out_size or model.cfg.input_size
    cases = list(cases_from_dataset(ds, model.cfg.input_size, o, a.box_jitter, a.seed,
                                    keep_original=a.baseline_litemedsam, pre=model.cfg.preprocess))
    out: dict[str, dict[str, float]] = {}
    per_case: dict[str, list[float]] = {}
    preds: dict[str, list[np.ndarray]] = {}
    for i, name in enumerate(a.encoder or ["torch", "ov-bf16"]):
        baselines = None
        if a.baseline_litemedsam and i == 0:
            from imedsam_train.pretrained import LiteMedSAMBaseline, lite_medsam

            baselines = {"litemedsam": LiteMedSAMBaseline(lite_medsam())}
        t = time.time()
        res = run_cases(model, cases, o, image_baselines=baselines, encode=encoder_fn(name, art, a.threads))
        # imedsam-eval's means (``summarise``: an undefined HD95, of an empty mask, is left out there too)
        out[name] = {m: summarise([r.metrics[m] for r in res])["mean"] for m in ("dice", "hd95")}
        per_case[name] = [r.metrics["dice"] for r in res]
        preds[name] = [r.pred for r in res]
        if baselines:
            out["litemedsam"] = {m: summarise([r.baselines["litemedsam"][m] for r in res])["mean"]
                                 for m in ("dice", "hd95")}
        print(f"{name}: Dice {out[name]['dice']:.2f} HD95 {out[name]['hd95']:.2f} ({time.time() - t:.0f} s)",
              file=sys.stderr, flush=True)
    first = next(iter(preds))
    agreement = {n: float(np.mean([(p == q).mean() for p, q in zip(preds[first], ps, strict=True)]))
                 for n, ps in preds.items()}
    print(f"{len(cases)} cases, jitter {a.box_jitter:g}, seed {a.seed}, {o} px; masks' pixels against {first}'s")
    print(f"{'encoder':<12}{'Dice':>8}{'HD95':>8}{'pixels':>10}")
    for n, v in out.items():
        pix = f"{100 * agreement[n]:.3f}%" if n in agreement else ""
        print(f"{n:<12}{v['dice']:>8.2f}{v['hd95']:>8.2f}{pix:>10}")
    if a.json:
        atomic_write_text(a.json, json.dumps({"settings": {"artifact": str(a.artifact), "checkpoint": str(ckpt),
                                                   "box_jitter": a.box_jitter, "seed": a.seed, "out_size": o,
                                                   "cases": len(cases)},
                                      "means": out, "pixel_agreement": agreement, "dice_per_case": per_case},
                                     indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
