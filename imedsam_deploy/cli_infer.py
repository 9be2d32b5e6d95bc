"""``imedsam-infer``: segment images, videos and CT volumes with an exported artifact (torch-free)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import typer

from imedsam_core.cli_common import check_threads, guarded, run_app, say_line
from imedsam_core.contract import PRECISIONS
from imedsam_core.errors import UserError
from imedsam_deploy.backends.options import HELP as BACKEND_OPTION_HELP
from imedsam_deploy.backends.options import split as split_options
from imedsam_deploy.runtime import DEFAULT_QUERY, QUERY_MODES
from imedsam_deploy.tracking import TrackConfig  # its defaults are the video options'

app = typer.Typer(add_completion=False, help="Segment images, videos and CT volumes with an exported artifact.")


def _parse_out_size(text: str | None) -> tuple[int, int] | int | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m or int(m.group(1)) <= 0 or (m.group(2) is not None and int(m.group(2)) <= 0):
        raise UserError(f"--out-size {text!r}: expected N (long side) or WxH, positive integers")
    if int(m.group(1)) > 16384 or (m.group(2) and int(m.group(2)) > 16384):
        raise UserError(f"--out-size {text!r}: at most 16384 pixels a side")
    return (int(m.group(1)), int(m.group(2))) if m.group(2) else int(m.group(1))


def _parse_window(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--window {text!r}: expected LEVEL,WIDTH (e.g. 40,400)") from None
    if not width > 0:
        raise UserError(f"--window {text!r}: width must be positive")
    return level - width / 2, level + width / 2


def _prepare_out(out: Path, force: bool) -> None:
    from imedsam_core.atomic import check_writable_parent

    check_writable_parent(out)  # e.g. --out under a regular file: refused before the artifact loads
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: folder exists and is not empty (use --force to replace it)")


@app.command()
@guarded
def infer(
    input: Path = typer.Argument(..., help="Image, folder of images, video (anything OpenCV reads) or .nii/.nii.gz volume."),
    box: list[str] = typer.Option(None, "--box", help="x0,y0,x1,y1 in input pixels; repeat for several objects."),
    boxes: Path | None = typer.Option(None, "--boxes", help="CSV (frame,x0,y0,x1,y1[,object]) or JSON boxes per frame/slice/image."),
    artifact: Path | None = typer.Option(None, "--artifact", help="Artifact folder (default: the newest export of a finished run or of the shipped lite model under runs/, else of zero-shot LiteMedSAM (imedsam-export --zero-shot), else the bundled tiny model's; for a volume, grey images or a grey video (CT, MR, ultrasound) zero-shot LiteMedSAM's comes before the shipped polyp model's)."),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default: runs/infer/<input name>)."),
    backend: str = typer.Option("auto", "--backend", help="auto|ov-cpu|ort-cpu|ort-cuda|ort-trt|tensorrt|torch-cuda."),
    precision: str | None = typer.Option(None, "--precision", help="fp32|fp16|bf16|int8 (int8: ort-cpu's int8 encoder, or ov-cpu's from imedsam-export --ov-int8; bf16: ov-cpu's encoder; default: the backend's)."),
    backend_option: list[str] | None = typer.Option(None, "--backend-option", help=BACKEND_OPTION_HELP),
    out_size: str | None = typer.Option(None, "--out-size", help="Mask size: N (long side) or WxH (default: the input's)."),
    query: str = typer.Option(DEFAULT_QUERY, "--query", help="sparse: the box plus --margin at multiple resolutions (fastest; 99.99% of pixels as full on Kvasir-Sessile test); box: every pixel of the box plus --margin; full: every pixel (the export's reference, slowest)."),
    margin: float = typer.Option(0.25, "--margin", help="Box-query margin, a fraction of the box size per side."),
    chunk: int = typer.Option(32768, "--chunk", help="Query points per decoder call (bounds memory)."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for ov-cpu and ort-cpu (default: the runtimes' own, one per core); e.g. to leave cores to a device's other software."),
    tta: bool = typer.Option(False, "--tta", help="Average each mask's logits with those of the frame mirrored left to right (two encoder passes and twice the decoding a frame; the lite model on Kvasir-Sessile test: Dice 94.62 -> 95.04, mean HD95 4.92 -> 5.39 with jittered boxes: README)."),
    min_confidence: float = typer.Option(TrackConfig.min_confidence, "--min-confidence", help="Video: a mask below this mean probability means lost."),
    max_growth: float = typer.Option(TrackConfig.max_growth, "--max-growth", help="Video: a tracked object may grow to this many times its given box's width or height, or shrink to 1/this (except along a side cut by the frame's edge); a mask beyond means lost (0: no limit)."),
    track_core: float = typer.Option(TrackConfig.core, "--track-core", help="Video: the next box is the mask's core, its largest component opened by a disc of this fraction of the square root of its area (thin spikes along a fold left out; 0: the whole component)."),
    appearance: bool = typer.Option(TrackConfig.appearance, "--appearance/--no-appearance", help="Video: a tracked mask must look like the object did where its box was given (in the encoder's features), and a lost object is searched for on the whole frame."),
    like_part: bool = typer.Option(TrackConfig.like_part, "--like-part/--whole-mask", help="Video, with --appearance: the next box from the core of the mask's part that looks like the object (a spill onto unlike tissue does not widen the next prompt), or from the whole mask's core."),
    search: float = typer.Option(TrackConfig.search, "--search", help="Video: the search for a lost object takes the frame's cells scoring over this fraction of the given mask's own likeness (0: no search)."),
    window: str | None = typer.Option(None, "--window", help="Volumes and images: intensity window LEVEL,WIDTH in the file's own values (default: a volume gets CT 40,400, else its percentiles; an image its own range)."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out folder."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Segment the objects in the given boxes; writes masks, an overlay and per-frame results into --out.

    Volumes: NaN/Inf voxels are set to the volume's finite minimum and their slices' results get status
    'nonfinite' (a volume with no finite voxel is refused). Videos that end well before the frame count their
    container declares (truncated) are refused.
    """
    from imedsam_deploy import backends as bk
    from imedsam_deploy.boxes import load_boxes_file, parse_box
    from imedsam_deploy.infer import Prompts, detect_input

    # --- everything that can be refused is checked before a file is written ---
    if backend not in bk.CHOICES:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(bk.CHOICES)}")
    if query not in QUERY_MODES:
        raise UserError(f"--query {query!r}: choose one of {', '.join(QUERY_MODES)}")
    if not 0 <= margin <= 10:
        raise UserError(f"--margin {margin}: expected a fraction between 0 and 10")
    if chunk < 1:
        raise UserError(f"--chunk {chunk}: must be positive")
    check_threads(threads)
    if not 0 <= min_confidence <= 1:
        raise UserError(f"--min-confidence {min_confidence}: expected a probability between 0 and 1")
    if not (max_growth == 0 or 1 <= max_growth <= 1e6):
        raise UserError(f"--max-growth {max_growth}: expected 0 (no limit) or a factor of at least 1")
    if not 0 <= track_core <= 0.5:
        raise UserError(f"--track-core {track_core}: expected a fraction between 0 and 0.5")
    if not 0 <= search < 1:
        raise UserError(f"--search {search}: expected a fraction from 0 (no search) to under 1")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    options = split_options(backend_option)
    bk.parse_options(backend, options)  # refused now, not once the artifact has loaded
    size = _parse_out_size(out_size)
    win = _parse_window(window)
    prompts = Prompts([parse_box(b) for b in (box or [])], load_boxes_file(boxes) if boxes is not None else None, boxes)
    if not prompts.boxes and prompts.table is None:
        raise UserError("no prompt: give --box x0,y0,x1,y1 (repeatable) or --boxes FILE")
    spec = detect_input(input)
    if win is not None and spec.kind == "video":
        raise UserError(f"--window: {input} is a video, whose frames are 8-bit; the window is for volumes and images")
    out_dir = out if out is not None else Path("runs") / "infer" / input.name.split(".")[0]
    _prepare_out(out_dir, force)
    _run(spec, prompts, artifact, out_dir, backend, precision, size, query, margin, chunk,
         TrackConfig(min_confidence=min_confidence, max_growth=max_growth, core=track_core, appearance=appearance,
                     search=search, like_part=like_part), win, quiet, options, tta, threads)


def _radiology(spec: Any, first: Any, reader: Any) -> str | None:
    """How the default artifact's line names radiology input (a volume, grey images or a grey video, judged by
    its first image or frame), or None for colour input (colonoscopy: the shipped model's domain)."""
    from imedsam_core.pixels import looks_grey

    if spec.kind == "volume":
        return "a volume"
    frame = reader.first_frame() if reader is not None else first
    if frame is None or not looks_grey(frame):
        return None
    return "a grey video" if spec.kind == "video" else "grey images"


def _run(spec: Any, prompts: Any, artifact_dir: Path | None, out_dir: Path, backend_name: str, precision: str | None,
         size: Any, query: Any, margin: float, chunk: int, track: TrackConfig, win: Any, quiet: bool,
         options: dict[str, str], tta: bool = False, threads: int | None = None) -> None:
    from rich.console import Console

    from imedsam_core.atomic import atomic_dir
    from imedsam_core.cli_common import Progress
    from imedsam_core.paths import artifact_choice
    from imedsam_deploy.boxes import validate_box
    from imedsam_deploy.infer import (
        check_volume_out_size,
        iter_frames_count,
        run_images,
        run_video,
        run_volume,
    )
    from imedsam_deploy.outputs import OutputSet
    from imedsam_deploy.runtime import open_segmenter
    from imedsam_deploy.video import VideoReader, read_image
    from imedsam_deploy.volume import load_volume

    console = Console(stderr=True)
    reader = VideoReader(spec.path) if spec.kind == "video" else None
    vol = load_volume(spec.path, win) if spec.kind == "volume" else None
    try:
        hw: tuple[int, int] | None
        first = None
        if spec.kind in ("image", "folder"):  # to choose the default artifact; run_images takes it on
            first = read_image(spec.files[0], win)
        if spec.kind == "image" and first is not None:
            hw = (int(first.shape[0]), int(first.shape[1]))
        else:
            hw = (reader.height, reader.width) if reader is not None else vol.slice_hw if vol is not None else None
        if hw is not None:  # refuse a bad --box before loading anything (folders: checked per image)
            for i, b in enumerate(prompts.boxes):
                validate_box(b, hw, f"{spec.path} object {i} (--box {i + 1})")
        if vol is not None:
            check_volume_out_size(vol, size)
        choice = artifact_choice(artifact_dir, "pass --artifact DIR",
                                 None if artifact_dir is not None else _radiology(spec, first, reader))
        seg, how = open_segmenter(choice.path, backend_name, precision, options, threads, tta,
                                  query=query, margin=margin, chunk=chunk)
        be = seg.backend
        say_line(console, choice.line())  # once it opened: a refused artifact gets its one error line only
        say_line(console, how)
        total = iter_frames_count(spec, reader, vol)
        t0 = time.perf_counter()
        unit = {"video": "frames", "volume": "slices"}.get(spec.kind, "images")
        with atomic_dir(out_dir, overwrite=True) as stage, be, Progress(
            spec.path.name, total, unit, console=console, enabled=not quiet) as bar:
            progress = bar.update

            if spec.kind == "video":
                assert reader is not None
                suffix = ".avi" if spec.path.suffix.lower() == ".avi" else ".mp4"
                outs = OutputSet(stage, "video", reader.fps, (reader.width, reader.height), video_suffix=suffix)
            else:
                outs = OutputSet(stage, "images" if spec.kind in ("image", "folder") else "volume",
                                 mask_pngs=spec.kind != "volume")
            try:
                if spec.kind in ("image", "folder"):
                    info = run_images(seg, spec, prompts, outs, size, progress, window=win, first=first)
                elif spec.kind == "video":
                    assert reader is not None
                    info = run_video(seg, reader, prompts, outs, size, track, progress)
                else:
                    assert vol is not None
                    info = run_volume(seg, vol, prompts, outs, size, progress)
                elapsed = time.perf_counter() - t0
                summary = {"input": str(spec.path), "kind": spec.kind, "artifact": str(seg.artifact.path),
                           "backend": be.description, "query": query, "margin": margin, **info,
                           "seconds": round(elapsed, 3),
                           "fps": round(info["frames"] / elapsed, 3) if elapsed else None}
                outs.finish(summary)
            finally:
                outs.close()  # a failed run's open files (the staging folder is then discarded)
        if info.get("nonfinite_voxels"):
            say_line(console, f"warning: {spec.path}: {info['nonfinite_voxels']} NaN/Inf voxels in "
                     f"{len(info['nonfinite_slices'])} slices set to the volume minimum (status 'nonfinite')")
        for ev in outs.events:
            # numbered as in results.csv/json and --boxes (from 0)
            say_line(console, f"object {ev['object']} {ev['event']} at frame {ev['frame']}"
                     + "".join(f" ({ev[k]})" for k in ("reason", "how") if k in ev))
        n = info["frames"]
        what = {"video": "frame", "volume": "slice"}.get(spec.kind, "image") + ("" if n == 1 else "s")
        say_line(console, f"{n} {what} in {elapsed:.1f} s ({n / max(elapsed, 1e-9):.1f} fps) -> {out_dir}")
    finally:
        if reader is not None:
            reader.close()


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
