"""Atomic file and folder writes: a temp path in the same folder, then ``os.replace``.

An interrupted run never leaves a file or folder under the final name that looks complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from imedsam_core.errors import UserError


def check_writable_parent(path: str | os.PathLike[str]) -> None:
    """Refuse (UserError naming ``path``) an output whose folder cannot be created or written.

    Commands call this before expensive work, so e.g. ``--out a_file/x`` fails at once, not after an export.
    """
    final = Path(path)
    anc = final.parent
    while not anc.exists() and anc != anc.parent:  # exists() is False below a regular file, too
        anc = anc.parent
    if not anc.is_dir():
        raise UserError(f"{final}: cannot be created, {anc} is not a folder")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise UserError(f"{final}: cannot be created, folder {anc} is not writable")


def _make_parent(final: Path) -> None:
    check_writable_parent(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{final}: cannot create its folder ({e.strerror or type(e).__name__})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp file path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    final = Path(path)
    _make_parent(final)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 minus the umask)
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` (only if ``overwrite``)."""
    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final}: already exists (use --force to overwrite)")
    _make_parent(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
