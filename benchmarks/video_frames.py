"""Frames of an ``imedsam-infer`` video run as one picture, and its tracking summary.

Reads the run's ``overlay.mp4`` and ``results.json`` (one record per frame and object) and prints the frames
given / tracked / lost, the lost runs, and the mask area over a frame range against frame 0's; writes the chosen
overlay frames side by side, each labelled with its frame number and status.

    imedsam-infer video.mp4 --box 296,262,362,378 --out runs/clip
    python -m benchmarks.video_frames runs/clip --frames 0 112 300 700 --png clip.png --area-until 111
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np


def lost_runs(frames: list[int]) -> list[tuple[int, int]]:
    """Sorted frame numbers -> (first, last) of each run of consecutive frames."""
    runs: list[tuple[int, int]] = []
    for t in frames:
        if runs and t == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], t)
        else:
            runs.append((t, t))
    return runs


def summary(records: list[dict[str, Any]], area_until: int) -> dict[str, Any]:
    """Counts by status, the lost runs, the frames where the tracker's search picked the object up (a note of
    ``found by ...``), and the min/max of the area over the frames 1..area_until that were not lost, as a fraction
    of frame 0's."""
    obj0 = [r for r in records if int(r.get("object", 0)) == 0]
    by = {s: sum(1 for r in obj0 if r["status"] == s) for s in ("given", "tracked", "lost")}
    lost = sorted(int(r["frame"]) for r in obj0 if r["status"] == "lost")
    area = {int(r["frame"]): int(r["area"]) for r in obj0 if r["status"] != "lost"}  # a lost mask is not reported
    window = [area[t] / area[0] for t in range(1, area_until + 1) if t in area and area.get(0)]
    found = [int(r["frame"]) for r in obj0 if str(r.get("note", "")).startswith("found by")]
    return {"frames": len(obj0), **by, "lost_runs": lost_runs(lost), "found_by_search": found,
            "area_ratio": [round(min(window), 2), round(max(window), 2)] if window else None}


def strip(video: Path, records: list[dict[str, Any]], frames: list[int], height: int = 240) -> np.ndarray:
    status = {int(r["frame"]): r["status"] for r in records if int(r.get("object", 0)) == 0}
    cap = cv2.VideoCapture(str(video))
    tiles, t = {}, 0
    while len(tiles) < len(frames):
        ok, img = cap.read()
        if not ok:
            break
        if t in frames:
            w = int(img.shape[1] * height / img.shape[0])
            tile = cv2.resize(img, (w, height), interpolation=cv2.INTER_AREA)
            cv2.putText(tile, f"frame {t}: {status.get(t, '?')}", (6, height - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.6,
                        (255, 255, 255), 2, cv2.LINE_AA)
            tiles[t] = tile
        t += 1
    cap.release()
    missing = [f for f in frames if f not in tiles]
    if missing:
        raise SystemExit(f"{video}: frames {missing} not in the video")
    return np.hstack([tiles[f] for f in frames])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path, help="an imedsam-infer output folder of a video")
    ap.add_argument("--frames", type=int, nargs="*", default=[], help="overlay frames to put side by side")
    ap.add_argument("--png", type=Path, help="where to write them")
    ap.add_argument("--area-until", type=int, default=150, help="the area ratio's window: frames 1..N")
    a = ap.parse_args()
    records = json.loads((a.run / "results.json").read_text())["records"]
    print(json.dumps(summary(records, a.area_until)))
    if a.frames and a.png:
        cv2.imwrite(str(a.png), strip(a.run / "overlay.mp4", records, a.frames))
        print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
