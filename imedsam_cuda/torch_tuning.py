"""torch-cuda's switchable options timed on this machine, and the fastest kept: an autotuner, as cuDNN's benchmark
mode is for convolutions.

Every on/off option of ``TorchCudaSettings`` below (the knobs) is exact, or within its precision's rounding, and each
has its own test; a setting is tried by building the backend's stages with it (``TorchBackend.configure``). Which setting is faster depends on the card, the driver and torch:
an H200 timed some of them (benchmarks/RESULTS.md), and the Triton kernels' defaults are off until a GPU has timed
them. ``tune`` flips the knobs one at a time from the backend's settings. It times the frame with each setting,
alternating between the two, and keeps a flip only where the frame is faster by more than ``min_gain`` in every
round and its masks agree with the untuned frame's on at least ``min_agreement`` of the pixels: a kernel that computes something else on
this card is never chosen. The default, 99.5%, leaves room for bf16 rounding: a change of it flipped 0.03-0.07% of
a random-weight vit_b's mask pixels on an H200 (session 7's fused MLP), and a wrong kernel flips far more.
``save`` writes the result to the cache, keyed by the device, torch, Triton, the model's shapes and the options
the backend was built with (a new knob makes a new key: an older tuning is then not read); torch-cuda applies
it when it opens (``apply_saved``), unless opened with ``--backend-option tuned=0``. A file stores the knobs' settings by name. ``imedsam-bench --tune`` runs it.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from imedsam_core.atomic import atomic_write_text
from imedsam_core.errors import UserError
from imedsam_core.paths import cache_dir
from imedsam_cuda.torch_settings import TorchCudaSettings

FORMAT = "imedsam-torch-tuning"
VERSION = 1


@dataclass(frozen=True)
class Knob:
    """One on/off field of ``TorchCudaSettings``, and the part of the frame it changes."""

    name: str
    stage: str  # "encoder" | "box part" | "decoder"

    def get(self, be: Any) -> bool:
        return bool(getattr(be.settings, self.name))

    def set(self, be: Any, value: bool) -> None:
        be.configure(replace(be.settings, **{self.name: value}))


# the encoder first, then the box part, then the decoder; within each, the options measured on an H200 before
# the Triton kernels
KNOBS: tuple[Knob, ...] = (
    Knob("fused_attention", "encoder"),
    Knob("overlap_frequency", "encoder"),
    Knob("fused_norms", "encoder"),
    Knob("fused_operands", "encoder"),
    Knob("fused_frequency", "encoder"),
    Knob("gelu_epilogue", "encoder"),
    Knob("fp32_box_part", "box part"),
    Knob("grid_sample", "decoder"),
    Knob("align_matmuls", "decoder"),
    Knob("relu_epilogue", "decoder"),
    Knob("fused_features", "decoder"),
    Knob("fused_uncertainty", "decoder"),
    Knob("fused_planner", "decoder"),
)
KNOB_NAMES = tuple(k.name for k in KNOBS)


@dataclass
class Trial:
    """One knob flipped: the frame's median time with each setting, the masks' agreement, the verdict."""

    knob: str
    value: bool  # the setting tried (the other one is what the backend had)
    ms_before: float | None = None
    ms_after: float | None = None
    agreement: float | None = None  # fraction of mask pixels equal to the untuned frame's
    rounds_ms: list[list[float]] = field(default_factory=list)  # each round's medians: [before, after]
    kept: bool = False
    note: str = ""  # why it was not tried, or not kept


@dataclass
class Tuning:
    key: dict[str, Any]
    settings: dict[str, bool]  # every knob's chosen setting
    tuned_on: dict[str, Any] = field(default_factory=dict)  # the frame it was timed on (query, output size, batch)
    trials: list[Trial] = field(default_factory=list)
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}


def knob_settings(settings: TorchCudaSettings) -> dict[str, bool]:
    """The knobs' settings by name (what a tuning file stores)."""
    return {k.name: bool(getattr(settings, k.name)) for k in KNOBS}


def settings_of(be: Any) -> dict[str, bool]:
    return knob_settings(be.settings)


def machine_key(be: Any) -> dict[str, Any]:
    """What a tuning holds for: the device, the software that makes its kernels, the model's shapes (not its
    weights), the options fixed when the backend was built and the knobs as it was built (a backend
    opened with ``--backend-option triton=1`` starts from other settings than one without: each has its own tuning)."""
    torch = be.torch
    device = torch.cuda.get_device_name(be.device) if be.device.type == "cuda" else "cpu"
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    cfg = getattr(be.model, "cfg", None)
    shapes = hashlib.sha256(repr(cfg).encode()).hexdigest()[:16]
    return {"backend": be.name, "device": device, "torch": torch.__version__, "triton": triton_version,
            "precision": be.precision, "model": shapes, "max_batch": be.max_batch, "max_points": be.max_points,
            "fixed": {"cuda_graphs": be.use_graphs, "compile": be.compiled, "lean_encoder": be.settings.lean_encoder,
                      "lean_box_part": be.settings.lean_box_part},
            "built": knob_settings(be.built_settings)}


def default_root() -> Path:
    return cache_dir() / "tuning"


def tuning_path(be: Any, root: Path) -> Path:
    """The backend's tuning file under ``root`` (the cache's ``tuning`` folder), named by its key's hash."""
    digest = hashlib.sha256(json.dumps(machine_key(be), sort_keys=True).encode()).hexdigest()[:20]
    return root / f"{be.name}-{digest}.json"


def agreement(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """The fraction of mask pixels equal in two frames' masks (every image and class)."""
    same = sum(int((x == y).sum()) for x, y in zip(a, b, strict=True))
    return same / max(1, sum(x.size for x in a))


def tune(
    be: Any, frame: Callable[[], list[np.ndarray]], *, knobs: Sequence[Knob] = KNOBS, repeat: int = 10,
    warmup: int = 2, rounds: int = 2, min_gain: float = 0.02, min_agreement: float = 0.995,
    clock: Callable[[], float] = time.perf_counter, log: Callable[[str], None] | None = None,
) -> Tuning:
    """Flip each knob, time ``frame`` (which returns the masks, on the host: the frame has finished) with both
    settings, ``rounds`` times each, alternating, ``warmup`` untimed frames after each switch (graph capture) and
    ``repeat`` timed; keep the flip where it is faster by more than ``min_gain`` in every round (the medians) and
    its masks agree with the untuned frame's on ``min_agreement`` of the pixels. The backend is left with the
    chosen settings."""
    if getattr(be, "compiled", False):
        raise UserError(f"backend {be.name}: tuning a torch.compile'd backend would recompile it for every trial: "
                        "tune it without --backend-option compile=1")
    if repeat < 1 or warmup < 0 or rounds < 1:
        raise ValueError("tune: repeat and rounds must be >= 1, warmup >= 0")
    say = log or (lambda _m: None)
    for _ in range(max(1, warmup)):
        untuned = frame()

    def timed(value: bool, knob: Knob) -> tuple[list[float], list[np.ndarray]]:
        knob.set(be, value)
        for _ in range(warmup):
            masks = frame()
        times = []
        for _ in range(repeat):
            t0 = clock()
            masks = frame()
            times.append((clock() - t0) * 1e3)
        return times, masks

    trials: list[Trial] = []
    for knob in knobs:
        before = knob.get(be)
        trial = Trial(knob.name, not before)
        try:
            knob.set(be, not before)  # refused here (no Triton, say) before anything is timed
        except UserError as e:
            trial.note = str(e)
            trials.append(trial)
            say(f"tune {knob.name}={not before}: not tried ({e})")
            continue
        samples: dict[bool, list[list[float]]] = {before: [], not before: []}  # a list of times per round
        masks: list[np.ndarray] = []
        try:
            for _ in range(rounds):
                for value in (before, not before):
                    t, m = timed(value, knob)
                    samples[value].append(t)
                    if value != before:
                        masks = m
        except Exception as e:  # a kernel that fails on this card: report it, keep the setting that ran
            knob.set(be, before)
            trial.note = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
            trials.append(trial)
            say(f"tune {knob.name}={not before}: {trial.note}")
            continue
        trial.ms_before = statistics.median([x for r in samples[before] for x in r])
        trial.ms_after = statistics.median([x for r in samples[not before] for x in r])
        trial.agreement = agreement(masks, untuned)
        trial.rounds_ms = [[statistics.median(old), statistics.median(new)]
                           for old, new in zip(samples[before], samples[not before], strict=True)]
        # faster in every round, not only overall: a machine whose speed drifts (a shared CPU) makes one
        # setting look faster in the round that happened to run in a quiet moment
        faster = all(new < old * (1.0 - min_gain) for old, new in trial.rounds_ms)
        trial.kept = faster and trial.agreement >= min_agreement
        if not trial.kept:
            knob.set(be, before)
            trial.note = ("masks differ" if trial.agreement < min_agreement else
                          "not faster" if not faster else "")
        trials.append(trial)
        say(f"tune {knob.name}={not before}: {trial.ms_before:.3f} -> {trial.ms_after:.3f} ms, masks "
            f"{100 * trial.agreement:.3f}% as untuned: {'kept' if trial.kept else trial.note}")
    return Tuning(machine_key(be), settings_of(be), trials=trials,
                  created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def save(tuning: Tuning, path: Path) -> None:
    atomic_write_text(path, json.dumps(tuning.to_json(), indent=1) + "\n")


def load(path: Path) -> Tuning:
    """A tuning file, checked; anything else is refused in one line naming the file."""
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: not a readable tuning file ({type(e).__name__}); delete it or re-run "
                        "imedsam-bench --tune") from None
    ok = (isinstance(d, dict) and d.get("format") == FORMAT and d.get("version") == VERSION
          and isinstance(d.get("key"), dict) and isinstance(d.get("settings"), dict)
          and set(d["settings"]) == set(KNOB_NAMES) and all(isinstance(v, bool) for v in d["settings"].values()))
    if not ok:
        raise UserError(f"{path}: not a tuning file of this version (format {FORMAT} {VERSION}, one setting per "
                        f"knob: {', '.join(KNOB_NAMES)}); delete it or re-run imedsam-bench --tune")
    trials = [Trial(**t) for t in d.get("trials", []) if isinstance(t, dict)]
    return Tuning(d["key"], d["settings"], d.get("tuned_on", {}), trials, d.get("created", ""))


def apply(be: Any, settings: TorchCudaSettings | dict[str, bool]) -> list[str]:
    """Set each knob as ``settings`` (the backend's, or a tuning's by name) has it, in one build; the names of those
    changed."""
    want = knob_settings(settings) if isinstance(settings, TorchCudaSettings) else settings
    changed = [k.name for k in KNOBS if k.get(be) != want[k.name]]
    if changed:
        be.configure(replace(be.settings, **{name: want[name] for name in changed}))
    return changed


def apply_saved(be: Any, root: Path) -> Path | None:
    """Apply the tuning saved for this backend under ``root``, if any (the commands skip this when opened with
    ``--backend-option tuned=0``: ``torch_cuda.open_model``); the file applied, or None. A file for another key is
    never read: the name is the key's hash, and the key inside is checked too."""
    path = tuning_path(be, root)
    if not path.is_file():
        return None
    tuning = load(path)
    if tuning.key != machine_key(be):
        raise UserError(f"{path}: tuned for another machine or backend than its name says; delete it or re-run "
                        "imedsam-bench --tune")
    apply(be, tuning.settings)
    be.tuned_from = path
    return path
