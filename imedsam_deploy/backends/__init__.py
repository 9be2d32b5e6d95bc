"""Backend registry: names, availability probes and the ``auto`` choice (fastest first).

Modules are imported lazily, by name (importlib), so a missing optional dependency (tensorrt, cuda-python,
onnxruntime-gpu, torch) only matters for the backend that needs it. The PyTorch GPU runtime (``imedsam_cuda``:
the torch-cuda backend, the bench's torch models, the tuner) is found the same way, through ``TORCH_PARTS``:
this package's code never imports it, so the base runtime stays torch-free. Both tables name code as
"module" or "module:attribute", imported by ``_load``.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from imedsam_core.errors import UserError
from imedsam_deploy.backends.base import Backend
from imedsam_deploy.manifest import Artifact

# name -> (its module, that module's ``provider`` argument); ``auto`` tries them in this order (fastest first).
_REGISTRY: dict[str, tuple[str, str]] = {
    "tensorrt": ("imedsam_deploy.backends.tensorrt", ""),
    "ort-trt": ("imedsam_deploy.backends.ort", "trt"),
    "ort-cuda": ("imedsam_deploy.backends.ort", "cuda"),
    "torch-cuda": ("imedsam_cuda.torch_cuda", ""),
    "ort-cpu": ("imedsam_deploy.backends.ort", "cpu"),
}
NAMES = tuple(_REGISTRY)
CHOICES = ("auto", *NAMES)

# What the runtime uses of the PyTorch GPU runtime besides its backend, by name: "module" or "module:attribute",
# imported only when asked for (``torch_part``).
TORCH_PARTS: dict[str, str] = {
    "open_model": "imedsam_cuda.torch_cuda:open_model",
    "random_artifact": "imedsam_cuda.torch_models:random_artifact",
    "in_process_artifact": "imedsam_cuda.torch_models:in_process_artifact",
    "reference_runner": "imedsam_cuda.torch_models:reference_runner",
    "torch_model_for": "imedsam_cuda.torch_models:torch_model_for",
    "tuning": "imedsam_cuda.torch_tuning",
}


def _load(spec: str, missing_ok: bool = False) -> Any:
    """What ``spec`` ("module" or "module:attribute") names, imported now. With ``missing_ok``, None where that
    module (or its package) itself is not part of this install; a dependency it lacks still raises."""
    module, _, attribute = spec.partition(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if missing_ok and e.name is not None and (module == e.name or module.startswith(e.name + ".")):
            return None
        raise
    return getattr(mod, attribute) if attribute else mod


def torch_part(name: str) -> Any:
    """The module or attribute that ``TORCH_PARTS[name]`` names, imported now (torch with it)."""
    return _load(TORCH_PARTS[name])


def _module(name: str) -> ModuleType | None:
    mod: ModuleType | None = _load(_REGISTRY[name][0], missing_ok=True)
    return mod


def probe(name: str, artifact: Artifact) -> str | None:
    """None if backend ``name`` can run ``artifact`` here, else a one-line reason."""
    if name not in _REGISTRY:
        return f"unknown backend {name!r} (choose from {', '.join(CHOICES)})"
    mod = _module(name)
    if mod is None:
        return f"backend {name} is not part of this install"
    provider = _REGISTRY[name][1]
    try:
        reason: str | None = mod.probe(artifact, provider) if provider else mod.probe(artifact)
    except ImportError as e:  # an optional dependency that is present but broken, or blocked
        return f"cannot import {e.name or 'a dependency'}"
    return reason


def open_backend(name: str, artifact: Artifact, precision: str | None = None) -> tuple[Backend, str]:
    """Open backend ``name`` (or the fastest usable one for ``auto``). Returns it and a line saying why."""
    if name == "auto":
        skipped: dict[str, str] = {}
        for cand in NAMES:
            reason = probe(cand, artifact)
            if reason is None:
                chosen, _ = open_backend(cand, artifact, precision)
                note = f" (unavailable here: {', '.join(skipped)})" if skipped else ""
                return chosen, f"backend auto -> {chosen.description}{note}"
            skipped[cand] = reason
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise UserError(f"{artifact.path}: no backend can run this artifact here ({why})")
    reason = probe(name, artifact)
    if reason is not None:
        raise UserError(f"backend {name}: {reason}")
    mod = _module(name)
    assert mod is not None
    provider = _REGISTRY[name][1]
    backend: Backend = (
        mod.create(artifact, provider, precision=precision) if provider else mod.create(artifact, precision=precision)
    )
    return backend, f"backend {backend.description}"


__all__ = ["Backend", "CHOICES", "NAMES", "TORCH_PARTS", "open_backend", "probe", "torch_part"]
