"""Evaluation: the model and the baselines (box, ellipse; optionally zero-shot LiteMedSAM) on the same
(optionally jittered) boxes.

Frames. Boxes are computed from the full-resolution mask and jittered there (each side out by
U(0, J) original-image pixels, seeded by (seed, stem, class)); the model sees the image prepared by its own
preprocessing (``ModelConfig.preprocess``: stretched to its input size S, or letterboxed) with the box mapped
accordingly; predictions are rendered at ``out_size`` x ``out_size`` (default S) over the image's own pixels
(``preprocess.output_coords``: never the padding) and scored against the mask resized to that size, so
HD95/HD are in output pixels.
Image baselines (LiteMedSAM) get the original image and the same original-pixel box, and render their
prediction in the same O x O frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from imedsam_core.contract import mirror_box
from imedsam_train.baselines import BASELINES
from imedsam_train.config import PreprocessConfig
from imedsam_train.data.boxes import jitter_box, mask_box, scale_box, stable_seed
from imedsam_train.data.records import Dataset
from imedsam_train.metrics import all_metrics, paired, summarise
from imedsam_train.model import IMedSAM, ugs_merge
from imedsam_train.preprocess import input_boxes, output_coords, prepare_image, to_input

METRICS = ("dice", "iou", "hd95", "hd")
DISTANCES = ("hd95", "hd")  # of METRICS, those where lower is better (output pixels)

# (original RGB image, box in its pixels, output size) -> (O, O) bool mask in the stretched output frame
ImageBaseline = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


@dataclass
class Case:
    stem: str
    cls: int
    image: torch.Tensor  # (3, S, S) uint8, the model-frame image (``preprocess.prepare_image``)
    gt: np.ndarray  # (O, O) bool
    box: np.ndarray  # (x0, y0, x1, y1) in original-image pixels (already jittered)
    orig_size: tuple[int, int]  # (H, W)
    original: np.ndarray | None = None  # (H, W, 3) uint8, kept only for image baselines
    valid: tuple[int, int] | None = None  # the unpadded (h, w) of ``image``; None: all of it


@dataclass
class CaseResult:
    stem: str
    cls: int
    pred: np.ndarray
    gt: np.ndarray
    box_out: np.ndarray
    image: np.ndarray  # (O, O, 3) uint8 for figures
    metrics: dict[str, float]
    baselines: dict[str, dict[str, float]]
    baseline_preds: dict[str, np.ndarray] = field(default_factory=dict)  # image baselines' masks, for figures


@dataclass
class EvalResult:
    cases: list[CaseResult]
    class_names: list[str]
    out_size: int
    box_jitter: float
    seed: int
    skipped: dict[str, int] = field(default_factory=dict)
    tta: bool = False  # the model's logits averaged with the mirrored image's (``case_logits``)

    def summary(self) -> dict[str, object]:
        """JSON-ready: n, dice (mean %), per-metric mean/std, baselines, paired differences, per-class breakdown."""
        out: dict[str, object] = {"n": len(self.cases), "out_size": self.out_size, "box_jitter": self.box_jitter,
                                  "seed": self.seed, "tta": "flip" if self.tta else None, "skipped": dict(self.skipped)}
        model = {m: summarise([c.metrics[m] for c in self.cases]) for m in METRICS}
        out["dice"] = model["dice"]["mean"]
        out["metrics"] = model
        names = list(self.cases[0].baselines) if self.cases else list(BASELINES)
        out["baselines"] = {b: summarise([c.baselines[b]["dice"] for c in self.cases])["mean"] for b in names}
        out["baseline_metrics"] = {
            b: {m: summarise([c.baselines[b][m] for c in self.cases]) for m in METRICS} for b in names
        }
        # per case, model minus baseline: whether a margin between two means is one the cases establish
        out["paired"] = {
            b: {m: paired([c.metrics[m] for c in self.cases], [c.baselines[b][m] for c in self.cases],
                          lower_is_better=m in DISTANCES) for m in ("dice", "hd95")} for b in names
        }
        if len(self.class_names) > 1:
            per: dict[str, object] = {}
            for k, name in enumerate(self.class_names):
                cs = [c for c in self.cases if c.cls == k]
                if cs:
                    per[name] = {"n": len(cs), **{m: summarise([c.metrics[m] for c in cs]) for m in METRICS},
                                 "baselines": {b: summarise([c.baselines[b]["dice"] for c in cs])["mean"]
                                               for b in names}}
            out["per_class"] = per
        return out


def resize_mask(m: np.ndarray, size: int) -> np.ndarray:
    return cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR) >= 0.5


def cases_from_dataset(
    ds: Dataset, input_size: int, out_size: int, box_jitter: float, seed: int,
    skipped: dict[str, int] | None = None, keep_original: bool = False, pre: PreprocessConfig | None = None,
) -> Iterator[Case]:
    """One case per non-empty (image, class) mask; empty masks are counted in ``skipped['empty_mask']``.

    keep_original: each case also holds the full-resolution image (image baselines need it; a training
    run's validation cases, held in memory, do not)."""
    for rec in ds.records:
        s = rec.load()
        h, w = s.image.shape[:2]
        img, valid = prepare_image(s.image, pre or PreprocessConfig(), input_size)
        for cls, m in s.masks:
            tight = mask_box(m)
            if tight is None:
                if skipped is not None:
                    skipped["empty_mask"] = skipped.get("empty_mask", 0) + 1
                continue
            box = jitter_box(tight, box_jitter, w, h, np.random.default_rng(stable_seed(seed, s.stem, cls)))
            yield Case(s.stem, cls, img, resize_mask(m, out_size), box, (h, w),
                       s.image if keep_original else None, valid)


@torch.no_grad()
def predict_logits(
    model: IMedSAM, image: torch.Tensor, box: torch.Tensor, out_size: int, chunk: int = 1 << 16,
    valid: tuple[int, int] | None = None, encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Eval-mode full-grid prediction (K, O*O): dense decode in point chunks, UGS merged over all points.

    Equal to ``model(image, box, out_size=...)`` in eval mode (stretch preprocessing); chunking keeps memory
    flat at 896². valid: the unpadded region of a letterboxed input (the output covers it only). encode:
    replaces ``model.encode`` (e.g. cached embeddings of a frozen encoder).
    """
    dev = next(model.parameters()).device
    emb = (encode or model.encode)(image.to(dev))
    s = model.cfg.input_size
    coords = output_coords(model.cfg.preprocess, out_size, out_size, valid or (s, s), s, dev)
    parts = [model.decode_dense(emb, box.to(dev), coords[i : i + chunk][None]) for i in range(0, len(coords), chunk)]
    coarse, fine, unc = (torch.cat([p[j] for p in parts], dim=-1) for j in range(3))
    return ugs_merge(coarse, fine, unc, model.cfg.decoder.refine_fraction)[0].float().cpu()


def case_logits(model: IMedSAM, c: Case, out_size: int,
                encode: Callable[[torch.Tensor], torch.Tensor] | None = None, tta: bool = False) -> torch.Tensor:
    """One case's full-grid logits (K, O*O) in the stretched output frame (eval mode; see ``predict_logits``).
    tta: averaged with the mirrored image's (``contract.mirror_box``; ``encode`` then sees that image too)."""
    s, pre = model.cfg.input_size, model.cfg.preprocess
    valid = c.valid or (s, s)
    box_in = input_boxes(c.box[None], pre, c.orig_size, s)
    logits = predict_logits(model, to_input(c.image, pre, valid)[None], box_in, out_size, valid=valid, encode=encode)
    if not tta:
        return logits
    # the padding sits at the bottom and right whatever the image: mirroring the unpadded region is preparing
    # the mirrored original
    mirrored = c.image.clone()
    mirrored[:, : valid[0], : valid[1]] = c.image[:, : valid[0], : valid[1]].flip(-1)
    box_m = input_boxes(np.array([mirror_box(c.box, c.orig_size[1])]), pre, c.orig_size, s)
    back = predict_logits(model, to_input(mirrored, pre, valid)[None], box_m, out_size, valid=valid, encode=encode)
    k = logits.shape[0]
    return (logits + back.view(k, out_size, out_size).flip(-1).reshape(k, -1)) / 2


def run_cases(model: IMedSAM, cases: Iterable[Case], out_size: int,
              progress: Callable[[int], None] | None = None,
              channel_map: list[int] | None = None,
              image_baselines: dict[str, ImageBaseline] | None = None,
              encode: Callable[[torch.Tensor], torch.Tensor] | None = None, tta: bool = False) -> list[CaseResult]:
    """channel_map: model output channel of each data class (default: the same index). encode: see
    ``predict_logits``; tta: see ``case_logits``."""
    model.eval()
    s = model.cfg.input_size
    results = []
    for n, c in enumerate(cases):
        h, w = c.orig_size
        valid = c.valid or (s, s)
        logits = case_logits(model, c, out_size, encode, tta)
        logits = logits[channel_map[c.cls] if channel_map else c.cls]
        pred = (logits > 0).numpy().reshape(out_size, out_size)
        box_out = scale_box(c.box, out_size / w, out_size / h)
        base = {name: all_metrics(fn(box_out, out_size, out_size), c.gt) for name, fn in BASELINES.items()}
        preds = {}
        for name, ib in (image_baselines or {}).items():
            if c.original is None:
                raise ValueError(f"{c.stem}: image baseline '{name}' needs the original image")
            preds[name] = ib(c.original, c.box, out_size)
            base[name] = all_metrics(preds[name], c.gt)
        shown = c.image[:, : valid[0], : valid[1]]
        img_out = cv2.resize(shown.permute(1, 2, 0).numpy(), (out_size, out_size), interpolation=cv2.INTER_LINEAR)
        results.append(CaseResult(c.stem, c.cls, pred, c.gt, box_out, img_out, all_metrics(pred, c.gt), base, preds))
        if progress:
            progress(n + 1)
    return results


def evaluate(
    model: IMedSAM, ds: Dataset, out_size: int | None = None, box_jitter: float = 0.0, seed: int = 0,
    progress: Callable[[int], None] | None = None, channel_map: list[int] | None = None,
    image_baselines: dict[str, ImageBaseline] | None = None, tta: bool = False,
) -> EvalResult:
    o = out_size or model.cfg.input_size
    skipped = dict(ds.skipped)
    cases = cases_from_dataset(ds, model.cfg.input_size, o, box_jitter, seed, skipped,
                               keep_original=bool(image_baselines), pre=model.cfg.preprocess)
    res = run_cases(model, cases, o, progress, channel_map, image_baselines, tta=tta)
    return EvalResult(res, ds.class_names, o, box_jitter, seed, skipped, tta)


def mean_dice(results: list[CaseResult]) -> float:
    v = [r.metrics["dice"] for r in results]
    return float(np.mean(v)) if v else math.nan
