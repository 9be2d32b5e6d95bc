"""Figures: the training curve and a best/worst sheet with prediction and truth contours (matplotlib, Agg)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imedsam_core.atomic import atomic_write_bytes


def _figure() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def training_curve(history: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Loss per epoch (total, coarse, fine) and validation Dice (jittered boxes) where validated."""
    plt = _figure()
    ep = [h["epoch"] for h in history]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key, label in (("loss", "total"), ("loss_coarse", "coarse"), ("loss_fine", "fine")):
        a1.plot(ep, [h[key] for h in history], label=label)
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss")
    a1.legend()
    val = [(h["epoch"], h["val_dice"]) for h in history if h["val_dice"] == h["val_dice"]]  # skip NaN
    a2.plot([e for e, _ in val], [v for _, v in val], marker=".", label="val Dice, jittered boxes")
    a2.set_xlabel("epoch")
    a2.set_ylabel("Dice %")
    a2.legend()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def case_sheet(cases: Sequence[Any], path: str | Path, per_side: int = 4, title: str = "") -> None:
    """Best and worst cases by Dice: image, box (yellow), truth contour (green), prediction contour (red),
    and any image baseline's prediction (e.g. LiteMedSAM, dashed cyan) with its Dice in the title."""
    plt = _figure()
    extra = list(getattr(cases[0], "baseline_preds", {})) if cases else []
    colors = dict(zip(extra, ("cyan", "magenta", "orange"), strict=False))
    ranked = sorted(cases, key=lambda c: c.metrics["dice"])
    worst = ranked[:per_side]
    best = ranked[::-1][:per_side]
    n = max(len(best), 1)
    fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.6), squeeze=False)
    for row, (label, group) in enumerate((("best", best), ("worst", worst))):
        for k in range(n):
            ax = axes[row][k]
            ax.axis("off")
            if k >= len(group):
                continue
            c = group[k]
            ax.imshow(c.image)
            ax.contour(c.gt.astype(float), levels=[0.5], colors=["lime"], linewidths=1.2)
            if c.pred.any():
                ax.contour(c.pred.astype(float), levels=[0.5], colors=["red"], linewidths=1.2)
            for name in extra:
                if name in colors and c.baseline_preds[name].any():
                    ax.contour(c.baseline_preds[name].astype(float), levels=[0.5], colors=[colors[name]],
                               linewidths=1.0, linestyles="dashed")
            x0, y0, x1, y1 = c.box_out
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1))
            others = "".join(f" / {c.baselines[n]['dice']:.1f}" for n in extra if n in colors)
            ax.set_title(f"{label}: {c.stem[:12]} {c.metrics['dice']:.1f}{others}", fontsize=8)
    if title:
        legend = "".join(f", {colors[n]} dashed: {n}" for n in extra if n in colors)
        fig.suptitle(title + f"  (green: truth, red: prediction{legend}, yellow: box)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
