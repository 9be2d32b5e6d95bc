"""Run a ``Segmenter`` over an image, a folder of images, a video or a NIfTI volume into an ``OutputSet``.

Inputs are checked (readable, has frames, boxes inside the image) before anything is decoded; the CLI
stages the outputs in a temporary folder, so an error part-way leaves nothing behind. Images and video frames
and volume slices are read ahead and their outputs written behind on threads of their own
(``pipeline.overlapped``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from imedsam_core.errors import UserError
from imedsam_core.nifti import is_nifti
from imedsam_deploy._cv import cv2
from imedsam_deploy.appearance import FrameFeatures
from imedsam_deploy.boxes import BoxTable, fmt_box, lookup, unmatched, validate_box
from imedsam_deploy.outputs import Layer, OutputSet, Record
from imedsam_deploy.pipeline import overlapped
from imedsam_deploy.runtime import ObjectMask, Segmenter
from imedsam_deploy.tracking import Track, TrackConfig, follow
from imedsam_deploy.video import IMAGE_EXTS, VIDEO_EXTS, VideoReader, read_image
from imedsam_deploy.volume import Volume, save_labels

Progress = Callable[[int], None]  # called with the number of frames done


@dataclass
class Prompts:
    boxes: list[np.ndarray]  # --box, objects 0..n-1 (first frame of a video, every image / slice otherwise)
    table: BoxTable | None = None  # --boxes
    source: Path | None = None  # the --boxes file, named in errors

    def for_frame(self, index: int, name: str | None, first_only: bool) -> dict[int, np.ndarray]:
        given: dict[int, np.ndarray] = {}
        if not first_only or index == 0:
            given.update(enumerate(self.boxes))
        if self.table is not None:
            given.update(lookup(self.table, index, name))
        return given

    def check_frames(self, count: int | None, unit: str, where: Path, names: Sequence[str] = ()) -> None:
        """Refuse a --boxes entry that names no frame of the input (``count`` of them, None: not known
        yet): it would otherwise be skipped without a word."""
        if self.table is None:
            return
        k = unmatched(self.table, count, names)
        if k is None:
            return
        have = f"{unit} 0..{count - 1}" if count is not None else f"{unit} numbered from 0"
        if names:
            have += " or an image's file name"
        raise UserError(f"{self.source or '--boxes'}: {unit[:-1]} {k!r} is not in {where.name} ({have})")


@dataclass
class InputSpec:
    kind: str  # image | folder | video | volume
    path: Path
    files: list[Path] = field(default_factory=list)


def detect_input(path: Path) -> InputSpec:
    if not path.exists():
        raise UserError(f"{path}: input does not exist")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
        if not files:
            raise UserError(f"{path}: folder holds no images ({', '.join(sorted(IMAGE_EXTS))})")
        return InputSpec("folder", path, files)
    if is_nifti(path):
        return InputSpec("volume", path)
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTS:
        return InputSpec("video", path)
    if suffix in IMAGE_EXTS:
        return InputSpec("image", path, [path])
    raise UserError(f"{path}: unknown input type (expected an image, a folder of images, a video or a .nii/.nii.gz)")


def out_shape(image_hw: tuple[int, int], out_size: tuple[int, int] | int | None) -> tuple[int, int]:
    """Output (H, W): the input's size, N on the long side (aspect kept), or an explicit (W, H)."""
    h, w = image_hw
    if out_size is None:
        return h, w
    if isinstance(out_size, tuple):
        return out_size[1], out_size[0]
    s = out_size / max(h, w)
    return max(1, round(h * s)), max(1, round(w * s))


def _to_image(mask: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    if mask.shape == image_hw:
        return mask
    return cv2.resize(mask.astype(np.uint8), image_hw[::-1], interpolation=cv2.INTER_NEAREST).astype(bool)


def _records(frame: int, name: str, objs: dict[int, ObjectMask], status: dict[int, str], masks: dict[int, list[np.ndarray]],
             enc_ms: float, dec_ms: float, notes: dict[int, str]) -> list[Record]:
    out = []
    for obj, om in objs.items():
        for c in range(om.num_classes):
            x0, y0, x1, y1 = (float(v) for v in om.box)
            out.append(Record(frame, name, obj, c, status[obj], x0, y0, x1, y1, int(masks[obj][c].sum()),
                              om.class_mean_probability(c),
                              om.queried, enc_ms + dec_ms, enc_ms, dec_ms, notes.get(obj, "")))
    return out


def _layers(objs: dict[int, ObjectMask], status: dict[int, str], masks: dict[int, list[np.ndarray]]) -> list[Layer]:
    layers = []
    for obj, om in objs.items():
        for c in range(om.num_classes):
            tag = f"{obj}" + (f".{c}" if om.num_classes > 1 else "")  # the object number of results.csv + (" lost" if status[obj] == "lost" else "")
            layers.append(Layer(obj, masks[obj][c], om.box, status[obj], tag))
    return layers


def _class_masks(om: ObjectMask, keep: bool, union: np.ndarray | None = None) -> list[np.ndarray]:
    """Each class's mask at the output size (zeros unless ``keep``); ``union``, ``om.mask()`` when the caller
    already made it, is the one class's mask of a single-class object (not built a second time per frame)."""
    if keep and union is not None and om.num_classes == 1:
        return [union]
    return [om.mask(c) if keep else np.zeros(om.out_hw, bool) for c in range(om.num_classes)]


def _segment_given(seg: Segmenter, rgb: np.ndarray, given: dict[int, np.ndarray], ohw: tuple[int, int],
                   ) -> tuple[dict[int, ObjectMask], dict[int, list[np.ndarray]], float, float]:
    """Every given box on one image (one embedding for all): objects, their class masks, encode/decode ms."""
    keys = sorted(given)
    res = seg.segment(rgb, np.array([given[k] for k in keys], np.float64), ohw)
    objs = dict(zip(keys, res.objects, strict=True))
    return objs, {obj: _class_masks(om, True) for obj, om in objs.items()}, res.encode_ms, res.decode_ms


def run_images(seg: Segmenter, spec: InputSpec, prompts: Prompts, outs: OutputSet,
               out_size: tuple[int, int] | int | None, progress: Progress, overlap_io: bool = True,
               window: tuple[float, float] | None = None, first: np.ndarray | None = None) -> dict[str, Any]:
    """``first``: the first file's picture where the caller has read it already (``imedsam-infer`` does, to choose
    the default artifact), so it is not decoded twice."""
    prompts.check_frames(len(spec.files), "images", spec.path, [p.name for p in spec.files])
    frames = 0
    # read_image silences fd 2 around each decode (libpng's own error lines); on the reader thread that window
    # can also swallow a progress-bar refresh, never an error: errors are printed after the threads stop
    pictures = ((p, first if i == 0 and first is not None else read_image(p, window)) for i, p in enumerate(spec.files))
    with overlapped(pictures, overlap_io) as (images, write):
        for i, (path, rgb) in enumerate(images):
            hw = (int(rgb.shape[0]), int(rgb.shape[1]))
            given = prompts.for_frame(i, path.name, first_only=False)
            for obj, b in given.items():
                validate_box(b, hw, f"{path} object {obj}")
            ohw = out_shape(hw, out_size)
            objs: dict[int, ObjectMask] = {}
            masks: dict[int, list[np.ndarray]] = {}
            enc_ms = dec_ms = 0.0
            if given:
                objs, masks, enc_ms, dec_ms = _segment_given(seg, rgb, given, ohw)
            status = dict.fromkeys(objs, "given")
            write(outs.add_frame, path.stem, rgb, ohw, _layers(objs, status, masks),
                  _records(i, path.name, objs, status, masks, enc_ms, dec_ms, {}))
            frames += 1
            progress(frames)
    return {"frames": frames}


def run_video(seg: Segmenter, reader: VideoReader, prompts: Prompts, outs: OutputSet,
              out_size: tuple[int, int] | int | None, track_cfg: TrackConfig, progress: Progress,
              overlap_io: bool = True) -> dict[str, Any]:
    hw = (reader.height, reader.width)
    ohw = out_shape(hw, out_size)
    tracks: dict[int, Track] = {}
    # the container's frame count is an estimate: frames past the end are refused once the video has been read
    prompts.check_frames(None, "frames", reader.path)
    frames = 0
    with overlapped(reader, overlap_io) as (video, write):
        for t, rgb in enumerate(video):
            given = prompts.for_frame(t, None, first_only=True)
            for obj, b in given.items():
                validate_box(b, hw, f"{reader.path} frame {t} object {obj}")
                tracks.setdefault(obj, Track(obj, track_cfg)).give(b)
            active = {obj: tr for obj, tr in sorted(tracks.items()) if tr.box is not None}
            objs: dict[int, ObjectMask] = {}
            status: dict[int, str] = {}
            notes: dict[int, str] = {}
            masks: dict[int, list[np.ndarray]] = {}
            enc_ms = dec_ms = 0.0
            if active:
                embs, enc_ms = seg.embed_frame(rgb)
                # the embedding crosses to the host only for a frame that learns or checks an appearance (the
                # image's own, not the mirror's of --tta)
                looked = track_cfg.appearance and any(obj in given or tr.look is not None for obj, tr in active.items())
                host = seg.backend.host_embedding(embs[0]) if looked else None
                frame = FrameFeatures(host, hw, seg.pre) if host is not None else None

                def decode(box: np.ndarray) -> tuple[tuple[ObjectMask, np.ndarray], np.ndarray, float]:
                    om = seg.decode_frame_box(embs, box, hw, ohw)  # noqa: B023 - called within this frame only
                    union = om.mask()
                    return (om, union), _to_image(union, hw), om.mean_probability

                tt = time.perf_counter()
                for obj, tr in active.items():
                    was = tr.status
                    (om, union), st, searched = follow(tr, decode, frame, obj in given)
                    objs[obj], status[obj] = om, st
                    if st == "lost":
                        notes[obj] = tr.lost_reason
                        if was != "lost":
                            outs.events.append({"frame": t, "object": obj, "event": "lost", "reason": tr.lost_reason,
                                                "box": fmt_box(om.box)})
                    elif t > 0 and st == "tracked" and (was == "lost" or searched):
                        event = {"frame": t, "object": obj, "event": "found", "box": fmt_box(om.box)}
                        if searched:  # the box is the search's, not the last frame's
                            event["how"] = "by its appearance"
                            notes[obj] = "found by its appearance"
                        outs.events.append(event)
                    masks[obj] = _class_masks(om, st != "lost", union)  # a lost object's mask is not reported
                dec_ms = (time.perf_counter() - tt) * 1e3
            write(outs.add_frame, f"{t:06d}", rgb, ohw, _layers(objs, status, masks),
                  _records(t, f"{t:06d}", objs, status, masks, enc_ms, dec_ms, notes))
            frames += 1
            progress(frames)
    prompts.check_frames(frames, "frames", reader.path)
    return {"frames": frames, "fps": reader.fps, "size": [reader.width, reader.height]}


def check_volume_out_size(vol: Volume, out_size: tuple[int, int] | int | None) -> None:
    """A volume's mask keeps its voxel grid: an --out-size other than the slice's own is refused."""
    if out_size is not None and out_shape(vol.slice_hw, out_size) != vol.slice_hw:
        raise UserError(f"{vol.path}: --out-size is not supported for volumes (the mask keeps the voxel grid)")


def run_volume(seg: Segmenter, vol: Volume, prompts: Prompts, outs: OutputSet,
               out_size: tuple[int, int] | int | None, progress: Progress, overlap_io: bool = True) -> dict[str, Any]:
    hw = vol.slice_hw
    check_volume_out_size(vol, out_size)
    per_slice = [prompts.for_frame(z, None, first_only=False) for z in range(vol.num_slices)]
    for z, given in enumerate(per_slice):
        for obj, b in given.items():
            validate_box(b, hw, f"{vol.path} slice {z} object {obj}")
    prompts.check_frames(vol.num_slices, "slices", vol.path)
    labels = np.zeros((vol.num_slices, *hw), np.uint8)
    segmented = 0
    channels = 0
    prompted = ((z, given, vol.slice_rgb(z)) for z, given in enumerate(per_slice) if given)
    with overlapped(prompted, overlap_io) as (slices, write):
        for z, given, rgb in slices:
            objs, masks, enc_ms, dec_ms = _segment_given(seg, rgb, given, hw)
            n_bad = vol.nonfinite.get(z, 0)
            status = dict.fromkeys(objs, "nonfinite" if n_bad else "given")
            notes = dict.fromkeys(objs, f"{n_bad} NaN/Inf voxels set to the volume minimum") if n_bad else {}
            flat = [m for obj in sorted(masks) for m in masks[obj]]
            channels = max(channels, len(flat))
            labels[z] = np.where(labels[z] == 0, _labels_nd(flat, hw), labels[z])
            write(outs.add_frame, f"slice_{z:04d}", rgb, hw, _layers(objs, status, masks),
                  _records(z, f"slice_{z:04d}", objs, status, masks, enc_ms, dec_ms, notes))
            segmented += 1
            progress(z + 1)
    progress(vol.num_slices)
    if channels == 1:
        labels = (labels > 0).astype(np.uint8)  # one object: a 0/1 label volume
    save_labels(vol, labels, outs.root / "mask.nii.gz")
    info: dict[str, Any] = {"frames": vol.num_slices, "segmented_slices": segmented}
    if vol.nonfinite:
        info["nonfinite_voxels"] = sum(vol.nonfinite.values())
        info["nonfinite_slices"] = sorted(vol.nonfinite)
    return info


def _labels_nd(masks: list[np.ndarray], hw: tuple[int, int]) -> np.ndarray:
    lab = np.zeros(hw, np.uint8)
    for i, m in enumerate(masks):
        lab[m & (lab == 0)] = i + 1
    return lab


def iter_frames_count(spec: InputSpec, reader: VideoReader | None, vol: Volume | None) -> int | None:
    if spec.kind in ("image", "folder"):
        return len(spec.files)
    if reader is not None:
        return reader.frame_count or None
    if vol is not None:
        return vol.num_slices
    return None

