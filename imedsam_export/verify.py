"""Parity of the exported graphs (ONNX Runtime, CPU) against the unmodified PyTorch model.

Random inputs, then real Kvasir-Sessile images (the sample bundled with the repository, when present):
fp32 logits within 1e-3 absolute and >= 99.9% identical mask pixels after the UGS merge; the fp16 graphs'
Dice against the ground truth within 0.5 points of the fp32 graphs'. Every figure goes into the manifest.

fp16 caveat: ONNX Runtime's CPU provider runs fp16 nodes that lack a CPU fp16 kernel in fp32 (it inserts
Casts and drops redundant pairs), so its fp16 figures bound the error of fp16 *weights and storage*, not of
fp16 arithmetic: an fp16 graph with no fp32 islands at all still looks fine there. For small models the
export also runs the fp16 graphs through ``onnx.reference`` (numpy, every op computed and rounded in its
declared dtype, like a GPU would), which does expose overflow; that figure ("fp16_reference") is checked too.
GPU figures come from the TensorRT engines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imedsam_core import contract as C
from imedsam_core.errors import UserError
from imedsam_train.config import PreprocessConfig
from imedsam_train.data.boxes import mask_box
from imedsam_train.data.folder import read_pair
from imedsam_train.metrics import dice
from imedsam_train.model import IMedSAM, ugs_merge

FP32_LOGIT_TOL = 1e-3
MASK_AGREEMENT_MIN = 0.999
FP16_DICE_TOL = 0.5  # Dice points (%)
# int8 encoders (ONNX Runtime dynamic, OpenVINO calibrated): masks vs PyTorch fp32, Dice vs fp32 graphs
INT8_MASK_AGREEMENT_MIN = 0.99
INT8_DICE_TOL = 1.0  # Dice points (%)
SAMPLE_DIR = Path(__file__).resolve().parents[1] / "data" / "sample" / "kvasir-sessile"


@dataclass
class RealSample:
    name: str
    image: np.ndarray  # (3, S, S) float32, the model's preprocessing
    box: np.ndarray  # (4,) float32, model-input pixels, the model's convention
    mask: np.ndarray | None  # (S, S) bool, ground truth on an S x S output grid (None: random image)
    coords: np.ndarray  # (S * S, 2) float32: that output grid's query points in the model frame


# onnx.reference is plain numpy (fp16 matmuls without BLAS): only for models about the size of "tiny"
REFERENCE_MAX_WIDTH = 256
REFERENCE_MAX_INPUT = 256
REFERENCE_IMAGES = 2


def reference_session(path: Path) -> Any:
    """A numpy session computing every op in its declared dtype (same ``run`` signature as ORT)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(path))


class OvSession:
    """An OpenVINO model (``--ov-int8``'s encoder) behind ONNX Runtime's ``run(None, feeds)``, on the CPU in fp32
    (its int8 parts int8)."""

    def __init__(self, path: Path) -> None:
        import openvino as ov

        self.model = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

    def run(self, _outputs: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        res = self.model(feeds)
        return [np.asarray(res[o]) for o in self.model.outputs]


def session(path: Path) -> Any:
    if path.suffix == ".xml":
        return OvSession(path)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def make_sample(name: str, rgb: np.ndarray, box: np.ndarray, mask: np.ndarray | None, size: int,
                pre: PreprocessConfig) -> RealSample:
    """One case in the model's preprocessing (``imedsam_train.preprocess``, the runtime's twin): ``box`` (4,)
    pixel edges and ``mask`` (S, S) on the S x S output grid over the original image."""
    from imedsam_train.preprocess import input_boxes, output_coords, prepare_image, to_input

    u8, valid = prepare_image(rgb, pre, size)
    x = to_input(u8, pre, valid).numpy()
    b = input_boxes(np.asarray(box, np.float64)[None], pre, rgb.shape[:2], size)[0].numpy()
    return RealSample(name, x, b, mask, output_coords(pre, size, size, valid, size).numpy())


def load_real_samples(size: int, limit: int, root: Path = SAMPLE_DIR, split: Path | None = None,
                      pre: PreprocessConfig | None = None) -> list[RealSample]:
    """Test-split images of the bundled sample (image, tight mask box, mask), or [] when it is absent."""
    import cv2

    pre = pre or PreprocessConfig()

    split = split or root / "splits" / "test.txt"
    if not split.is_file():
        return []
    out: list[RealSample] = []
    for stem in split.read_text().split():
        try:
            rgb, gt = read_pair(root, stem)
        except UserError:  # a sample, not a data set: a missing or unreadable pair is skipped
            continue
        box = mask_box(gt)
        if box is None:
            continue
        mask = cv2.resize(gt.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST) > 0
        out.append(make_sample(stem, rgb, box, mask, size, pre))
        if len(out) >= limit:
            break
    return out


def random_samples(size: int, count: int, seed: int = 0, pre: PreprocessConfig | None = None) -> list[RealSample]:
    """Fallback when the sample data is absent: smooth random images, a central box, no ground truth."""
    import cv2

    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        small = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
        rgb = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
        box = np.array([0.2, 0.25, 0.75, 0.8], dtype=np.float64) * size
        out.append(make_sample(f"random{i}", rgb, box, None, size, pre or PreprocessConfig()))
    return out


def run_decoder(sess: Any, emb: np.ndarray, boxes: np.ndarray, coords: np.ndarray, max_points: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decoder over N points in chunks of max_points (as the runtime does); outputs (B, K, N) float32."""
    parts: list[list[np.ndarray]] = [[], [], []]
    for i in range(0, coords.shape[1], max_points):
        outs = sess.run(list(C.DECODER_OUTPUTS), {C.DEC_IN_EMBEDDING: emb, C.DEC_IN_BOXES: boxes,
                                                  C.DEC_IN_COORDS: np.ascontiguousarray(coords[:, i:i + max_points])})
        for p, o in zip(parts, outs, strict=True):
            p.append(np.asarray(o, dtype=np.float32))
    c, f, u = (np.concatenate(p, axis=-1) for p in parts)
    return c, f, u


def _maxdiff(a: np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    bb = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    return float(np.abs(a.astype(np.float64) - bb.astype(np.float64)).max())


def _merged(c: np.ndarray, f: np.ndarray, u: np.ndarray, fraction: float) -> np.ndarray:
    return ugs_merge(torch.from_numpy(c), torch.from_numpy(f), torch.from_numpy(u), fraction).numpy()


@torch.no_grad()
def verify_random(model: IMedSAM, enc_path: Path, dec_path: Path, max_batch: int, max_points: int,
                  seed: int = 0, split: tuple[Path, Path] | None = None) -> dict[str, Any]:
    """fp32 graphs vs PyTorch on random images / boxes / coords, at N = 1, a middle N and N = max_points.

    ``split`` (decoder_prompt, decoder_points): the decoder cut in two, compared with the one-graph decoder
    on the same inputs (``split_decoder_max_abs_diff``)."""
    cfg = model.cfg
    s = cfg.input_size
    g = torch.Generator().manual_seed(seed)
    enc, dec = session(enc_path), session(dec_path)
    prompt, points = (session(split[0]), session(split[1])) if split is not None else (None, None)
    split_worst = 0.0
    b = min(2, max_batch)
    image = torch.rand(b, 3, s, s, generator=g)
    emb_ref = model.encode(image)
    emb = enc.run(None, {C.ENC_IN_IMAGE: image.numpy()})[0]
    res: dict[str, Any] = {"encoder_max_abs_diff": _maxdiff(emb, emb_ref)}
    x0 = torch.rand(max_batch, 2, generator=g) * 0.5 * s
    boxes = torch.cat([x0, x0 + 0.1 * s + torch.rand(max_batch, 2, generator=g) * 0.4 * s], dim=1)
    emb_b = emb_ref.repeat(math.ceil(max_batch / b), 1, 1, 1)[:max_batch]
    worst = 0.0
    cases = sorted({(1, 1), (max_batch, min(max_points, 1000)), (1, max_points)})
    for bb, n in cases:
        coords = torch.rand(bb, n, 2, generator=g) * 2.2 - 1.1  # a little outside [-1, 1]: zero padding
        ref = model.decode_dense(emb_b[:bb], boxes[:bb], coords)
        outs = dec.run(list(C.DECODER_OUTPUTS), {C.DEC_IN_EMBEDDING: emb_b[:bb].numpy(),
                                                 C.DEC_IN_BOXES: boxes[:bb].numpy(), C.DEC_IN_COORDS: coords.numpy()})
        for o, r in zip(outs[:2], ref[:2], strict=True):
            worst = max(worst, _maxdiff(o, r))
        res[f"decoder_uncertainty_max_abs_diff_b{bb}_n{n}"] = _maxdiff(outs[2], ref[2])
        if prompt is not None and points is not None:
            (feats,) = prompt.run(list(C.PROMPT_OUTPUTS), {C.DEC_IN_EMBEDDING: emb_b[:bb].numpy(),
                                                           C.DEC_IN_BOXES: boxes[:bb].numpy()})
            got = points.run(list(C.DECODER_OUTPUTS), {C.DEC_BOX_FEATURES: feats, C.DEC_IN_COORDS: coords.numpy()})
            split_worst = max(split_worst, *(_maxdiff(g_, o) for g_, o in zip(got, outs, strict=True)))
    res["decoder_logit_max_abs_diff"] = worst
    if split is not None:
        res["split_decoder_max_abs_diff"] = split_worst
    res["cases"] = [list(c) for c in cases]
    return res


@torch.no_grad()
def verify_real(model: IMedSAM, graphs: dict[str, tuple[Path, Path]], max_points: int, limit: int = 4,
                samples: list[RealSample] | None = None, progress: Any = None) -> dict[str, Any]:
    """Full-grid predictions on real images for each precision's graphs vs PyTorch (fp32). ``progress``
    (cli_common.Progress) counts the image passes, PyTorch's and each graph's."""
    cfg = model.cfg
    s = cfg.input_size
    source = "data/sample/kvasir-sessile (test split)"
    samples = load_real_samples(s, limit, pre=cfg.preprocess) if samples is None else samples
    if not samples:  # Dice then compares with the PyTorch fp32 masks
        samples, source = random_samples(s, limit, pre=cfg.preprocess), "random images (bundled sample absent)"
    frac = cfg.decoder.refine_fraction
    res: dict[str, Any] = {"images": len(samples), "source": source,
                           "names": [x.name for x in samples], "output_size": [s, s]}
    ref_masks, gts = [], []
    ref_logits = []
    small = cfg.encoder.embed_dim <= REFERENCE_MAX_WIDTH and s <= REFERENCE_MAX_INPUT
    with_ref = "fp16" in graphs and small
    done = 0
    if progress is not None:
        progress.set_total(len(samples) * (1 + len(graphs)) + (min(REFERENCE_IMAGES, len(samples)) if with_ref else 0))
    for x in samples:
        emb = model.encode(torch.from_numpy(x.image)[None])
        c, f, u = model.decode_dense(emb, torch.from_numpy(x.box)[None], torch.from_numpy(x.coords)[None])
        ref_logits.append((c.numpy(), f.numpy()))
        ref_masks.append(ugs_merge(c, f, u, frac).numpy()[0, 0].reshape(s, s) > 0)
        gts.append(x.mask if x.mask is not None else ref_masks[-1])
        done += 1
        if progress is not None:
            progress.update(done)
    res["dice_pytorch"] = float(np.mean([dice(m, t) for m, t in zip(ref_masks, gts, strict=True)]))
    runs: list[tuple[str, Any, Any, int]] = [(p, session(e), session(d), len(samples)) for p, (e, d) in graphs.items()]
    if with_ref:
        e, d = graphs["fp16"]
        runs.append(("fp16_reference", reference_session(e), reference_session(d), REFERENCE_IMAGES))
    for prec, enc, dec, count in runs:
        masks, worst = [], 0.0
        for x, (rc, rf) in list(zip(samples, ref_logits, strict=True))[:count]:
            emb = enc.run(None, {C.ENC_IN_IMAGE: x.image[None]})[0].astype(np.float32)
            oc, of, ou = run_decoder(dec, emb, x.box[None], x.coords[None], max_points)
            worst = max(worst, _maxdiff(oc, rc), _maxdiff(of, rf))
            masks.append(_merged(oc, of, ou, frac)[0, 0].reshape(s, s) > 0)
            done += 1
            if progress is not None:
                progress.update(done)
        n = len(masks)
        agree = float(np.mean([np.mean(m == r) for m, r in zip(masks, ref_masks[:n], strict=True)]))
        res[prec] = {
            "images": n,
            "runner": "onnx.reference (numpy, per-op dtypes)" if prec.endswith("_reference")
            else "openvino CPU (encoder), onnxruntime CPUExecutionProvider (decoder)" if prec == C.OV_INT8
            else "onnxruntime CPUExecutionProvider",
            "logit_max_abs_diff": worst,
            "mask_agreement": agree,
            "dice": float(np.mean([dice(m, t) for m, t in zip(masks, gts[:n], strict=True)])),
            "dice_fp32_same_images": float(np.mean([dice(m, t) for m, t in zip(ref_masks[:n], gts[:n], strict=True)])),
            "dice_vs_pytorch": float(np.mean([dice(m, r) for m, r in zip(masks, ref_masks[:n], strict=True)])),
        }
    return res


def check(parity: dict[str, Any]) -> list[str]:
    """Failed criteria (empty when the export passes)."""
    bad: list[str] = []
    rnd = parity["random"]
    if rnd["encoder_max_abs_diff"] > FP32_LOGIT_TOL or rnd["decoder_logit_max_abs_diff"] > FP32_LOGIT_TOL:
        bad.append(f"fp32 random-input max abs diff {max(rnd['encoder_max_abs_diff'], rnd['decoder_logit_max_abs_diff']):.2e}"
                   f" > {FP32_LOGIT_TOL}")
    if rnd.get("split_decoder_max_abs_diff", 0.0) > FP32_LOGIT_TOL:
        bad.append(f"split decoder vs one-graph decoder max abs diff {rnd['split_decoder_max_abs_diff']:.2e} > {FP32_LOGIT_TOL}")
    real = parity["real"]
    if real.get("images") and "fp32" in real:
        fp32 = real["fp32"]
        if fp32["logit_max_abs_diff"] > FP32_LOGIT_TOL:
            bad.append(f"fp32 real-image logit max abs diff {fp32['logit_max_abs_diff']:.2e} > {FP32_LOGIT_TOL}")
        if fp32["mask_agreement"] < MASK_AGREEMENT_MIN:
            bad.append(f"fp32 mask agreement {fp32['mask_agreement']:.5f} < {MASK_AGREEMENT_MIN}")
        for prec in ("fp16", "fp16_reference"):
            r = real.get(prec)
            if r is not None and not abs(r["dice"] - r["dice_fp32_same_images"]) <= FP16_DICE_TOL:
                bad.append(f"{prec} Dice {r['dice']:.2f} vs fp32 {r['dice_fp32_same_images']:.2f}: "
                           f"more than {FP16_DICE_TOL} points apart")
        for prec in ("int8", C.OV_INT8):  # both int8 encoders held to the same tolerances
            r = real.get(prec)
            if r is None:
                continue
            if not abs(r["dice"] - r["dice_fp32_same_images"]) <= INT8_DICE_TOL:
                bad.append(f"{prec} Dice {r['dice']:.2f} vs fp32 {r['dice_fp32_same_images']:.2f}: "
                           f"more than {INT8_DICE_TOL} points apart")
            if not r["mask_agreement"] >= INT8_MASK_AGREEMENT_MIN:
                bad.append(f"{prec} mask agreement {r['mask_agreement']:.5f} < {INT8_MASK_AGREEMENT_MIN}")
    return bad
