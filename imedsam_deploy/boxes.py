"""Box prompts: parse ``x0,y0,x1,y1`` strings and ``--boxes`` files, and validate them against an image.

Boxes are in input-pixel coordinates (x0, y0, x1, y1), x right and y down, x1 > x0 and y1 > y0, inside the
image. ``--boxes`` files give boxes per frame / slice / image:
- CSV with a header ``frame,x0,y0,x1,y1`` and optionally ``object`` (default 0);
- JSON ``{"<frame>": [[x0,y0,x1,y1], ...]}`` (list position = object), or a list of
  ``{"frame": ..., "box": [x0,y0,x1,y1], "object": k}`` records.
``frame`` is a 0-based frame / slice / image index, or an image file name (for folders); one that names
nothing in the input is refused (``unmatched``), not skipped.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imedsam_core.errors import UserError

FrameKey = int | str
BoxTable = dict[FrameKey, dict[int, np.ndarray]]


def parse_box(text: str, where: str = "--box") -> np.ndarray:
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4:
        raise UserError(f"{where} {text!r}: expected x0,y0,x1,y1 (four numbers)")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise UserError(f"{where} {text!r}: expected x0,y0,x1,y1 (four numbers)") from None
    return check_box_values(vals, f"{where} {text!r}")


def check_box_values(vals: Any, where: str) -> np.ndarray:
    try:
        box = np.asarray(vals, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise UserError(f"{where}: a box is four numbers x0,y0,x1,y1") from None
    if box.shape != (4,):
        raise UserError(f"{where}: a box is four numbers x0,y0,x1,y1")
    if not all(math.isfinite(v) for v in box):
        raise UserError(f"{where}: box coordinates must be finite numbers")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise UserError(f"{where}: box has zero or negative area (need x1 > x0 and y1 > y0)")
    return box


def validate_box(box: np.ndarray, image_hw: tuple[int, int], where: str) -> None:
    """Refuse a box that is not inside a ``H x W`` image (input pixels, edges inclusive)."""
    h, w = image_hw
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        # Partly outside counts too: the caller's box, not a silently clipped one, is what gets segmented.
        raise UserError(
            f"{where}: box {fmt_box(box)} reaches outside the {w}x{h} image (x in 0..{w}, y in 0..{h})"
        )


def fmt_box(box: np.ndarray) -> str:
    return ",".join(f"{v:g}" for v in box)


def _key(value: Any) -> FrameKey:
    s = str(value).strip()
    try:
        return int(s)
    except ValueError:
        return s


def _json_box(value: Any, where: str) -> np.ndarray:
    """One JSON box: a flat list of four numbers (no deeper nesting, no strings or booleans)."""
    if not isinstance(value, list) or len(value) != 4 or any(
        isinstance(v, bool) or not isinstance(v, (int, float)) for v in value
    ):
        raise UserError(f"{where}: a box is four numbers [x0,y0,x1,y1]")
    try:
        vals = [float(v) for v in value]
    except OverflowError:  # a JSON integer beyond float range
        raise UserError(f"{where}: box coordinates must be finite numbers") from None
    return check_box_values(vals, where)


def _object_index(value: Any, where: str) -> int:
    """A record's 'object': a non-negative integer (also written as "2" or 2.0)."""
    obj: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        obj = value
    elif isinstance(value, float) and value.is_integer():
        obj = int(value)
    elif isinstance(value, str):
        try:
            obj = int(value.strip())
        except ValueError:
            obj = None
    if obj is None or obj < 0:
        raise UserError(f"{where}: 'object' must be a non-negative integer, not {json.dumps(value)[:40]}")
    return obj


def load_boxes_file(path: Path) -> BoxTable:
    if not path.is_file():
        raise UserError(f"{path}: boxes file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise UserError(f"{path}: unreadable boxes file") from None
    table: BoxTable = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON (line {e.lineno})") from None
        if isinstance(data, dict):
            for k, v in data.items():
                where = f"{path} frame {k!r}"
                if not isinstance(v, list):
                    raise UserError(f"{where}: expected a box [x0,y0,x1,y1] or a list of boxes")
                rows = v if v and isinstance(v[0], list) else [v]
                for obj, b in enumerate(rows):
                    table.setdefault(_key(k), {})[obj] = _json_box(b, where)
        elif isinstance(data, list):
            for i, rec in enumerate(data):
                where = f"{path} record {i}"
                if not isinstance(rec, dict) or "frame" not in rec or "box" not in rec:
                    raise UserError(f"{path}: record {i} needs 'frame' and 'box'")
                frame = rec["frame"]
                if isinstance(frame, bool) or not isinstance(frame, (int, str)):
                    raise UserError(f"{where}: 'frame' must be a frame index or an image file name")
                obj = _object_index(rec.get("object", 0), where)
                table.setdefault(_key(frame), {})[obj] = _json_box(rec["box"], where)
        else:
            raise UserError(f"{path}: expected a JSON object or list of records")
    else:
        rows = list(csv.reader(line for line in text.splitlines() if line.strip()))
        if not rows:
            raise UserError(f"{path}: empty boxes file")
        header = [c.strip().lower() for c in rows[0]]
        if "x0" in header:
            cols, body, first = header, rows[1:], 2
        else:
            cols, body, first = ["frame", "x0", "y0", "x1", "y1", "object"][: len(rows[0])], rows, 1
        need = ["frame", "x0", "y0", "x1", "y1"]
        if any(c not in cols for c in need):
            raise UserError(f"{path}: CSV needs columns frame,x0,y0,x1,y1[,object]")
        for ln, row in enumerate(body, start=first):
            if len(row) != len(cols):
                raise UserError(f"{path} line {ln}: {len(row)} fields, expected {len(cols)}")
            rec = dict(zip(cols, row, strict=True))
            where = f"{path} line {ln}"
            try:
                vals = [float(rec[c]) for c in need[1:]]
                obj = int(rec.get("object", 0) or 0)
            except ValueError:
                raise UserError(f"{where}: malformed number") from None
            if obj < 0:
                raise UserError(f"{where}: 'object' must be a non-negative integer")
            table.setdefault(_key(rec["frame"]), {})[obj] = check_box_values(vals, where)
    if not table:
        raise UserError(f"{path}: no boxes in the file")
    return table


def _keys(index: int, name: str | None) -> tuple[FrameKey, ...]:
    """The keys that name one frame / slice / image, in the order ``lookup`` tries them."""
    return (index,) if name is None else (name, Path(name).stem, index)


def unmatched(table: BoxTable, count: int | None, names: Sequence[str] = ()) -> FrameKey | None:
    """The first key of ``table`` that ``lookup`` can never return for frames 0..count-1 (``names``: their
    file names, if any); while ``count`` is unknown, any non-negative index may still come."""
    if count is None:
        return next((k for k in table if not (isinstance(k, int) and k >= 0)), None)
    known = {k for i in range(count) for k in _keys(i, names[i] if names else None)}
    return next((k for k in table if k not in known), None)


def lookup(table: BoxTable, index: int, name: str | None = None) -> dict[int, np.ndarray]:
    """Boxes of one frame: by file name, then stem, then index."""
    return next((table[k] for k in _keys(index, name) if k in table), {})
