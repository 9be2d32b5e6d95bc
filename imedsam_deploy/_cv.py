"""OpenCV, imported quietly: every imedsam_deploy module takes ``cv2`` from here.

OpenCV, libtiff and FFmpeg print their own messages ("[ERROR:0@...] TIFF...", "moov atom not found") on a
corrupt file; the commands already say what went wrong in one line, so those are silenced. The log levels
are read from the environment when cv2 loads, so they are set before the import (a user's own setting wins).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

os.environ.setdefault("OPENCV_LOG_LEVEL", "SILENT")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # AV_LOG_QUIET

import cv2  # noqa: E402  (after the environment above)

if os.environ["OPENCV_LOG_LEVEL"] == "SILENT":  # cv2 may have been imported elsewhere first
    # OpenCV 5 has cv2.utils.logging; OpenCV 4 (the serve extra's) the older cv2.setLogLevel
    _logging = getattr(cv2.utils, "logging", None)
    if _logging is not None:
        _logging.setLogLevel(_logging.LOG_LEVEL_SILENT)
    else:
        cv2.setLogLevel(0)  # type: ignore[attr-defined]  # 0: silent


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: libpng writes "libpng error: ..." with fprintf, past any log level."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no usable fd 2 (embedded interpreters): nothing to silence
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
        finally:
            os.close(devnull)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


__all__ = ["cv2", "quiet_stderr"]
