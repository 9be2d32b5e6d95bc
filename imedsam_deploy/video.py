"""Video and image I/O through OpenCV (RGB in memory, BGR on disk)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from imedsam_core.errors import UserError
from imedsam_core.pixels import nonfinite_count, to_uint8, window_to_uint8
from imedsam_deploy._cv import cv2, quiet_stderr

VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".mpg", ".mpeg", ".wmv", ".webm", ".ogv", ".flv"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def read_image(path: Path, window: tuple[float, float] | None = None) -> np.ndarray:
    """(H, W, 3) uint8 RGB, or a one-line UserError. Decoded at the file's own depth, then brought to 8 bits by
    the rule training uses (``imedsam_core.pixels``), or by ``window`` (low, high) in the file's own values where
    given: IMREAD_COLOR's own conversion keeps only the top byte of a 16-bit pixel (a 12-bit CT slice in 16 bits
    became 7 grey levels) and refuses float TIFFs."""
    if not path.is_file():
        raise UserError(f"{path}: file does not exist")
    data = np.fromfile(str(path), dtype=np.uint8)
    try:
        with quiet_stderr():  # libpng's own "libpng error: ..." line; ours below names the file
            # ANYDEPTH | ANYCOLOR, not UNCHANGED: EXIF orientation is still applied and an alpha channel dropped
            img = cv2.imdecode(data, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR) if data.size else None
    except cv2.error as e:  # a header past OpenCV's pixel limit raises where a plain corrupt file returns None
        raise UserError(f"{path}: {_decode_problem(e)}") from None
    if img is None:
        raise UserError(f"{path}: not a readable image")
    if bad := nonfinite_count(img):
        raise UserError(f"{path}: {bad} NaN or infinite pixel values")
    img = to_uint8(img) if window is None else window_to_uint8(img, window)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB if img.shape[2] == 4 else cv2.COLOR_BGR2RGB)


def _decode_problem(e: Exception) -> str:
    if "CV_IO_MAX_IMAGE_PIXELS" in str(e) or "CV_IO_MAX_IMAGE_WIDTH" in str(e) or "CV_IO_MAX_IMAGE_HEIGHT" in str(e):
        return "image too large to decode (its header declares more pixels than OpenCV's limit)"
    return "not a readable image"


def write_image(path: Path, rgb_or_gray: np.ndarray) -> None:
    img = rgb_or_gray if rgb_or_gray.ndim == 2 else cv2.cvtColor(rgb_or_gray, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), img):
        raise UserError(f"{path}: cannot write image")


class VideoReader:
    """Frames of a video as RGB arrays. Refuses files OpenCV cannot open, videos without frames, and videos
    that stop well short of the frame count their container declares (truncated or corrupt part-way): the
    shortfall is only known at the end, so the run fails then and its staged outputs are discarded."""

    def __init__(self, path: Path) -> None:
        if not path.is_file():
            raise UserError(f"{path}: file does not exist")
        self.path = path
        try:
            self.cap = cv2.VideoCapture(str(path))
            opened = self.cap.isOpened()
        except cv2.error:
            opened = False
        if not opened:
            raise UserError(f"{path}: not a video OpenCV can read")
        ok, frame = self._read()
        if not ok or frame is None:
            self.cap.release()
            raise UserError(f"{path}: video has no frames")
        self._first: np.ndarray | None = frame
        self.height, self.width = frame.shape[:2]
        fps = self.cap.get(cv2.CAP_PROP_FPS)
        self.fps = float(fps) if fps and fps > 0 else 25.0
        self.frame_count = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)  # container estimate

    def first_frame(self) -> np.ndarray | None:
        """Frame 0 as RGB before iteration starts (kept for it), else None."""
        return None if self._first is None else cv2.cvtColor(self._first, cv2.COLOR_BGR2RGB)

    def _read(self) -> tuple[bool, np.ndarray | None]:
        try:
            return self.cap.read()
        except cv2.error:  # a decoder assertion on a corrupt frame: the stream ends there
            return False, None

    def __iter__(self) -> Iterator[np.ndarray]:
        read = 0
        if self._first is not None:
            first, self._first = self._first, None
            read += 1
            yield cv2.cvtColor(first, cv2.COLOR_BGR2RGB)
        while True:
            ok, frame = self._read()
            if not ok or frame is None:
                break
            read += 1
            yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        # the container's count can be an estimate (duration x fps): a couple of frames' slack
        if self.frame_count and self.frame_count - read > max(2, self.frame_count // 50):
            raise UserError(f"{self.path}: video stops after {read} of the {self.frame_count} frames its container "
                            "declares (truncated or corrupt)")

    def close(self) -> None:
        self.cap.release()


class VideoWriter:
    """An RGB frame sink with the input's size and frame rate (mp4v in .mp4, MJPG in .avi)."""

    def __init__(self, path: Path, fps: float, width: int, height: int) -> None:
        fourcc = cv2.VideoWriter.fourcc(*("MJPG" if path.suffix.lower() == ".avi" else "mp4v"))
        self.path = path
        self.size = (width, height)
        self.writer = cv2.VideoWriter(str(path), fourcc, fps, (width, height))
        if not self.writer.isOpened():
            raise UserError(f"{path}: OpenCV cannot write this video format")
        self.frames = 0

    def write(self, rgb: np.ndarray) -> None:
        assert rgb.shape[1::-1] == self.size, (rgb.shape, self.size)
        self.writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> None:
        self.writer.release()
