"""Backend registry: names, availability probes and the ``auto`` choice (fastest first).

Modules are imported lazily, by name (importlib), so a missing optional dependency (tensorrt, cuda-python,
onnxruntime-gpu, torch) only matters for the backend that needs it. The PyTorch GPU runtime (``imedsam_cuda``:
the torch-cuda backend, the bench's torch models, the tuner) is found the same way, through ``TORCH_PARTS``:
this package's code never imports it, so the base runtime stays torch-free. Both tables name code as
"module" or "module:attribute", imported by ``_load``. What a backend takes besides its precision
(``--backend-option KEY=VALUE``) it declares itself (``options``): ``parse_options`` checks what a command was
given against that, and ``open_backend`` passes the typed values on. A module whose backends run CPU work on a
thread pool of their own (ONNX Runtime, OpenVINO) says so with ``TAKES_THREADS = True``; ``open_backend``'s
``threads`` reaches only those. A module whose backends also run stored graphs only when asked for (the CPU int8
encoders) names them for an artifact with ``opt_in_precisions``: ``imedsam-bench`` times those beside the default.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from imedsam_core.errors import UserError
from imedsam_deploy.backends import options as _options
from imedsam_deploy.backends.base import Backend
from imedsam_deploy.manifest import Artifact

# name -> (its module, that module's ``provider`` argument); ``auto`` tries them in this order (fastest first).
_REGISTRY: dict[str, tuple[str, str]] = {
    "tensorrt": ("imedsam_deploy.backends.tensorrt", ""),
    "ort-trt": ("imedsam_deploy.backends.ort", "trt"),
    "ort-cuda": ("imedsam_deploy.backends.ort", "cuda"),
    "torch-cuda": ("imedsam_cuda.torch_cuda", ""),
    "ov-cpu": ("imedsam_deploy.backends.openvino", ""),
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
    "litemedsam_runner": "imedsam_cuda.torch_models:litemedsam_runner",
    "torch_model_for": "imedsam_cuda.torch_models:torch_model_for",
    "tuning": "imedsam_cuda.torch_tuning",
    # what torch-cpu (the bench's in-process CPU torch backend, ``open_model`` on "cpu") takes: ``accepted_options``
    "cpu_options": "imedsam_cuda.torch_settings:CPU_OPTIONS",
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
    """The module or attribute that ``TORCH_PARTS[name]`` names, imported now (torch with it). Eager PyTorch on
    the CPU (the bench's LiteMedSAM reference, torch-cpu) then runs with malloc keeping freed memory, as the
    training side's commands do (``imedsam_core.malloc``; ONNX Runtime and OpenVINO do not need it)."""
    from imedsam_core.malloc import keep_freed_memory

    keep_freed_memory()
    return _load(TORCH_PARTS[name])


def _module(name: str) -> ModuleType | None:
    mod: ModuleType | None = _load(_REGISTRY[name][0], missing_ok=True)
    return mod


def accepted_options(name: str) -> Mapping[str, _options.BackendOption] | None:
    """The ``--backend-option`` keys backend ``name`` takes (its module's ``OPTIONS``, none where it declares
    none; torch-cpu's from ``TORCH_PARTS``); None where it is not part of this install."""
    if name == "torch-cpu":
        cpu: Mapping[str, _options.BackendOption] | None = _load(TORCH_PARTS["cpu_options"], missing_ok=True)
        return cpu
    if name not in _REGISTRY:
        raise UserError(f"unknown backend {name!r} (choose from {', '.join(CHOICES)})")
    mod = _module(name)
    return None if mod is None else getattr(mod, "OPTIONS", {})


def parse_options(name: str, given: Mapping[str, str] | None) -> dict[str, Any]:
    """``given`` (``--backend-option``s, ``options.split``) checked against what backend ``name`` takes: {key:
    typed value}. Refused for ``auto``, which may choose a backend that takes none of them."""
    if not given:
        return {}
    key, value = next(iter(given.items()))
    if name == "auto":
        raise UserError(f"--backend-option {key}={value}: name the backend it is for with --backend (auto may "
                        "choose one that takes none)")
    accepted = accepted_options(name)
    if accepted is None:
        raise UserError(f"--backend-option {key}={value}: backend {name} is not part of this install")
    return _options.parse(name, given, accepted)


def _with(values: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword a backend module's ``probe`` and ``create`` get the options by (only where some were given:
    a module that declares none need not take it)."""
    return {"options": dict(values)} if values else {}


def _create_kwargs(mod: ModuleType, values: Mapping[str, Any], threads: int | None) -> dict[str, Any]:
    """``_with(values)``, plus ``threads`` where given and the module takes it (``TAKES_THREADS``)."""
    kwargs = _with(values)
    if threads and getattr(mod, "TAKES_THREADS", False):
        kwargs["threads"] = threads
    return kwargs


def probe(name: str, artifact: Artifact, options: Mapping[str, str] | None = None) -> str | None:
    """None if backend ``name`` can run ``artifact`` here (opened with ``options``), else a one-line reason."""
    if name not in _REGISTRY:
        return f"unknown backend {name!r} (choose from {', '.join(CHOICES)})"
    return _probe(name, artifact, parse_options(name, options))


def _probe(name: str, artifact: Artifact, values: Mapping[str, Any]) -> str | None:
    mod = _module(name)
    if mod is None:
        return f"backend {name} is not part of this install"
    provider = _REGISTRY[name][1]
    try:
        reason: str | None = (mod.probe(artifact, provider, **_with(values)) if provider
                              else mod.probe(artifact, **_with(values)))
    except ImportError as e:  # an optional dependency that is present but broken, or blocked
        return f"cannot import {e.name or 'a dependency'}"
    return reason


def opt_in_precisions(name: str, artifact: Artifact) -> tuple[str, ...]:
    """The precisions backend ``name`` runs from ``artifact`` only when asked for (its module's
    ``opt_in_precisions``; none where it declares none or is not part of this install)."""
    mod = _module(name)
    fn = getattr(mod, "opt_in_precisions", None)
    if fn is None:
        return ()
    provider = _REGISTRY[name][1]
    return tuple(fn(artifact, provider) if provider else fn(artifact))


def open_backend(name: str, artifact: Artifact, precision: str | None = None,
                 options: Mapping[str, str] | None = None, threads: int | None = None) -> tuple[Backend, str]:
    """Open backend ``name`` (or the fastest usable one for ``auto``) with ``options`` (``--backend-option``s,
    split; none for ``auto``) and ``threads`` CPU threads (default: the runtime's own; only backends with a CPU
    thread pool of their own take it). Returns it and a line saying why."""
    values = parse_options(name, options)
    if name == "auto":
        skipped: dict[str, str] = {}
        for cand in NAMES:
            reason = probe(cand, artifact)
            if reason is None:
                chosen, _ = open_backend(cand, artifact, precision, threads=threads)
                note = f" (unavailable here: {', '.join(skipped)})" if skipped else ""
                return chosen, f"backend auto -> {chosen.description}{note}"
            skipped[cand] = reason
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items())
        raise UserError(f"{artifact.path}: no backend can run this artifact here ({why})")
    if name not in _REGISTRY:
        raise UserError(f"backend {name}: unknown backend {name!r} (choose from {', '.join(CHOICES)})")
    reason = _probe(name, artifact, values)
    if reason is not None:
        raise UserError(f"backend {name}: {reason}")
    mod = _module(name)
    assert mod is not None
    provider = _REGISTRY[name][1]
    kwargs = _create_kwargs(mod, values, threads)
    backend: Backend = (
        mod.create(artifact, provider, precision=precision, **kwargs) if provider
        else mod.create(artifact, precision=precision, **kwargs)
    )
    return backend, f"backend {backend.description}"


__all__ = ["Backend", "CHOICES", "NAMES", "TORCH_PARTS", "accepted_options", "open_backend", "parse_options", "probe",
           "torch_part"]
