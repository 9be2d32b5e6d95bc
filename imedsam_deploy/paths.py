"""Where runs, checkpoints and artifacts live by default (torch-free; shared by every command).

    runs/<name>/checkpoints/{last,best}.pt   training (imedsam-train)
    runs/<name>/log.csv, curve.png, ...      training logs
    runs/<name>/export/                      artifact (imedsam-export default --out): manifest.json, *.onnx
    $IMEDSAM_CACHE (~/.cache/imedsam)/       bench/ random-weight artifacts, tuning/ torch-cuda's tunings

Commands that take an optional CHECKPOINT or ARTIFACT default to the newest run in the current folder,
then to the model shipped with the package.
"""

from __future__ import annotations

import os
from pathlib import Path

from imedsam_deploy.contract import MANIFEST_NAME

RUNS_DIR = Path("runs")
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
EXPORT_DIR = "export"
CACHE_ENV = "IMEDSAM_CACHE"  # what the commands make for themselves: random-weight artifacts, tunings


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "imedsam"))


def run_dir(name: str, root: Path | None = None) -> Path:
    return (root or Path.cwd()) / RUNS_DIR / name


def latest_run(root: Path | None = None) -> Path | None:
    """The newest run folder (by its newest checkpoint's mtime) under ``root/runs``, or None."""
    base = (root or Path.cwd()) / RUNS_DIR
    if not base.is_dir():
        return None
    best: tuple[float, Path] | None = None
    for d in base.iterdir():
        cks = [p for p in (d / CHECKPOINT_DIR).glob("*.pt") if p.is_file()]
        if cks:
            t = max(p.stat().st_mtime for p in cks)
            if best is None or t > best[0]:
                best = (t, d)
    return best[1] if best else None


def latest_checkpoint(root: Path | None = None) -> Path | None:
    """best.pt of the newest run (last.pt if no best yet), or None."""
    run = latest_run(root)
    if run is None:
        return None
    for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
        p = run / CHECKPOINT_DIR / name
        if p.is_file():
            return p
    return None


def latest_artifact(root: Path | None = None) -> Path | None:
    """The newest artifact folder (one holding a manifest) under ``root/runs/*/``, or None."""
    base = (root or Path.cwd()) / RUNS_DIR
    if not base.is_dir():
        return None
    found = [m.parent for m in base.glob(f"*/*/{MANIFEST_NAME}")] + [m.parent for m in base.glob(f"*/{MANIFEST_NAME}")]
    # skip hidden folders: atomic_dir's staging (.export.*.tmp) and replaced (.export.old) artifacts
    found = [d for d in found if not any(part.startswith(".") for part in d.relative_to(base).parts)]
    return max(found, key=lambda p: (p / MANIFEST_NAME).stat().st_mtime) if found else None
