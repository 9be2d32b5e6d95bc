"""Where runs, checkpoints and artifacts live by default (torch-free; shared by every command).

    runs/<name>/checkpoints/{last,best}.pt   training (imedsam-train)
    runs/<name>/finished.json                written (atomically) once training completed all its epochs
    runs/<name>/log.csv, curve.png, ...      training logs
    runs/<name>/export/                      artifact (imedsam-export default --out): manifest.json, *.onnx
    $IMEDSAM_CACHE (~/.cache/imedsam)/       bench/ random-weight artifacts, tuning/ torch-cuda's tunings

Commands that take an optional CHECKPOINT or ARTIFACT default to the newest FINISHED run in the current
folder (for an artifact: the newest export of a finished run's checkpoint, or of the shipped lite checkpoint,
else of zero-shot LiteMedSAM), then to the model shipped with the package (for an artifact: the bundled tiny
model's, which needs no torch); an interrupted or still running run is never taken by default. For a volume,
grey images or a grey video, zero-shot LiteMedSAM's export comes before the shipped polyp model's. Each command says which file it uses and
why (``Choice.line``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imedsam_core.contract import MANIFEST_NAME
from imedsam_core.errors import UserError

RUNS_DIR = Path("runs")
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
EXPORT_DIR = "export"
FINISHED_NAME = "finished.json"  # in the run folder; its checkpoints' sha256s tie exports to a finished run
# the bundled artifact: the tiny model's fp32 export (package data; runs without torch). The shipped default
# model is lite, whose artifact (about 40 MB) is not stored in the repository: ``imedsam-export`` makes it
# (package data of imedsam_deploy, which the same distribution installs beside this package: found by path,
# not imported, since imedsam_core imports no other imedsam package)
SHIPPED_ARTIFACT = Path(__file__).resolve().parents[1] / "imedsam_deploy" / "shipped"
# sha256 of the shipped lite checkpoint (imedsam_train/weights; tests/test_defaults.py checks it): an export of
# it under runs/ is "the shipped model's" and is taken before the bundled artifact
SHIPPED_CHECKPOINT_SHA256 = "4e39305c9846e051347dae0a99e990257b24724555bcdbbb173476785e1e67f4"
# sha256 of LiteMedSAM's lite_medsam.pth (the lite model's base): ``imedsam-export --zero-shot`` exports it with
# nothing fine-tuned (manifest source ``zero_shot``); its export is taken for volumes and grey input before the
# shipped model, which is fine-tuned on colonoscopy polyps and loses to LiteMedSAM on CT organs (RESULTS.md)
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
ZERO_SHOT_RUN = "zero-shot"  # `imedsam-export --zero-shot` writes ./runs/zero-shot/export by default
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


@dataclass(frozen=True)
class Choice:
    """A default file and why it was taken, said in one line by every command."""

    path: Path
    why: str

    def line(self) -> str:
        return f"using {_show(self.path)} ({self.why})"


def _show(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_finished(run: Path) -> dict[str, Any] | None:
    """The run's finished marker (training completed all its epochs), or None if it has none."""
    try:
        info = json.loads((run / FINISHED_NAME).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("finished") is True else None


def _runs(root: Path | None) -> list[tuple[float, Path]]:
    """(newest checkpoint mtime, run folder) of every run with a checkpoint, newest first."""
    base = (root or Path.cwd()) / RUNS_DIR
    if not base.is_dir():
        return []
    out = []
    for d in base.iterdir():
        cks = [p for p in (d / CHECKPOINT_DIR).glob("*.pt") if p.is_file()]
        if cks:
            out.append((max(p.stat().st_mtime for p in cks), d))
    return sorted(out, key=lambda t: t[0], reverse=True)


def _unfinished_note(root: Path | None) -> str:
    names = [f"{RUNS_DIR}/{d.name}" for _, d in _runs(root) if run_finished(d) is None]
    return f"; not finished, so skipped: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" if names else ""


def finished_checkpoint(root: Path | None = None) -> Choice | None:
    """best.pt (else last.pt) of the newest finished run under ``root/runs``, or None."""
    for _, run in _runs(root):
        if run_finished(run) is None:
            continue
        for name in (BEST_CHECKPOINT, LAST_CHECKPOINT):
            p = run / CHECKPOINT_DIR / name
            if p.is_file():
                return Choice(p, "newest finished run")
    return None


def no_finished_run_reason(root: Path | None = None) -> str:
    return f"no finished run under {RUNS_DIR}/" + _unfinished_note(root)


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        m = json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return {}
    return m if isinstance(m, dict) else {}


def shipped_artifact() -> Path | None:
    """The shipped model's exported artifact (package data), or None if this install lacks it."""
    return SHIPPED_ARTIFACT if (SHIPPED_ARTIFACT / MANIFEST_NAME).is_file() else None


def _source_kind(folder: Path, finished: set[str]) -> str | None:
    """What the artifact was exported from: "run" (a finished run's checkpoint, matched by its sha256 recorded at
    the end of training), "shipped" (the shipped lite checkpoint), "zero-shot" (LiteMedSAM's own weights), or None
    (anything else: an unfinished run's checkpoint, a file from elsewhere)."""
    src = _manifest(folder).get("source")
    if not isinstance(src, dict):
        return None
    sha = src.get("sha256")
    if isinstance(sha, str) and sha in finished:
        return "run"
    if sha == SHIPPED_CHECKPOINT_SHA256:
        return "shipped"
    if src.get("zero_shot") == "LiteMedSAM" and src.get("base_sha256") == LITEMEDSAM_SHA256:
        return "zero-shot"
    return None


# the shipped model loses to LiteMedSAM on CT organs: what the "using ..." line of a volume or grey input suggests
_ZERO_SHOT_HINT = ("for CT or MR `imedsam-export --zero-shot` (the [train] extra) exports zero-shot LiteMedSAM, "
                   "taken for volumes and grey images from then on")


_WHY = {"run": "newest export of a finished run", "shipped": "newest export of the shipped model",
        "zero-shot": "newest export of zero-shot LiteMedSAM"}


def finished_artifact(root: Path | None = None, radiology: str | None = None) -> Choice | None:
    """The newest artifact under ``root/runs`` exported from a finished run's checkpoint or from the shipped
    checkpoint, else one of zero-shot LiteMedSAM (``imedsam-export --zero-shot``), else None.

    For ``radiology`` input (a volume, grey images or a grey video: CT, MR, ultrasound; named for the "using" line)
    the shipped model, fine-tuned on colour colonoscopy, comes last: a finished run's export, else zero-shot
    LiteMedSAM's, else the shipped model's, with a line saying how to get the former."""
    radiological = radiology is not None
    base = (root or Path.cwd()) / RUNS_DIR
    if not base.is_dir():
        return None
    finished: set[str] = set()
    for _, run in _runs(root):
        info = run_finished(run)
        if info is not None and isinstance(info.get("sha256"), dict):
            finished.update(v for v in info["sha256"].values() if isinstance(v, str))
    found = [m.parent for m in base.glob(f"*/*/{MANIFEST_NAME}")] + [m.parent for m in base.glob(f"*/{MANIFEST_NAME}")]
    found = [d for d in found if not any(part.startswith(".") for part in d.relative_to(base).parts)]
    newest = sorted(found, key=lambda p: (p / MANIFEST_NAME).stat().st_mtime, reverse=True)
    kinds = [(d, _source_kind(d, finished)) for d in newest]
    order = [{"run"}, {"zero-shot"}, {"shipped"}] if radiological else [{"run", "shipped"}, {"zero-shot"}]
    for group in order:
        for d, kind in kinds:
            if kind in group:
                why = _WHY[kind]
                if radiological and kind == "zero-shot":
                    why += f", taken for {radiology} before the shipped polyp model"
                elif radiological and kind == "shipped":
                    why += ", fine-tuned on colonoscopy polyps: " + _ZERO_SHOT_HINT
                return Choice(d, why)
    return None


def artifact_choice(given: Path | None, how_to_pass: str, radiology: str | None = None) -> Choice:
    """``given`` where there is one, else ``default_artifact``; neither is a one-line error ending in
    ``how_to_pass`` (the command's way to name an artifact)."""
    if given is not None:
        return Choice(given, "given")
    choice = default_artifact(radiology=radiology)
    if choice is None:
        raise UserError("no artifact of a finished run under runs/ and no shipped artifact in this install: "
                        f"{how_to_pass} (see imedsam-export)")
    return choice


def default_artifact(root: Path | None = None, radiology: str | None = None) -> Choice | None:
    """``finished_artifact``, else the bundled tiny artifact (None only if this install lacks it)."""
    found = finished_artifact(root, radiology)
    if found is not None:
        return found
    shipped = shipped_artifact()
    if shipped is None:
        return None
    why = f"no export of a finished run or of the shipped lite model under {RUNS_DIR}/"
    ck = finished_checkpoint(root)
    if ck is not None:
        why += f"; {_show(ck.path)} is finished but not exported: imedsam-export"
    elif radiology is not None:
        why += "; " + _ZERO_SHOT_HINT
    else:
        why += "; `imedsam-export` (the [train] extra) exports the shipped lite model, taken from then on"
    return Choice(shipped, "the bundled tiny model's artifact, lower quality: " + why + _unfinished_note(root))
