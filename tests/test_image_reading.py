"""The runtime reads an image file into the same 8-bit RGB pixels as training and evaluation do.

Training reads with Pillow/tifffile, the runtime with OpenCV. Before the shared rule (``imedsam_core.pixels``),
OpenCV's IMREAD_COLOR kept the top byte of 16-bit pixels, so a CT slice stored in 16 bits (values up to ~2000)
reached the model as a handful of grey levels, and it refused float TIFFs that training reads.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from imedsam_core.errors import UserError
from imedsam_core.pixels import to_uint8
from imedsam_deploy.video import read_image as runtime_read
from imedsam_train.data.io import read_image as train_read
from tests.conftest import SAMPLE_DATA

IMAGE = sorted((SAMPLE_DATA / "images").glob("*.jpg"))[0]


def _ct_like(seed: int = 0) -> np.ndarray:
    """A smooth 12-bit slice (0 .. ~1800, as CT stored with a +1024 offset): 64 x 80."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:80]
    body = ((yy - 32) ** 2 / 28**2 + (xx - 40) ** 2 / 36**2) < 1
    return (body * (1000 + 30 * xx) + rng.integers(0, 40, (64, 80))).astype(np.uint16)


def _files(d: Path) -> dict[str, Path]:
    bgr = cv2.imread(str(IMAGE))
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    ct = _ct_like()
    out = {"sample.jpg": IMAGE}  # JPEG: Pillow and OpenCV decode it to the same pixels

    def put(name: str, write) -> None:
        out[name] = d / name
        write(out[name])

    put("rgb.png", lambda p: cv2.imwrite(str(p), bgr))
    put("grey.png", lambda p: cv2.imwrite(str(p), grey))
    put("rgba.png", lambda p: cv2.imwrite(str(p), np.dstack([bgr, np.full(grey.shape, 90, np.uint8)])))
    put("palette.png", lambda p: Image.fromarray(bgr[..., ::-1]).convert("P").save(p))
    put("bilevel.png", lambda p: Image.fromarray(grey > 100).save(p))
    put("rgb16.png", lambda p: cv2.imwrite(str(p), bgr.astype(np.uint16) * 257))
    put("ct16.png", lambda p: cv2.imwrite(str(p), ct))
    put("ct16.tif", lambda p: tifffile.imwrite(p, ct))
    put("float01.tif", lambda p: tifffile.imwrite(p, (grey / 255.0).astype(np.float32)))
    put("hu.tif", lambda p: tifffile.imwrite(p, ct.astype(np.float32) - 1024))
    put("hu_int16.tif", lambda p: tifffile.imwrite(p, ct.astype(np.int16) - 1024))
    return out


def test_runtime_reads_the_pixels_training_reads(tmp_path):
    files = _files(tmp_path)
    for name, path in files.items():
        want, got = train_read(path), runtime_read(path)
        assert got.dtype == np.uint8 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    # the 12-bit slice keeps its grey levels (the top byte alone left it 8: 0 .. 7)
    ct = runtime_read(files["ct16.png"])
    assert ct.max() == 255 and len(np.unique(ct)) > 150
    # and the same slice as float HU with negative values, or signed 16-bit, is the same picture up to rounding
    assert np.abs(runtime_read(files["hu.tif"]).astype(int) - ct).max() <= 1
    np.testing.assert_array_equal(runtime_read(files["hu_int16.tif"]), runtime_read(files["hu.tif"]))
    # 8-bit files as before: the 16-bit copy of an 8-bit image (x 257) is that image, alpha is dropped
    rgb = runtime_read(files["rgb.png"])
    for name in ("rgb16.png", "rgba.png"):
        np.testing.assert_array_equal(runtime_read(files[name]), rgb, err_msg=name)


def test_to_uint8_rule():
    np.testing.assert_array_equal(to_uint8(np.array([False, True])), [0, 255])
    np.testing.assert_array_equal(to_uint8(np.array([0.0, 0.5, 1.0])), [0, 128, 255])
    np.testing.assert_array_equal(to_uint8(np.arange(256, dtype=np.uint16) * 257), np.arange(256))
    np.testing.assert_array_equal(to_uint8(np.array([0, 1000, 2000], np.uint16)), [0, 127, 255])
    np.testing.assert_array_equal(to_uint8(np.array([-1000.0, 0.0, 1000.0])), [0, 128, 255])
    np.testing.assert_array_equal(to_uint8(np.array([3, 200], np.int32)), [3, 200])  # within 0..255: as it is
    flat = np.full((4, 4), -7, np.int16)
    assert (to_uint8(flat) == 0).all()  # one value below zero: no division by zero


def test_nonfinite_float_image_is_refused_by_both(tmp_path):
    p = tmp_path / "nan.tif"
    a = np.zeros((8, 8), np.float32)
    a[2, 3] = np.nan
    tifffile.imwrite(p, a)
    for read in (train_read, runtime_read):
        with pytest.raises(UserError, match=r"nan\.tif: 1 NaN or infinite"):
            read(p)


def test_window_on_a_16bit_slice_gives_the_volume_path_picture(shipped_artifact, tmp_path, shared_data):
    """A CT slice as a 16-bit PNG with the usual +1024 offset, given ``--window 1064,400``, is segmented on the
    same picture as that slice of the NIfTI volume under its default CT window (40,400): same overlay, same mask."""
    import nibabel as nib
    from typer.testing import CliRunner

    from imedsam_deploy.cli_infer import app

    volume = shared_data / "ct-volume-totalseg" / "images" / "example_ct_sm.nii.gz"
    z, box = 15, "45,26,105,85"
    png = tmp_path / "slice.png"
    hu = np.asarray(nib.load(str(volume)).dataobj)[:, :, z].T  # (Y, X), as imedsam-infer shows slice z
    assert hu.min() < -500 and np.array_equal(hu, np.round(hu))  # HU, integers: exactly representable offset
    # (air below -1024 HU, which a +1024 offset cannot store, clipped to 0: black under the window either way)
    assert cv2.imwrite(str(png), np.clip(hu + 1024, 0, None).astype(np.uint16))

    def infer(inp: Path, out: Path, *extra: str) -> None:
        res = CliRunner().invoke(app, [str(inp), *extra, "--artifact", str(shipped_artifact), "--out", str(out),
                                       "--backend", "ort-cpu", "-q"])
        assert res.exit_code == 0, res.output

    boxes = tmp_path / "slices.csv"
    boxes.write_text(f"frame,x0,y0,x1,y1\n{z},{box}\n")
    infer(volume, tmp_path / "vol", "--boxes", str(boxes))
    infer(png, tmp_path / "win", "--box", box, "--window", "1064,400")
    infer(png, tmp_path / "own", "--box", box)
    read = lambda p: cv2.imread(str(p), cv2.IMREAD_UNCHANGED)  # noqa: E731
    vol_overlay = read(tmp_path / "vol" / "overlay" / f"slice_{z:04d}.png")
    win_overlay = read(tmp_path / "win" / "overlay" / "slice.png")
    np.testing.assert_array_equal(win_overlay, vol_overlay)
    vol_mask = np.asarray(nib.load(str(tmp_path / "vol" / "mask.nii.gz")).dataobj)[:, :, z].T > 0
    win_mask = read(tmp_path / "win" / "masks" / "slice.png") > 0
    assert vol_mask.any() and np.array_equal(win_mask, vol_mask)
    # without the window the PNG is its own range: another picture
    assert not np.array_equal(read(tmp_path / "own" / "overlay" / "slice.png"), win_overlay)


def test_window_refused_for_video(tmp_path):
    from typer.testing import CliRunner

    from imedsam_deploy.cli_infer import app
    from tests.conftest import cut_video
    from tests.reliability_helpers import assert_nothing_left, assert_one_line_error

    video, out = cut_video(tmp_path / "clip.avi", 2), tmp_path / "out"
    res = CliRunner().invoke(app, [str(video), "--box", "10,10,60,60", "--window", "40,400", "--out", str(out)])
    assert_one_line_error(res, "--window", "clip.avi", "video")
    assert_nothing_left(out)


@pytest.mark.parametrize("stored", ["as shipped", "flipped"])
def test_training_slices_are_the_runtime_slices(shared_data, tmp_path, stored):
    """``imedsam-train bcv`` / ``imedsam-eval`` and ``imedsam-infer`` show a volume's slice z to the model as the same
    picture, with the labels on the same pixels: the real CT volume (RAS; training's old radiological flip showed it
    turned 180 degrees, and under TransUNet's window), and the same volume stored with its first two axes reversed."""
    import nibabel as nib

    from imedsam_deploy.volume import load_volume
    from imedsam_train.data.volumes import volume_records

    root = shared_data / "ct-volume-totalseg"
    image, label = root / "images" / "example_ct_sm.nii.gz", root / "masks" / "example_seg.nii.gz"
    if stored == "flipped":
        for src in (image, label):
            img = nib.load(str(src))
            flip = np.diag([-1.0, -1.0, 1.0, 1.0])
            flip[:2, 3] = [s - 1 for s in img.shape[:2]]
            nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[::-1, ::-1], img.affine @ flip, img.header),
                     tmp_path / src.name)
        image, label = tmp_path / image.name, tmp_path / label.name
    lab = np.asarray(nib.load(str(label)).dataobj).astype(int)
    vol = load_volume(image)
    recs = volume_records(image, label, {5: 0, 1: 1}, "ts")  # two organs of the TotalSegmentator labels
    assert len(recs) >= 10
    for rec in recs:
        z = int(rec.stem.rsplit("_z", 1)[1])
        sample = rec.load()
        np.testing.assert_array_equal(sample.image, vol.slice_rgb(z), err_msg=rec.stem)
        for cls, m in sample.masks:
            value = (5, 1)[cls]
            np.testing.assert_array_equal(m, np.equal(lab[:, :, z].T, value), err_msg=rec.stem)


def test_looks_grey():
    from imedsam_core.pixels import looks_grey

    colour = runtime_read(IMAGE)
    grey = np.repeat(cv2.cvtColor(colour, cv2.COLOR_RGB2GRAY)[:, :, None], 3, axis=2)
    assert looks_grey(grey) and not looks_grey(colour)
    noisy = np.clip(grey.astype(int) + np.random.default_rng(0).integers(-3, 4, grey.shape), 0, 255).astype(np.uint8)
    assert looks_grey(noisy)  # chroma noise of a compressed grey picture
    tinted = grey.copy()
    tinted[..., 0] = np.clip(grey[..., 0].astype(int) + 10, 0, 255)  # a grey picture with a red cast is colour
    assert not looks_grey(tinted)
    black = np.zeros_like(colour)
    black[:5, :5] = 200  # a black frame with a speck of light: too little to judge, so not grey
    assert not looks_grey(black)
