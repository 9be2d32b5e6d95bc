"""Choose the lite model's base-logit smoothing on val, and say what it does on test, against LiteMedSAM.

    python -m benchmarks.base_smoothing [CHECKPOINT] --data ../shared/data/Kvasir-Sessile \
        [--sigmas 0 0.5 1 1.5 2 2.5 3] [--box-jitter 20] [--seed 0] [--out-size 256] [--test] \
        [--write OUT.pt] [--json FILE] [--threads 2]

The lite model adds its INR's logit to the base mask head's logit map (``LiteIMedSAM``); that map, at the
input's 256 x 256 pixels, carries a few specks and pinholes (at specular highlights, along the box's edge)
that hardly move the Dice but carry the mean HD95. ``DecoderConfig.base_smoothing`` smooths it with a
Gaussian of sigma pixels before the points read it. For each sigma this scores, on the val split (and with
--test on the test split too, for the record: test chooses nothing), the checkpoint through eval's own
full-grid prediction (``imedsam_train.evaluate.case_logits``), and zero-shot LiteMedSAM on the same cases,
raw and with the same Gaussian on its own 256 x 256 low-resolution logits (so the table shows what the
smoothing would do for LiteMedSAM as well). Dice %, HD95 and HD in output pixels, means over the cases.

The rule: among the sigmas whose val HD95 is no worse than without smoothing (sigma 0, always scored), the
one with the best val Dice (ties: the lower HD95). --write saves a copy of the checkpoint with
that sigma in its config and the scan in its ``train_meta["base_smoothing"]`` (atomic); its weights are the
checkpoint's, unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path, nargs="?", default=None, help="a lite checkpoint [default: the shipped one]")
    ap.add_argument("--data", type=Path, required=True, help="folder with images/, masks/ and splits/{val,test}.txt")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0])
    ap.add_argument("--box-jitter", type=float, default=20.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-size", type=int, default=256)
    ap.add_argument("--test", action="store_true", help="also score the test split (reported, never used to choose)")
    ap.add_argument("--write", type=Path, default=None, help="save the checkpoint with the chosen sigma here")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)

    from imedsam_core.malloc import keep_freed_memory

    keep_freed_memory()  # eager PyTorch (LiteMedSAM, the lite model) as the torch commands run it

    import torch

    from imedsam_core.atomic import atomic_write_text
    from imedsam_train.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
    from imedsam_train.eval_cli import load_data
    from imedsam_train.evaluate import case_logits, cases_from_dataset
    from imedsam_train.metrics import all_metrics
    from imedsam_train.model.lite import LiteIMedSAM
    from imedsam_train.model.smoothing import LogitSmoothing
    from imedsam_train.preprocess import to_input
    from imedsam_train.pretrained import LiteMedSAMBaseline, lite_medsam, postprocess
    from imedsam_train.weights import shipped_checkpoint

    torch.set_num_threads(a.threads)
    sigmas = sorted(set(a.sigmas) | {0.0})
    ck = a.checkpoint or shipped_checkpoint()
    model, _ = load_checkpoint(ck)
    if not isinstance(model, LiteIMedSAM):
        print(f"{ck}: not a lite checkpoint (only the lite model has a base logit map)", file=sys.stderr)
        return 2
    trained_sigma, s_in = model.cfg.decoder.base_smoothing, model.cfg.input_size

    def litemedsam_mask(low: torch.Tensor, valid: tuple[int, int], sigma: float) -> np.ndarray:
        """Zero-shot LiteMedSAM's mask from its 256 x 256 logits (``low_logits``), first smoothed like ours
        (sigma 0: as shipped)."""
        if sigma:
            low = LogitSmoothing(sigma)(low)
        return (postprocess(low, valid, (a.out_size, a.out_size)).cpu()[0] > 0).numpy()

    lm = LiteMedSAMBaseline(lite_medsam())
    splits = ["val", "test"] if a.test else ["val"]
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for split in splits:
        ds = load_data(a.data, "auto", a.data / "splits" / f"{split}.txt")
        per: dict[str, dict[str, list[dict[str, float]]]] = {f"{s:g}": {"ours": [], "litemedsam": []} for s in sigmas}
        cases = list(cases_from_dataset(ds, model.cfg.input_size, a.out_size, a.box_jitter, a.seed,
                                        keep_original=True, pre=model.cfg.preprocess))
        for n, c in enumerate(cases):
            with torch.no_grad():  # one encoder pass a case: the smoothing acts after it
                emb = model.encode(to_input(c.image, model.cfg.preprocess, c.valid or (s_in, s_in))[None])

            def cached(_x: torch.Tensor, e: torch.Tensor = emb) -> torch.Tensor:
                return e

            assert c.original is not None
            lm_low, lm_valid = lm.low_logits(c.original, c.box[None])  # once a case: sigma acts after it
            for s in sigmas:
                model.set_base_smoothing(s)
                pred = (case_logits(model, c, a.out_size, encode=cached)[c.cls] > 0).numpy()
                per[f"{s:g}"]["ours"].append(all_metrics(pred.reshape(a.out_size, a.out_size), c.gt))
                per[f"{s:g}"]["litemedsam"].append(all_metrics(litemedsam_mask(lm_low, lm_valid, s), c.gt))
            print(f"{split}: {n + 1}/{len(cases)}", file=sys.stderr, flush=True)
        table[split] = {k: {who: {m: float(np.mean([r[m] for r in rows])) for m in ("dice", "hd95", "hd")}
                             for who, rows in v.items()} for k, v in per.items()}
    model.set_base_smoothing(trained_sigma)

    val = table["val"]
    ok = [k for k in val if val[k]["ours"]["hd95"] <= val["0"]["ours"]["hd95"]]
    chosen = max(ok, key=lambda k: (round(val[k]["ours"]["dice"], 6), -val[k]["ours"]["hd95"]))
    for split, rows in table.items():
        print(f"\n{split} ({a.box_jitter:g} px jitter, seed {a.seed}, {a.out_size} px): Dice / HD95 / HD")
        print("| sigma | lite checkpoint | LiteMedSAM, same smoothing |")
        print("|---|---|---|")
        for k, r in rows.items():
            o, b = r["ours"], r["litemedsam"]
            mark = " (chosen on val)" if k == chosen else ""
            print(f"| {k}{mark} | {o['dice']:.2f} / {o['hd95']:.3f} / {o['hd']:.3f} "
                  f"| {b['dice']:.2f} / {b['hd95']:.3f} / {b['hd']:.3f} |")
    record = {"checkpoint": str(ck), "data": str(a.data), "box_jitter": a.box_jitter, "seed": a.seed,
              "out_size": a.out_size, "chosen_sigma": float(chosen), "rule": "best val Dice with val HD95 <= sigma 0's",
              "scores": table}
    if a.json is not None:
        atomic_write_text(a.json, json.dumps(record, indent=2) + "\n")
    if a.write is not None:
        payload = read_checkpoint(ck)
        model.set_base_smoothing(float(chosen))
        payload["config"] = model.cfg.to_dict()
        meta = dict(payload.get("train_meta") or {})
        meta["base_smoothing"] = {k: v for k, v in record.items() if k != "checkpoint"}
        payload["train_meta"] = meta
        save_checkpoint(a.write, payload)
        print(f"wrote {a.write} (base_smoothing {float(chosen):g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
