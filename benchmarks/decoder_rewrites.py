"""Before/after of each exact decoder rewrite, on the same weights and the same query points.

    python -m benchmarks.decoder_rewrites [--model vit_b] [--points 16384] [--threads 2] [--artifact DIR]

Steps, each timed on the CPU (per-point INR work only; the box-conditioned feature maps are computed once):
  A. reference: T = 2 MC passes, each recomputing the whole coarse trunk (the released code), fine INR on
     the top 12.5%;
  B. shared trunk: one coarse trunk, closed-form uncertainty, fine INR at every point (``decode_dense``);
  C. + BatchNorm folded, both trunks' first layers as one matmul, Gather bilinear taps: the exporter's
     ``DecoderGraph`` (PyTorch; see its docstring for the positional-map table it measured and dropped);
  D. the exported ONNX decoder on ONNX Runtime (``--artifact``; includes the per-call two-way transformer).
Every step's logits are compared with B (max abs difference), so each rewrite is shown to be exact.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b")
    ap.add_argument("--input-size", type=int, default=384)
    ap.add_argument("--points", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--artifact", type=Path, default=None, help="exported artifact of the same weights")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from imedsam_cuda.reference import ReferenceIMedSAM
    from imedsam_cuda.torch_models import random_model
    from imedsam_export.graphs import DecoderGraph
    from imedsam_export.merge import merge_for_export
    from imedsam_train.model.inr import ugs_merge

    torch.set_num_threads(a.threads)
    model = random_model(a.model, a.input_size)
    s = a.input_size
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, s, s, generator=g)
    box = torch.tensor([[0.3 * s, 0.3 * s, 0.67 * s, 0.67 * s]])
    coords = torch.rand(1, a.points, 2, generator=g) * 2 - 1
    with torch.no_grad():
        emb = model.encode(image)
        up, pe = model.decoder_features(emb, box)
        feats = model.point_features(up, pe, coords)
    inr = model.inr
    ref = ReferenceIMedSAM(model)
    frac = inr.refine_fraction

    def best(fn: Any) -> tuple[Any, float]:
        out, ts = None, []
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - t0)
        return out, min(ts) * 1e3

    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        # A: the reference's INR structure on the same features (its decode() minus the feature maps)
        def step_a() -> torch.Tensor:
            flat = feats.reshape(-1, feats.shape[-1])
            outs, h = [], None
            for _ in range(inr.T):
                h = inr.coarse_trunk(flat)
                outs.append(inr.coarse_head(torch.nn.functional.dropout(h, inr.p, training=False)))
            mean = torch.stack(outs).mean(0)
            logits, cfeat = mean[:, :1].reshape(1, -1, 1), mean[:, 1:].reshape(1, a.points, -1)
            _, _, unc = inr.coarse_eval(feats)  # the closed-form ranking (see reference.py)
            k = max(1, int(np.ceil(frac * a.points)))
            idx = unc.topk(k, dim=1).indices[:, :, 0]
            sel = torch.cat([feats[0, idx[0]], cfeat[0, idx[0]]], -1)
            out = logits.clone()
            out[0, idx[0], 0] = inr.fine_head(inr.fine_trunk(sel))[:, 0]
            return out.transpose(1, 2)

        def step_b() -> torch.Tensor:
            c, f, u = inr.dense(feats)
            return ugs_merge(c, f, u, frac)

        out_b, t_b = best(step_b)
        out_a, t_a = best(step_a)
        rows.append({"step": "A reference (T=2 trunk passes, fine on top 12.5%)", "ms": t_a,
                     "max_abs_diff_vs_B": float((out_a - out_b).abs().max())})
        rows.append({"step": "B shared trunk, closed-form uncertainty, fine at every point", "ms": t_b,
                     "max_abs_diff_vs_B": 0.0})
        folded, _ = merge_for_export(model)
        dg = DecoderGraph(folded).eval()
        up_f, _ = folded.decoder_features(emb, box)

        def step_c() -> torch.Tensor:
            # DecoderGraph.forward minus its decoder_features call (timed apart: same in every step)
            lg, fi, un = dg.point_outputs(up_f, coords)
            return ugs_merge(lg, fi, un, frac)

        out_c, t_c = best(step_c)
        rows.append({"step": "C + BN folded, one first-layer matmul, Gather taps (DecoderGraph)",
                     "ms": t_c, "max_abs_diff_vs_B": float((out_c - out_b).abs().max())})
        _, t_feat = best(lambda: model.decoder_features(emb, box))
        rows.append({"step": "(per box, every step) prompt encoder + two-way transformer + upscaling", "ms": t_feat})
        _ = ref
    if a.artifact is not None:
        from imedsam_deploy.backends.ort import OrtBackend
        from imedsam_deploy.manifest import load_artifact

        be = OrtBackend(load_artifact(a.artifact), "cpu", "fp32", threads=a.threads)
        e = be.encode(image.numpy())[0]
        res, t_d = best(lambda: be.decode(e, box.numpy(), coords.numpy()))
        c, f, u = (torch.from_numpy(x) for x in res)
        out_d = ugs_merge(c, f, u, frac)
        rows.append({"step": "D ONNX Runtime decoder (includes the per-call transformer)", "ms": t_d,
                     "max_abs_diff_vs_B": float((out_d - out_b).abs().max())})
    for r in rows:
        r["points"] = a.points
        if "max_abs_diff_vs_B" in r:
            r["points_per_s"] = a.points / (r["ms"] / 1e3)
        print(json.dumps(r))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
