"""What ``imedsam-infer`` writes: mask PNGs (or a NIfTI label volume), overlays and per-frame results.

    masks/<name>.png        one per image / video frame: 0/255 for one object, else object + 1 (0 is the
                            background; objects are numbered from 0 as in results.csv, --boxes and on the
                            console; several classes: mask number 1..n); the first wins on overlap; at --out-size
    overlay/<name>.png      images and volume slices: filled contours over the input
    overlay.mp4 (.avi)      videos: the input's size, frame rate and frame count
    mask.nii.gz             volumes: labels on the input's voxel grid
    results.csv / .json     one row per frame and object: box, status, area, mean probability, latency
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from imedsam_deploy._cv import cv2
from imedsam_deploy.video import VideoWriter, write_image

# RGB, distinct on endoscopy and CT backgrounds
PALETTE = [(0, 255, 128), (255, 64, 64), (64, 160, 255), (255, 220, 0), (220, 80, 255), (0, 230, 230)]
LOST_COLOR = (160, 160, 160)
FIELDS = ["frame", "name", "object", "class", "status", "x0", "y0", "x1", "y1", "area", "mean_probability",
          "queried_points", "latency_ms", "encode_ms", "decode_ms", "note"]


@dataclass
class Record:
    frame: int
    name: str
    object: int
    cls: int
    status: str
    x0: float
    y0: float
    x1: float
    y1: float
    area: int
    mean_probability: float
    queried_points: int
    latency_ms: float
    encode_ms: float
    decode_ms: float
    note: str = ""

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["class"] = d.pop("cls")
        for k in ("mean_probability", "latency_ms", "encode_ms", "decode_ms"):
            d[k] = round(float(d[k]), 4)
        for k in ("x0", "y0", "x1", "y1"):
            d[k] = round(float(d[k]), 2)
        return {k: d[k] for k in FIELDS}


@dataclass
class Layer:
    """One drawn/stored mask: an object (and class) on one frame, at the output size."""

    obj: int
    mask: np.ndarray  # (h, w) bool at the output size
    box: np.ndarray  # image pixels
    status: str
    label: str


def label_image(masks: list[np.ndarray], shape: tuple[int, int], values: list[int] | None = None) -> np.ndarray:
    """uint8: 0/255 for a single mask, else ``values`` (default: mask number 1..n); the first one wins on overlap."""
    lab = np.zeros(shape, np.uint8)
    if len(masks) == 1:
        lab[masks[0]] = 255
        return lab
    for i, m in enumerate(masks):
        lab[m & (lab == 0)] = values[i] if values is not None else i + 1
    return lab


def layer_values(layers: list[Layer]) -> list[int] | None:
    """Object + 1 for one mask per object (results.csv's object numbers, 0 being the background), else None."""
    objs = [ly.obj for ly in layers]
    return [o + 1 for o in objs] if len(set(objs)) == len(objs) and max(objs, default=0) < 255 else None


def draw_overlay(rgb: np.ndarray, layers: list[Layer], alpha: float = 0.4) -> np.ndarray:
    """Filled contours (translucent), their outlines, the prompt boxes and labels over an RGB frame."""
    h, w = rgb.shape[:2]
    fill = rgb.copy()
    outlines = []
    for layer in layers:
        color = LOST_COLOR if layer.status == "lost" else PALETTE[layer.obj % len(PALETTE)]
        m = layer.mask
        if m.shape != (h, w):
            m = cv2.resize(m.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(fill, contours, -1, color, thickness=cv2.FILLED)
        outlines.append((contours, color, layer))
    out = cv2.addWeighted(fill, alpha, rgb, 1 - alpha, 0)
    for contours, color, layer in outlines:
        cv2.drawContours(out, contours, -1, color, thickness=2)
        x0, y0, x1, y1 = (int(round(v)) for v in layer.box)
        cv2.rectangle(out, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), color, 1)
        cv2.putText(out, layer.label, (x0 + 2, max(12, y0 - 4)), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1, cv2.LINE_AA)
    return out


class OutputSet:
    """Writes into ``root`` (a staging folder the CLI renames into place when everything succeeded).

    Per-frame records are streamed as they come, to two scratch files: CSV rows that ``finish`` renames to
    results.csv, and JSON lines it copies into results.json line by line. Memory stays flat however long a
    video runs (only the rare lost/found ``events`` are kept), and neither results file exists before the run
    is complete. ``close`` releases the files of a run that failed.
    """

    RECORDS_SCRATCH = ".records.jsonl"
    CSV_SCRATCH = ".results.csv.part"

    def __init__(self, root: Path, kind: str, fps: float | None = None, size: tuple[int, int] | None = None,
                 video_suffix: str = ".mp4", mask_pngs: bool = True) -> None:
        self.root, self.kind, self.mask_pngs = root, kind, mask_pngs
        self.events: list[dict[str, Any]] = []
        self.count = 0  # records written
        self.video: VideoWriter | None = None
        if mask_pngs:
            (root / "masks").mkdir(parents=True, exist_ok=True)
        if kind == "video":
            assert fps is not None and size is not None
            self.video = VideoWriter(root / f"overlay{video_suffix}", fps, *size)
        else:
            (root / "overlay").mkdir(parents=True, exist_ok=True)
        self._csv_file: IO[str] | None = open(root / self.CSV_SCRATCH, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._csv = csv.DictWriter(self._csv_file, fieldnames=FIELDS)
        self._csv.writeheader()
        self._jsonl: IO[str] | None = open(root / self.RECORDS_SCRATCH, "w", encoding="utf-8")  # noqa: SIM115

    def add_frame(self, name: str, rgb: np.ndarray, out_hw: tuple[int, int], layers: list[Layer],
                  records: list[Record], draw: bool = True) -> None:
        if self.mask_pngs:
            write_image(self.root / "masks" / f"{name}.png",
                        label_image([ly.mask for ly in layers], out_hw, layer_values(layers)))
        assert self._csv_file is not None and self._jsonl is not None, "OutputSet already finished"
        for r in records:
            row = r.row()
            self._csv.writerow(row)
            self._jsonl.write(json.dumps(row) + "\n")
        self.count += len(records)
        if self.video is not None:
            self.video.write(draw_overlay(rgb, layers))
        elif draw:
            write_image(self.root / "overlay" / f"{name}.png", draw_overlay(rgb, layers))

    def records(self) -> Iterator[dict[str, Any]]:
        """The rows written so far (read back from the scratch file: nothing is held in memory)."""
        if self._jsonl is not None:
            self._jsonl.flush()
        path = self.root / self.RECORDS_SCRATCH
        if not path.exists():
            path = self.root / "results.json"
            yield from json.loads(path.read_text(encoding="utf-8"))["records"]
            return
        with open(path, encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)

    def finish(self, summary: dict[str, Any]) -> None:
        """Close the video and results.csv; write results.json: ``summary``, ``events``, then ``records``."""
        if self.video is not None:
            self.video.close()
            self.video = None
        assert self._csv_file is not None and self._jsonl is not None, "OutputSet already finished"
        self._csv_file.close()
        self._jsonl.close()
        self._csv_file = self._jsonl = None
        (self.root / self.CSV_SCRATCH).replace(self.root / "results.csv")
        head = json.dumps({**summary, "events": self.events}, indent=1)
        scratch = self.root / self.RECORDS_SCRATCH
        with open(self.root / "results.json", "w", encoding="utf-8") as out, open(scratch, encoding="utf-8") as src:
            out.write(head[:-2] + ',\n "records": [')  # head ends with "\n}": reopen the object
            for i, line in enumerate(src):
                out.write(("\n  " if i == 0 else ",\n  ") + line.rstrip("\n"))
            out.write("\n ]\n}\n")
        scratch.unlink()

    def close(self) -> None:
        """Release the open files (a failed run: the CLI discards the staging folder)."""
        for f in (self._csv_file, self._jsonl):
            if f is not None:
                f.close()
        self._csv_file = self._jsonl = None
        if self.video is not None:
            self.video.close()
            self.video = None
