"""imedsam_deploy parts that need no artifact: preprocessing, UGS, boxes, tracking, outputs, video I/O,
manifest validation and CLI argument errors."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from imedsam_core import contract
from imedsam_core.errors import UserError
from imedsam_deploy.boxes import load_boxes_file, lookup, parse_box, unmatched, validate_box
from imedsam_deploy.cli_infer import app
from imedsam_deploy.manifest import load_artifact
from imedsam_deploy.outputs import Layer, OutputSet, Record, draw_overlay, label_image
from imedsam_deploy.preprocess import (
    Region,
    box_region,
    box_to_model,
    grid_coords,
    region_coords,
    to_model_input,
)
from imedsam_deploy.runtime import ugs_merge
from imedsam_deploy.tracking import Track, TrackConfig, mask_box
from imedsam_deploy.video import VideoReader, VideoWriter, read_image
from imedsam_train.model import grid_coords as torch_grid_coords
from imedsam_train.model import ugs_merge as torch_ugs_merge

from .conftest import SAMPLE_DATA, SHARED_DATA

VIDEO = SHARED_DATA / "colonoscopy-video" / "video_coloscopy.mp4"


# --- preprocessing ---
@pytest.mark.parametrize("hw", [(1, 1), (7, 5), (128, 128), (254, 320), (333, 97)])
def test_grid_coords_is_the_torch_grid_bit_for_bit(hw):
    ours = grid_coords(*hw)
    ref = torch_grid_coords(*hw).numpy()
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)


def test_region_coords_are_the_grid_rows_and_columns():
    h, w = 50, 70
    full = grid_coords(h, w).reshape(h, w, 2)
    r = Region(5, 11, 30, 64)
    assert np.array_equal(region_coords(r, h, w).reshape(*r.shape, 2), full[5:30, 11:64])


def test_model_input_is_stretch_linear_rgb_scaled():
    rgb = read_image(next((SAMPLE_DATA / "images").glob("*.jpg")))
    x = to_model_input(rgb, 128)
    assert x.shape == (3, 128, 128) and x.dtype == np.float32
    ref = cv2.resize(rgb, (128, 128), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    np.testing.assert_allclose(x.transpose(1, 2, 0), ref, rtol=0, atol=1e-7)
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_segmenter_resizes_frames_into_one_reused_uint8_batch():
    """Segmenter.pixels: frames of any size resized into the same buffer (no allocation per frame), bitwise
    resize_to_model's output; then pixels_to_model gives to_model_input's floats."""
    from imedsam_deploy.backends.base import Backend
    from imedsam_deploy.manifest import Artifact
    from imedsam_deploy.preprocess import pixels_to_model, resize_to_model
    from imedsam_deploy.runtime import Segmenter

    class Nothing(Backend):
        def encode(self, images):
            return [None] * len(images)

        def decode(self, embedding, boxes, coords):
            raise NotImplementedError

    art = Artifact(path=Path("."), manifest={}, input_size=64, embedding_shape=(8, 4, 4), num_classes=1,
                   refine_fraction=0.125, max_points=1024, max_batch=3, graphs={})
    seg = Segmenter(Nothing(3, 1024), art)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((64, 64), (120, 90), (37, 200))]
    first = seg.pixels(frames)
    again = seg.pixels(frames[1:])
    assert again.base is first.base and again.shape == (2, 64, 64, 3)  # the same buffer, rows reused
    for got, im in zip(again, frames[1:], strict=True):
        assert np.array_equal(got, resize_to_model(im, 64))
    assert np.array_equal(pixels_to_model(again), np.stack([to_model_input(im, 64) for im in frames[1:]]))
    assert seg.pixels(frames[:1]).base is first.base  # a smaller batch: still the same buffer
    with pytest.raises(ValueError, match="max_batch"):
        seg.pixels(frames + frames[:1])
    for bad in (frames[0].astype(np.float32), frames[0][..., 0], frames[0][..., :2]):  # never silently cast
        with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 RGB"):
            seg.pixels([bad])


def test_box_to_model_scales_each_axis():
    b = box_to_model(np.array([10, 20, 110, 220]), (400, 200), 128)
    np.testing.assert_allclose(b, [6.4, 6.4, 70.4, 70.4], rtol=1e-6)


def test_box_region_covers_the_box_plus_margin_and_clips():
    r = box_region(np.array([10, 10, 50, 30]), (100, 200), (100, 200), margin=0.25)
    assert (r.c0, r.r0, r.c1, r.r1) == (0, 5, 60, 35)
    r2 = box_region(np.array([10, 10, 50, 30]), (100, 200), (50, 100), margin=0.0, min_margin_px=0)
    assert (r2.c0, r2.r0, r2.c1, r2.r1) == (5, 5, 25, 15)


def test_ugs_merge_matches_the_model_and_ignores_chunking():
    g = torch.Generator().manual_seed(0)
    coarse, fine, unc = (torch.randn(1, 2, 1000, generator=g) for _ in range(3))
    ref = torch_ugs_merge(coarse, fine, unc, 0.125)[0].numpy()
    k = contract.refine_count(1000, 0.125)
    ours = ugs_merge(coarse[0].numpy(), fine[0].numpy(), unc[0].numpy(), k)
    assert np.array_equal(ours, ref)
    assert np.array_equal(ugs_merge(coarse[0].numpy(), fine[0].numpy(), unc[0].numpy(), 5000), fine[0].numpy())


# --- boxes ---
@pytest.mark.parametrize("text,msg", [("1,2,3", "four numbers"), ("a,b,c,d", "four numbers"), ("nan,1,5,5", "finite"),
                                      ("1,1,1,5", "zero or negative area"), ("5,1,2,8", "zero or negative area"),
                                      ("1,2,inf,4", "finite")])
def test_malformed_boxes_are_refused(text, msg):
    with pytest.raises(UserError, match=msg):
        parse_box(text)


def test_box_outside_the_image_is_refused():
    validate_box(parse_box("0,0,320,254"), (254, 320), "x")
    for text in ("-1,0,10,10", "0,0,321,10", "300,200,330,300"):
        with pytest.raises(UserError, match="outside the 320x254 image"):
            validate_box(parse_box(text), (254, 320), "x")


def test_boxes_files_csv_and_json(tmp_path):
    csv = tmp_path / "b.csv"
    csv.write_text("frame,x0,y0,x1,y1,object\n0,1,2,30,40,0\n0,5,5,9,9,1\n7,1,1,2,2,0\n")
    t = load_boxes_file(csv)
    assert set(t) == {0, 7} and set(t[0]) == {0, 1} and list(t[0][1]) == [5, 5, 9, 9]
    js = tmp_path / "b.json"
    js.write_text(json.dumps({"img.jpg": [[1, 2, 3, 4]], "3": [1, 1, 5, 5]}))
    t = load_boxes_file(js)
    assert list(t["img.jpg"][0]) == [1, 2, 3, 4] and list(t[3][0]) == [1, 1, 5, 5]
    bad = tmp_path / "bad.csv"
    bad.write_text("frame,x0,y0,x1,y1\n0,1,2,x,4\n")
    with pytest.raises(UserError, match="line 2"):
        load_boxes_file(bad)


# --- tracking ---
def _disc(hw, centre, r):
    m = np.zeros(hw, np.uint8)
    cv2.circle(m, centre, r, 1, -1)
    return m.astype(bool)


def test_mask_box_takes_the_largest_component():
    m = _disc((100, 100), (60, 50), 10)
    m[2:4, 2:4] = True
    np.testing.assert_array_equal(mask_box(m), [50, 40, 71, 61])
    assert mask_box(np.zeros((5, 5), bool)) is None


def test_mask_box_on_the_masks_crop_equals_labelling_the_whole_frame():
    """mask_box labels only the mask's bounding crop: the same box as labelling the whole frame, on random
    masks of several blobs (some touching the frame's edges) and of scattered specks."""
    import cv2

    rng = np.random.default_rng(5)
    for i in range(40):
        hw = (int(rng.integers(20, 120)), int(rng.integers(20, 120)))
        m = np.zeros(hw, bool)
        for _ in range(int(rng.integers(1, 4))):
            m |= _disc(hw, (int(rng.integers(-5, hw[1] + 5)), int(rng.integers(-5, hw[0] + 5))), int(rng.integers(1, 15)))
        if i % 4 == 0:
            m |= rng.random(hw) < 0.02
        if not m.any():
            continue
        n, _, st, _ = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
        j = 1 + int(np.argmax(st[1:n, cv2.CC_STAT_AREA]))
        x, y, w, h = st[j, :4]
        np.testing.assert_array_equal(mask_box(m), [x, y, x + w, y + h])


def test_sigmoid_is_the_float32_logistic_without_overflow_warnings():
    import warnings

    from imedsam_deploy.runtime import sigmoid

    x = np.concatenate([np.linspace(-30, 30, 2001), [-1e4, -100, -89, 89, 100, 1e4]]).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = sigmoid(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    ref = 1 / (1 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(got, ref, rtol=3e-7, atol=1e-30)
    assert got[-6] == 0.0 and got[-1] == 1.0


def test_track_follows_reports_lost_and_does_not_drift():
    tr = Track(0, TrackConfig(margin=0.1, min_margin_px=2, min_area_px=16, min_confidence=0.6))
    tr.give(np.array([40, 30, 80, 70]))
    assert tr.observe(_disc((100, 120), (60, 50), 15), 0.9, given=True) == "given"
    first = tr.box.copy()
    assert first[0] < 45 and first[2] > 75  # grown around the disc
    assert tr.observe(_disc((100, 120), (70, 50), 15), 0.9, given=False) == "tracked"
    moved = tr.box.copy()
    assert moved[0] > first[0]  # the box followed the object
    assert tr.observe(np.zeros((100, 120), bool), 0.0, given=False) == "lost"
    assert "empty" in tr.lost_reason and np.array_equal(tr.box, moved)  # kept the last confident box
    assert tr.observe(_disc((100, 120), (20, 20), 15), 0.52, given=False) == "lost"
    assert "low confidence" in tr.lost_reason and np.array_equal(tr.box, moved)
    assert tr.observe(_disc((100, 120), (72, 50), 15), 0.9, given=False) == "tracked"


# --- outputs ---
def test_label_image_and_overlay(tmp_path):
    a, b = _disc((60, 80), (30, 30), 10), _disc((60, 80), (40, 30), 10)
    assert set(np.unique(label_image([a], (60, 80)))) == {0, 255}
    lab = label_image([a, b], (60, 80))
    assert lab[30, 30] == 1 and lab[30, 49] == 2 and lab[0, 0] == 0
    rgb = np.full((60, 80, 3), 100, np.uint8)
    ov = draw_overlay(rgb, [Layer(0, a, np.array([20, 20, 40, 40]), "given", "1")])
    assert ov.shape == rgb.shape and (ov[30, 30] != rgb[30, 30]).any() and (ov[55, 75] == rgb[55, 75]).all()
    outs = OutputSet(tmp_path, "images")
    rec = Record(0, "x.png", 0, 0, "given", 20, 20, 40, 40, int(a.sum()), 0.8, 100, 5.0, 2.0, 3.0)
    outs.add_frame("x", rgb, (60, 80), [Layer(0, a, np.array([20, 20, 40, 40]), "given", "1")], [rec])
    outs.finish({"backend": "test"})
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["records"][0]["area"] == int(a.sum())
    assert doc["backend"] == "test" and doc["events"] == []
    assert (tmp_path / "results.csv").read_text().splitlines()[0].startswith("frame,name,object,class,status")
    assert (cv2.imread(str(tmp_path / "masks" / "x.png"), 0) > 0).sum() == a.sum()


def test_output_set_streams_records_and_keeps_nothing_per_frame(tmp_path):
    """Records go to results.csv and a scratch file as they come (a long stream's memory stays flat);
    finish writes a results.json with the summary, the events and every record, and removes the scratch."""
    outs = OutputSet(tmp_path, "images")
    rgb = np.zeros((20, 30, 3), np.uint8)
    m = np.zeros((20, 30), bool)
    for i in range(300):
        recs = [Record(i, f"f{i}", k, 0, "tracked", 1, 2, 3, 4, i + k, 0.5, 10, 1.0 + i, 0.5, 0.5) for k in range(2)]
        outs.add_frame(f"f{i:03d}", rgb, (20, 30), [Layer(0, m, np.array([1, 2, 3, 4]), "tracked", "1")], recs,
                       draw=False)
    assert outs.count == 600
    assert not any(isinstance(v, list) and len(v) > 0 for v in vars(outs).values())  # no per-frame state
    assert [r["frame"] for r in outs.records()][-2:] == [299, 299]  # readable before finish
    assert not (tmp_path / "results.csv").exists() and not (tmp_path / "results.json").exists()  # not yet
    outs.events.append({"frame": 7, "object": 1, "event": "lost"})
    outs.finish({"frames": 300, "note": "a \"quoted\" summary"})
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["frames"] == 300 and doc["events"][0]["frame"] == 7 and len(doc["records"]) == 600
    assert doc["records"][123] == Record(61, "f61", 1, 0, "tracked", 1, 2, 3, 4, 62, 0.5, 10, 62.0, 0.5, 0.5).row()
    with open(tmp_path / "results.csv", newline="") as f:
        assert len(f.read().splitlines()) == 601
    assert not (tmp_path / OutputSet.RECORDS_SCRATCH).exists() and not (tmp_path / OutputSet.CSV_SCRATCH).exists()
    assert [r["frame"] for r in outs.records()][:2] == [0, 0]  # and from results.json after finish
    outs.close()  # idempotent after finish


# --- video I/O on the real colonoscopy video ---
def test_video_roundtrip_keeps_frame_count_and_size(tmp_path):
    reader = VideoReader(VIDEO)
    assert (reader.width, reader.height) == (470, 410)
    frames = []
    for i, f in enumerate(reader):
        frames.append(f)
        if i == 9:
            break
    reader.close()
    w = VideoWriter(tmp_path / "o.mp4", 30.0, 470, 410)
    for f in frames:
        w.write(f)
    w.close()
    back = list(VideoReader(tmp_path / "o.mp4"))
    assert len(back) == 10 and back[0].shape == (410, 470, 3)
    assert np.abs(back[0].astype(int) - frames[0].astype(int)).mean() < 8  # lossy codec, same picture


def test_video_reader_refuses_missing_and_unreadable(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        VideoReader(tmp_path / "none.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(UserError, match="video"):
        VideoReader(bad)


# --- manifest validation on a hand-made folder ---
def _hand_made(folder: Path, s: int = 64) -> Path:
    folder.mkdir()
    files = {}
    for name, data in ((contract.ENCODER_ONNX, b"enc-bytes"), (contract.DECODER_ONNX, b"dec-bytes")):
        (folder / name).write_bytes(data)
        files[name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    m = {"format": contract.MANIFEST_FORMAT, "version": contract.MANIFEST_VERSION, "input_size": s,
         "embedding_shape": [64, s // 16, s // 16], "num_classes": 1, "refine_fraction": 0.125,
         "preprocessing": contract.preprocessing_manifest(s), "max_points": 4096, "max_batch": 2,
         "graphs": {"fp32": {"encoder": contract.ENCODER_ONNX, "decoder": contract.DECODER_ONNX}}, "files": files}
    (folder / contract.MANIFEST_NAME).write_text(json.dumps(m))
    return folder


def test_manifest_accepts_a_consistent_folder(tmp_path):
    art = load_artifact(_hand_made(tmp_path / "a"))
    assert art.input_size == 64 and art.embedding_shape == (64, 4, 4) and art.graph("encoder").name == "encoder.onnx"


def test_manifest_refuses_tampering_and_wrong_folders(tmp_path):
    a = _hand_made(tmp_path / "a")
    (a / contract.DECODER_ONNX).write_bytes(b"dec-bytez")  # same size, other content
    with pytest.raises(UserError, match="sha256 does not match"):
        load_artifact(a)
    (a / contract.DECODER_ONNX).write_bytes(b"dec")
    with pytest.raises(UserError, match="truncated"):
        load_artifact(a)
    (a / contract.DECODER_ONNX).unlink()
    with pytest.raises(UserError, match="missing"):
        load_artifact(a)
    with pytest.raises(UserError, match="no manifest.json"):
        load_artifact(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_artifact(tmp_path / "nope")
    b = _hand_made(tmp_path / "b")
    m = json.loads((b / contract.MANIFEST_NAME).read_text())
    m["preprocessing"]["color_order"] = "BGR"
    (b / contract.MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(UserError, match="color_order"):
        load_artifact(b)
    (b / contract.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(UserError, match="unreadable manifest"):
        load_artifact(b)


# --- CLI argument errors: one line, exit 2, nothing written ---
@pytest.mark.parametrize("args,msg", [
    (["--box", "1,2,3"], "four numbers"),
    (["--box", "nan,1,5,5"], "finite"),
    (["--box", "5,5,5,9"], "zero or negative area"),
    ([], "no prompt"),
    (["--box", "1,1,5,5", "--backend", "cuda-magic"], "--backend"),
    (["--box", "1,1,5,5", "--out-size", "0"], "--out-size"),
])
def test_cli_refuses_bad_arguments(tmp_path, args, msg):
    img = next((SAMPLE_DATA / "images").glob("*.jpg"))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [str(img), "--out", str(out), "--artifact", str(tmp_path), *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], res.output
    assert not out.exists()


def test_cli_refuses_missing_unreadable_and_box_outside_before_loading_anything(tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    res = runner.invoke(app, [str(tmp_path / "missing.jpg"), "--box", "1,1,5,5", "--out", str(out)])
    assert res.exit_code == 2 and "does not exist" in res.output
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8garbage")
    res = runner.invoke(app, [str(bad), "--box", "1,1,5,5", "--out", str(out)])
    assert res.exit_code == 2 and "not a readable image" in res.output, res.output
    img = next((SAMPLE_DATA / "images").glob("*.jpg"))
    res = runner.invoke(app, [str(img), "--box", "10,10,900,50", "--out", str(out), "--artifact", str(tmp_path)])
    assert res.exit_code == 2 and "outside the" in res.output, res.output
    res = runner.invoke(app, [str(img), "--box", "10,10,90,50", "--out", str(out), "--artifact", str(tmp_path)])
    assert res.exit_code == 2 and "no manifest.json" in res.output, res.output
    assert not out.exists()


# --- backend refusals that need no GPU ---
def test_engine_built_for_another_gpu_or_tensorrt_is_refused():
    from imedsam_deploy.backends.tensorrt import engine_mismatch

    entry = {"tensorrt": "10.13.0", "gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
    assert engine_mismatch(entry, "10.13.0", "NVIDIA H100 80GB HBM3", "9.0") is None
    assert "TensorRT 10.13.0, this is TensorRT 11.4.1" in engine_mismatch(entry, "11.4.1", "NVIDIA H100 80GB HBM3", "9.0")
    msg = engine_mismatch(entry, "10.13.0", "NVIDIA H200", "9.0")
    assert "built for NVIDIA H100 80GB HBM3" in msg and "NVIDIA H200" in msg and "\n" not in msg


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_tensorrt_and_gpu_backends_refuse_in_one_line_where_missing(tmp_path):
    from imedsam_deploy.backends import open_backend

    art = load_artifact(_hand_made(tmp_path / "a"))
    with pytest.raises(UserError, match="tensorrt is not installed"):
        open_backend("tensorrt", art)
    img = next((SAMPLE_DATA / "images").glob("*.jpg"))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [str(img), "--box", "1,1,50,50", "--artifact", str(tmp_path / "a"), "--out", str(out),
                                   "--backend", "ort-cuda"])
    assert res.exit_code == 2 and res.output.strip().startswith("error: backend ort-cuda: onnxruntime has no")
    assert len(res.output.strip().splitlines()) == 1 and not out.exists()


# --- --backend-option: what the backend named takes, refused in one line before anything is written ---
@pytest.mark.parametrize("args,msg", [
    (["--backend", "ort-cpu", "--backend-option", "tuned=0"], "--backend-option tuned=0: backend ort-cpu takes no options"),
    (["--backend", "torch-cuda", "--backend-option", "speed=2"],
     "--backend-option speed=2: backend torch-cuda takes compile, triton, tuned, checkpoint"),
    (["--backend", "torch-cuda", "--backend-option", "compile=maybe"],
     "--backend-option compile=maybe: expected on or off (1 or 0)"),
    (["--backend", "torch-cuda", "--backend-option", "checkpoint=/nonexistent.pt"],
     "--backend-option checkpoint=/nonexistent.pt: no such file"),
    (["--backend", "torch-cuda", "--backend-option", "compile"], "--backend-option 'compile': expected KEY=VALUE"),
    (["--backend", "torch-cuda", "--backend-option", "tuned=0", "--backend-option", "tuned=1"],
     "--backend-option tuned: given twice"),
    (["--backend-option", "tuned=0"], "--backend-option tuned=0: name the backend it is for with --backend"),
    (["--backend", "torch-cuda", "--backend-option", "compile=1", "--backend-option", "triton=on"],
     "--backend-option compile=1 and triton=1: torch.compile and the hand-written Triton kernels are alternatives"),
])
def test_cli_refuses_bad_backend_options(tmp_path, args, msg):
    img = next((SAMPLE_DATA / "images").glob("*.jpg"))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [str(img), "--box", "1,1,50,50", "--out", str(out),
                                   "--artifact", str(_hand_made(tmp_path / "a")), *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {msg}"), res.output
    assert not out.exists()


def test_cli_passes_the_backend_options_to_the_backend_named(tmp_path):
    """Options torch-cuda takes are accepted and reach it: the backend then decides (here, with no CUDA device or
    no checkpoint behind the hand-made artifact, it refuses in one line of its own)."""
    img = next((SAMPLE_DATA / "images").glob("*.jpg"))
    out = tmp_path / "out"
    ck = tmp_path / "weights.pt"
    ck.write_bytes(b"not opened before the device check")
    res = CliRunner().invoke(app, [str(img), "--box", "1,1,50,50", "--out", str(out), "--artifact",
                                   str(_hand_made(tmp_path / "a")), "--backend", "torch-cuda", "--backend-option",
                                   "tuned=0", "--backend-option", "triton=1", "--backend-option", f"checkpoint={ck}"])
    assert res.exit_code == 2 and res.output.startswith("error: backend torch-cuda: "), res.output
    assert "--backend-option" not in res.output and not out.exists()


@pytest.mark.parametrize(("args", "want"), [
    ([], {"like_part": True, "appearance": True}),
    (["--whole-mask"], {"like_part": False, "appearance": True}),
    (["--no-appearance", "--search", "0.5", "--track-core", "0.2"], {"appearance": False, "search": 0.5, "core": 0.2}),
])
def test_cli_passes_the_video_options_to_the_tracker(tmp_path, monkeypatch, args, want):
    import imedsam_deploy.cli_infer as ci

    seen = {}
    monkeypatch.setattr(ci, "_run", lambda *a, **k: seen.update(track=a[10]))
    img = next((SAMPLE_DATA / "images").glob("*.jpg"))
    res = CliRunner().invoke(app, [str(img), "--box", "1,1,50,50", "--out", str(tmp_path / "out"), *args])
    assert res.exit_code == 0, res.output
    assert {k: getattr(seen["track"], k) for k in want} == want


def _spy_open_backend(monkeypatch) -> list:
    """Every backend the registry opens from now on, with the ``threads`` it was opened with."""
    from imedsam_deploy import backends as bk

    opened = []
    real = bk.open_backend

    def spy(*a, **k):
        be, how = real(*a, **k)
        opened.append((k.get("threads"), be))
        return be, how

    monkeypatch.setattr(bk, "open_backend", spy)
    return opened


def test_cli_threads_reach_the_backend_and_a_bad_count_is_refused(tmp_path, monkeypatch):

    img = next((SAMPLE_DATA / "images").glob("*.jpg"))
    res = CliRunner().invoke(app, [str(img), "--box", "1,1,50,50", "--out", str(tmp_path / "bad"), "--threads", "0"])
    assert res.exit_code == 2 and res.output.startswith("error: --threads 0: must be at least 1")
    assert not (tmp_path / "bad").exists()
    opened = _spy_open_backend(monkeypatch)
    res = CliRunner().invoke(app, [str(img), "--box", "1,1,50,50", "--out", str(tmp_path / "out"), "--threads", "1",
                                   "--backend", "ort-cpu", "-q"])
    assert res.exit_code == 0, res.output
    (threads, be), = opened
    assert threads == 1 and all(s.get_session_options().intra_op_num_threads == 1 for s in be.sessions.values())


def test_torch_cuda_runs_the_checkpoint_given_as_a_backend_option(tmp_path, monkeypatch):
    """``checkpoint=PATH`` stands in for the manifest's source checkpoint (the artifact here names none)."""
    from imedsam_cuda import torch_cuda
    from imedsam_deploy import backends as bk

    monkeypatch.setattr(torch_cuda, "_no_cuda_reason", lambda: None)  # as on a GPU machine
    art = load_artifact(_hand_made(tmp_path / "a"))
    ck = tmp_path / "weights.pt"
    ck.write_bytes(b"weights")
    assert "--backend-option checkpoint=PATH" in bk.probe("torch-cuda", art)
    assert bk.probe("torch-cuda", art, {"checkpoint": str(ck)}) is None
    assert torch_cuda.source_checkpoint(art, ck) == ck and torch_cuda.source_checkpoint(art) is None
    assert bk.parse_options("torch-cuda", {"compile": "on", "tuned": "0", "checkpoint": str(ck)}) == {
        "compile": True, "tuned": False, "checkpoint": ck}


def test_serve_refuses_bad_backend_options_before_it_starts(tmp_path):
    from imedsam_deploy.cli_serve import app as serve_app

    art = _hand_made(tmp_path / "a")
    for args, msg in ((["--backend", "ort-cpu", "--backend-option", "tuned=0"], "backend ort-cpu takes no options"),
                      (["--backend", "torch-cuda", "--backend-option", "fast=1"], "backend torch-cuda takes compile")):
        res = CliRunner().invoke(serve_app, [str(art), *args])
        assert res.exit_code == 2 and res.output.startswith(f"error: --backend-option {args[-1]}: {msg}"), res.output
        assert len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(serve_app, [str(art), "--threads", "0"])
    assert res.exit_code == 2 and res.output.startswith("error: --threads 0: must be at least 1"), res.output


def test_serve_passes_threads_to_the_backend(tmp_path, monkeypatch):
    """What ``imedsam-serve --threads`` opens the backend with (the server itself replaced: it needs PyTriton)."""
    from imedsam_deploy import serve
    from imedsam_deploy.cli_serve import serve_artifact

    opened = _spy_open_backend(monkeypatch)
    monkeypatch.setattr(serve, "Server", lambda svc, cfg: type("NoServer", (), {"serve": lambda self: None})())
    from rich.console import Console

    from imedsam_core.paths import SHIPPED_ARTIFACT

    serve_artifact(SHIPPED_ARTIFACT, "ort-cpu", None, serve.ServerConfig(queue_delay_us=0), "sparse", 4, 4, 60.0,
                   Console(file=io.StringIO()), None, False, 1)
    (threads, be), = opened
    assert threads == 1 and all(s.get_session_options().intra_op_num_threads == 1 for s in be.sessions.values())


def test_chunk_coords_are_the_region_coords_piecewise():
    from imedsam_deploy.preprocess import region_chunk_coords

    r = Region(3, 5, 40, 77)
    full = region_coords(r, 50, 90)
    parts = np.concatenate([region_chunk_coords(r, 50, 90, s, min(r.size, s + 101)) for s in range(0, r.size, 101)])
    assert np.array_equal(full, parts)


def test_mirrored_average_mirrors_the_second_region_back_and_keeps_the_first_where_it_does_not_reach():
    from imedsam_deploy.preprocess import Region
    from imedsam_deploy.runtime import ObjectMask, mirrored_average

    ow = 20
    rng = np.random.default_rng(0)
    a = ObjectMask(np.zeros(4), (10, ow), Region(2, 3, 8, 12), rng.normal(size=(1, 6, 9)).astype(np.float32), 54)
    # the mirrored box's region one column narrower on its left: original columns 3 .. 10 (ow - 11 .. ow - 3)
    b = ObjectMask(np.zeros(4), (10, ow), Region(2, 9, 8, 17), rng.normal(size=(1, 6, 8)).astype(np.float32), 48)
    m = mirrored_average(a, b)
    assert m.region == a.region and m.queried == 102
    full_b = np.full((10, ow), np.nan, np.float32)
    full_b[2:8, 9:17] = b.logits[0]
    back = full_b[:, ::-1][2:8, 3:12]  # b mirrored into a's region
    want = np.where(np.isnan(back), a.logits[0], (a.logits[0] + back) / 2)
    np.testing.assert_allclose(m.logits[0], want, rtol=0, atol=1e-6)
    assert np.isnan(back[:, -1]).all() and np.array_equal(m.logits[0][:, -1], a.logits[0][:, -1])


def test_opt_in_precisions_come_from_the_backend_modules():
    """What ``imedsam-bench`` times beside a backend's default with no --precision: the stored int8 encoders, each
    named by the backend that runs it, only where the artifact holds it and only on the CPU."""
    from types import SimpleNamespace

    from imedsam_core import contract as C
    from imedsam_deploy import backends as bk

    both = SimpleNamespace(graphs={"fp32": {}, "int8": {}, C.OV_INT8: {}})
    plain = SimpleNamespace(graphs={"fp32": {}})
    assert bk.opt_in_precisions("ort-cpu", both) == ("int8",)
    assert bk.opt_in_precisions("ort-cuda", both) == ()  # ORT's int8 encoder is the CPU provider's
    assert bk.opt_in_precisions("ov-cpu", both) == ("int8",)
    assert bk.opt_in_precisions("ort-cpu", plain) == bk.opt_in_precisions("ov-cpu", plain) == ()
    assert bk.opt_in_precisions("tensorrt", both) == ()  # declares none


@pytest.mark.parametrize("names", [(), ("a.png", "b.jpg", "7.png")])
def test_unmatched_keys_are_exactly_those_lookup_never_returns(names):
    """``unmatched`` (the refusal) and ``lookup`` (the use) agree on which --boxes keys name a frame."""
    count = len(names) or 3
    keys: list = [0, 2, 3, -1, 7, "a.png", "a", "b", "b.png", "7", "nope.jpg"]
    for key in keys:
        table = {key: {0: np.array([1.0, 1, 5, 5])}}
        used = any(lookup(table, i, names[i] if names else None) for i in range(count))
        assert (unmatched(table, count, names) is None) == used, key
        assert unmatched(table, None) == (None if isinstance(key, int) and key >= 0 else key)
