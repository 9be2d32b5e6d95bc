"""Shared pieces of the reliability suite: one tiny exported model per session, corrupt-file
makers, and the assertion every bad input must pass (one-line error, non-zero exit, nothing left behind)."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import SAMPLE_DATA, SHARED_DATA, built_once, child_env

S = 64  # tiny model input size
VIDEO = SHARED_DATA / "colonoscopy-video" / "video_coloscopy.mp4"
SAMPLE_IMAGES = sorted((SAMPLE_DATA / "images").iterdir())
IMAGE = SAMPLE_IMAGES[0]  # 320 x 254 JPEG
GOOD_BOX = "60,50,200,180"

def tiny_model(seed: int = 0) -> Any:
    import torch

    from imedsam_train.build import build

    torch.manual_seed(seed)
    model, _ = build("tiny", input_size=S)
    return model.eval()


def tiny_checkpoint(tmp_path_factory: Any) -> Path:
    """An imedsam checkpoint of the seeded random tiny model, saved once per session for every worker."""
    from imedsam_train.checkpoint import model_payload, save_checkpoint

    return built_once(tmp_path_factory, "reliability-ckpt.pt",
                      lambda path: save_checkpoint(path, model_payload(tiny_model(), None)))


def tiny_artifact(tmp_path_factory: Any) -> Path:
    """The seeded random tiny model exported once per session, shared by the workers (ONNX fp32, no parity run)."""
    from imedsam_export.api import export_artifact

    return built_once(tmp_path_factory, "reliability-art",
                      lambda out: export_artifact(None, out, model=tiny_model(), max_points=4096, batch=2, verify=False))


# --- the contract every refusal must meet ---

def assert_one_line_error(res: Any, *needles: str) -> str:
    """A CliRunner result that refused: exit 2, no exception escaped, the output ends with exactly one
    ``error:`` line that contains every needle (typically the input's name and the problem)."""
    exc = res.exception
    assert exc is None or isinstance(exc, SystemExit), f"escaped {type(exc).__name__}: {exc}\n{res.output}"
    assert res.exit_code == 2, f"exit {res.exit_code}\n{res.output}"
    assert "Traceback" not in res.output, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.output
    for n in needles:
        assert n.lower() in errors[0].lower(), f"{n!r} not in {errors[0]!r}"
    return errors[0]


def assert_nothing_left(folder: Path, also: list[Path] | None = None) -> None:
    """``folder`` is absent or empty, and no staging folder/file (``.<name>.*.tmp``) sits beside it."""
    assert not folder.exists() or not any(folder.iterdir()), sorted(p.name for p in folder.rglob("*"))
    parent = folder.parent
    if parent.is_dir():
        staged = [p.name for p in parent.iterdir() if p.name.startswith(f".{folder.name}.")]
        assert not staged, staged
    for p in also or []:
        assert not p.exists(), p


def console_argv(name: str, args: list[str]) -> list[str]:
    """The command line that runs console script ``name``'s real entry point in a fresh interpreter, with
    Python's Ctrl-C handler as in a terminal. A child inherits an ignored SIGINT, and a shell starts a background
    command with SIGINT ignored (``nohup pytest ... &``): there Python installs no handler, so a Ctrl-C test
    failed on how pytest had been started."""
    # the installed package's own entry point (pyproject.toml's [project.scripts]), not a copy of the table
    eps = list(metadata.entry_points(group="console_scripts", name=name))
    assert len(eps) == 1, f"{name}: {len(eps)} installed console scripts by that name (pip install -e . once)"
    module, func = eps[0].module, eps[0].attr
    code = (f"import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            f"from {module} import {func}; sys.argv[0] = {name!r}; {func}()")
    return [sys.executable, "-c", code, *args]


def console_script(name: str, args: list[str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run an installed console script (its real entry point) in a subprocess."""
    return subprocess.run(console_argv(name, args), cwd=cwd, env=child_env(), capture_output=True, text=True,
                          timeout=timeout)


# --- corrupt files ---

def truncated(data: bytes, fraction: float = 0.4) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


def garbage(n: int, seed: int, magic: bytes = b"") -> bytes:
    return magic + np.random.default_rng(seed).bytes(n)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` pixels but holds no image data (a "huge" image in 45 bytes)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


__all__ = ["GOOD_BOX", "IMAGE", "S", "SAMPLE_DATA", "SAMPLE_IMAGES", "VIDEO", "assert_nothing_left",
           "assert_one_line_error", "console_script", "garbage", "png_header_only", "tiny_artifact",
           "tiny_checkpoint", "tiny_model", "truncated"]
