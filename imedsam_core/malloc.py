"""glibc's malloc set up for eager PyTorch on a CPU: freed memory is kept for the next allocation.

With glibc's defaults a large tensor (above a threshold that grows to at most 32 MiB) is its own ``mmap``, handed
back to the kernel when freed, and the top of the heap is handed back too once enough of it is free. Eager
PyTorch frees and re-allocates its activations every layer, so each pass faults the same pages in again, zeroed
by the kernel: on the 2-core CPU VM a third of the lite encoder's time (2.6 s a pass on one thread, 0.7 s of it
in the kernel; 1.8 s with the settings below; benchmarks/RESULTS.md, "Eager PyTorch and glibc's malloc"). This is
what PyTorch's CPU tuning guide gets from jemalloc or tcmalloc, with the C library the process already has. Both
thresholds are needed: glibc's heap grows a few times before a freed block fits the next aligned request, so a
smaller trim threshold hands most of it back again.

The torch-side commands call ``keep_freed_memory`` first thing (``imedsam-train``, ``imedsam-eval``,
``imedsam-export``, and the runtime where it loads torch: ``imedsam-bench``'s reference and torch backends).
ONNX Runtime and OpenVINO keep arenas of their own and gain nothing, so the runtime leaves malloc alone otherwise.
The cost is memory held for reuse: the process keeps up to ``TRIM_THRESHOLD`` of freed heap instead of returning
it (peak memory 10-31 % higher: a lite training step, LiteMedSAM's pipeline, ``imedsam-eval``; RESULTS.md).
"""

from __future__ import annotations

import ctypes
import os
import sys

from imedsam_core.errors import UserError

ENV = "IMEDSAM_MALLOC"  # "tuned" (default) or "glibc": glibc's own defaults
MODES = ("tuned", "glibc")
# allocations up to this size come from the heap, not a fresh mmap each (the lite model's and LiteMedSAM's
# activations all are; a larger one, such as a SAM ViT's global attention at 1024², still gets its own mmap)
MMAP_THRESHOLD = 256 << 20
TRIM_THRESHOLD = 512 << 20  # free memory at the heap's top that stays with the process
# glibc's own ways to set these; a user who set one keeps exactly what they set
GLIBC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)

state: str | None = None  # what the last call did: "tuned", or why malloc was left as it was


def keep_freed_memory() -> str:
    """Raise glibc's mmap and trim thresholds for this process (and the workers it forks) unless $IMEDSAM_MALLOC
    is "glibc", the user set glibc's own malloc settings, or the C library is not glibc. Returns (and records in
    ``state``) what it did. Idempotent."""
    global state
    mode = os.environ.get(ENV, "tuned")
    if mode not in MODES:
        raise UserError(f"${ENV}={mode!r}: must be one of {', '.join(MODES)}")
    state = _apply() if mode == "tuned" else f"left as glibc's defaults (${ENV}=glibc)"
    return state


def _apply() -> str:
    if given := [k for k in GLIBC_SETTINGS if k in os.environ]:
        return f"left as set ({given[0]})"
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return "left as set (GLIBC_TUNABLES)"
    if not is_glibc():
        return "left: the C library is not glibc"
    libc = ctypes.CDLL(None)  # the process's own C library
    # the trim threshold first: setting either stops glibc moving them itself, so the pair is set together
    if libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1 or libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return "left: mallopt refused the thresholds"
    return "tuned"


def is_glibc() -> bool:
    """Whether this process's C library is glibc (Linux; not musl, not macOS)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):
        return False
