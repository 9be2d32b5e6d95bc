"""``--backend-option KEY=VALUE``: what a backend opened by name takes besides its precision.

A backend module declares the keys it takes as ``OPTIONS`` (key -> ``BackendOption``; a module without it takes
none); the commands pass the options given to the backend they open, parsed here to typed values (``parse``), so a
key the backend does not take, a value of the wrong kind or a malformed option is refused in one line naming it,
before anything is opened or written. No torch import: the torch backends declare their keys in
``imedsam_cuda.torch_settings``, found by name like the backends themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imedsam_core.errors import UserError

FLAG = "flag"  # on or off
FILE = "file"  # an existing file
# the commands' help for the option (the keys are each backend's own: ``imedsam_cuda.torch_settings.OPTIONS``)
HELP = ("KEY=VALUE for the backend named by --backend (repeatable): torch-cuda takes compile=1 (torch.compile), "
        "triton=1 (its Triton kernels), tuned=0 (ignore the saved tuning) and checkpoint=PATH (the artifact's "
        "PyTorch weights); the other backends take none.")
_FLAG_WORDS = {"1": True, "on": True, "true": True, "yes": True, "0": False, "off": False, "false": False, "no": False}


@dataclass(frozen=True)
class BackendOption:
    """One key a backend takes: its kind (``FLAG``: 1/0, on/off, true/false or yes/no; ``FILE``: the path of an
    existing file) and a line saying what it does and its default."""

    kind: str
    help: str


def split(texts: Sequence[str] | None) -> dict[str, str]:
    """``--backend-option`` values ("KEY=VALUE", repeatable) -> {key: value}; malformed or repeated keys refused."""
    out: dict[str, str] = {}
    for text in texts or ():
        key, eq, value = text.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise UserError(f"--backend-option {text!r}: expected KEY=VALUE (e.g. tuned=0)")
        if key in out:
            raise UserError(f"--backend-option {key}: given twice")
        out[key] = value
    return out


def parse(backend: str, given: Mapping[str, str], accepted: Mapping[str, BackendOption]) -> dict[str, Any]:
    """``given`` (raw strings) checked against what ``backend`` takes: {key: bool or Path}."""
    out: dict[str, Any] = {}
    for key, value in given.items():
        if not accepted:
            raise UserError(f"--backend-option {key}={value}: backend {backend} takes no options")
        spec = accepted.get(key)
        if spec is None:
            raise UserError(f"--backend-option {key}={value}: backend {backend} takes {', '.join(accepted)}")
        if spec.kind == FLAG:
            if value.lower() not in _FLAG_WORDS:
                raise UserError(f"--backend-option {key}={value}: expected on or off (1 or 0)")
            out[key] = _FLAG_WORDS[value.lower()]
        elif spec.kind == FILE:
            path = Path(value).expanduser()
            if not path.is_file():
                raise UserError(f"--backend-option {key}={value}: no such file")
            out[key] = path
        else:  # a declaration this module does not know: the backend's bug, not the user's
            raise ValueError(f"backend {backend}: option {key} of unknown kind {spec.kind!r}")
    return out

