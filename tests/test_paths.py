"""Default-path discovery (imedsam_core/paths.py): hidden staging folders are never taken for artifacts."""

from __future__ import annotations

import os
from pathlib import Path

from imedsam_core.contract import MANIFEST_NAME
from imedsam_core.paths import latest_artifact


def _artifact(folder: Path, mtime: float) -> Path:
    folder.mkdir(parents=True)
    m = folder / MANIFEST_NAME
    m.write_text("{}")
    os.utime(m, (mtime, mtime))
    return folder


def test_latest_artifact_is_the_newest_visible_one(tmp_path):
    old = _artifact(tmp_path / "runs" / "a" / "export", 1_000)
    new = _artifact(tmp_path / "runs" / "b" / "export", 2_000)
    assert latest_artifact(tmp_path) == new
    assert old != new


def test_latest_artifact_skips_staging_and_replaced_folders(tmp_path):
    good = _artifact(tmp_path / "runs" / "r" / "export", 1_000)
    # an interrupted export's staging folder and a replaced one, both newer than the finished artifact
    _artifact(tmp_path / "runs" / "r" / ".export.abc123.tmp", 5_000)
    _artifact(tmp_path / "runs" / "r" / ".export.old", 6_000)
    _artifact(tmp_path / "runs" / ".hidden" / "export", 7_000)
    assert latest_artifact(tmp_path) == good


def test_latest_artifact_none_when_only_staging(tmp_path):
    _artifact(tmp_path / "runs" / "r" / ".export.abc123.tmp", 5_000)
    assert latest_artifact(tmp_path) is None
    assert latest_artifact(tmp_path / "nowhere") is None
