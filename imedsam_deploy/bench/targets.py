"""What the bench times: the artifact (given, the newest export, or a random-weight model's) and the backends
opened on it."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from imedsam_core.errors import UserError
from imedsam_core.paths import Choice
from imedsam_deploy import backends as registry
from imedsam_deploy.backends import options as backend_options
from imedsam_deploy.backends.base import Backend
from imedsam_deploy.manifest import Artifact

# what the reference (``--reference``) takes of the ``--backend-option``s: the checkpoint, as torch-cuda does
REFERENCE_OPTIONS = {"checkpoint": backend_options.BackendOption(
    backend_options.FILE, "the PyTorch checkpoint the artifact was exported from (for a lite artifact, whose "
    "reference is LiteMedSAM: LiteMedSAM's own file, checked by sha256)")}


def random_artifact(name: str, input_size: int, log: Callable[[str], None]) -> tuple[Path, Any]:
    """See ``imedsam_cuda.torch_models.random_artifact`` (torch is imported only there, only when asked)."""
    return registry.torch_part("random_artifact")(name, input_size, log)


def latest_artifact_of(name: str | None) -> Choice | None:
    """The default artifact (``paths.default_artifact``: a finished run's export, else the shipped model's); with
    an architecture ``name`` (``--model``), a finished run's export of it only: the shipped model is not what
    ``--model`` asks to time."""
    from imedsam_core.paths import default_artifact, finished_artifact

    art = default_artifact() if name is None else finished_artifact()
    if art is None or name is None:
        return art
    try:
        m = json.loads((art.path / "manifest.json").read_text())
        return art if m.get("model", {}).get("name") == name else None
    except (OSError, ValueError):
        return None



def share_options(names: list[str] | None, given: Mapping[str, str], reference: bool) -> dict[str, dict[str, str]]:
    """Each backend's share of the ``--backend-option``s (``options.split``), by name ("reference" for the
    reference's): a key goes to every backend timed (``names``, default every registry backend) that takes it, and
    the checkpoint to the reference too with ``reference``. A key none of them takes, or a value one of them
    refuses, is refused in one line."""
    wanted = names or list(registry.NAMES)
    shares: dict[str, dict[str, str]] = {}
    takes: dict[str, list[str]] = {}
    for name in wanted:
        if name != "torch-cpu" and name not in registry.NAMES:
            continue  # refused by open_backends
        accepted = registry.accepted_options(name) or {}
        takes[name] = list(accepted)
        mine = {k: v for k, v in given.items() if k in accepted}
        if mine:
            registry.parse_options(name, mine)  # its values checked now, before anything is opened
            shares[name] = mine
    if reference and "checkpoint" in given:
        backend_options.parse("reference", {"checkpoint": given["checkpoint"]}, REFERENCE_OPTIONS)
        shares["reference"] = {"checkpoint": given["checkpoint"]}
    for key, value in given.items():
        if not any(key in share for share in shares.values()):
            who = "; ".join(f"{n} takes {', '.join(keys) or 'none'}" for n, keys in takes.items())
            raise UserError(f"--backend-option {key}={value}: no backend timed takes it ({who})")
    return shares


def open_backends(artifact: Artifact, names: list[str] | None, precision: str | None, model: Any | None,
                  threads: int | None, log: Callable[[str], None],
                  options: Mapping[str, Mapping[str, str]] | None = None) -> tuple[list[Backend], dict[str, str]]:
    """Open the requested backends (default: every registry backend usable here), each with its share of the
    ``--backend-option``s (``options``, by name: ``share_options``). Returns (opened, skipped)."""
    opened: list[Backend] = []
    skipped: dict[str, str] = {}
    wanted = names or list(registry.NAMES)
    for name in wanted:
        mine = dict((options or {}).get(name, {}))
        if name in ("torch-cuda", "torch-cpu") and model is not None:
            try:
                open_model = registry.torch_part("open_model")
                dev = "cuda" if name == "torch-cuda" else "cpu"
                prec = "fp32" if dev == "cpu" else (precision or "bf16")
                values = registry.parse_options(name, mine)
                opened.append(open_model(model, dev, prec, artifact, values))  # as imedsam-infer opens it
            except UserError as e:
                skipped[name] = str(e)
            continue
        if name == "torch-cpu":
            skipped[name] = "needs an in-process model (--model)"
            continue
        if name not in registry.NAMES:
            raise UserError(f"unknown backend {name!r} (choose from {', '.join((*registry.NAMES, 'torch-cpu'))})")
        reason = registry.probe(name, artifact, mine)
        if reason is not None:
            skipped[name] = reason
            continue
        # with no --precision, what a backend runs only when asked for (the CPU int8 encoders) is timed beside
        # its default
        precs = [precision] if precision else [None, *registry.opt_in_precisions(name, artifact)]
        try:
            opened.extend(registry.open_backend(name, artifact, p, mine, threads=threads)[0] for p in precs)
        except UserError as e:
            skipped[name] = str(e)
    for n, why in skipped.items():
        log(f"skipped {n}: {why}")
    if not opened:
        raise UserError(f"{artifact.path}: no backend could run here ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})")
    return opened, skipped
