"""Bad input through every command: boxes, images, videos, volumes, checkpoints, artifacts, data
folders and output paths, hand-made and generated. Each must end with one ``error:`` line naming the input and
the problem, exit 2, leave no output behind, and never hang (subprocesses run under a timeout)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from imedsam_core.errors import UserError
from imedsam_deploy.boxes import load_boxes_file, parse_box
from imedsam_deploy.cli_bench import app as bench_app
from imedsam_deploy.cli_infer import app as infer_app
from imedsam_export.cli import app as export_app
from imedsam_train.cli import app as train_app
from imedsam_train.eval_cli import app as eval_app
from tests.conftest import REPO
from tests.reliability_helpers import (
    GOOD_BOX,
    IMAGE,
    SAMPLE_DATA,
    SAMPLE_IMAGES,
    VIDEO,
    assert_nothing_left,
    assert_one_line_error,
    console_script,
    garbage,
    png_header_only,
    tiny_artifact,
    tiny_checkpoint,
    truncated,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    return tiny_artifact(tmp_path_factory)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


def _infer(inp: Path | str, art: Path, out: Path, *extra: str):
    return runner.invoke(infer_app, [str(inp), *extra, "--artifact", str(art), "--out", str(out),
                                     "--backend", "ort-cpu", "-q"])


# ------------------------------------------------------------------ boxes

BAD_BOXES = [
    ("nan,10,50,60", "finite"), ("10,nan,50,60", "finite"), ("inf,10,50,60", "finite"), ("10,10,-inf,60", "finite"),
    ("1e400,10,50,60", "finite"), ("-5,10,50,60", "outside"), ("10,-0.5,50,60", "outside"),
    ("50,60,10,10", "area"), ("50,10,10,60", "area"), ("10,10,10,60", "area"), ("10,60,50,60", "area"),
    ("0,0,321,100", "outside"), ("0,0,100,255", "outside"), ("400,300,500,400", "outside"),
    ("1,2,3", "four numbers"), ("1,2,3,4,5", "four numbers"), ("a,b,c,d", "four numbers"), ("", "four numbers"),
    ("1;2;3;4", "four numbers"), ("10,10,20,20,", "four numbers"), ("[1,2,3,4]", "four numbers"),
]


@pytest.mark.parametrize(("box", "problem"), BAD_BOXES)
def test_infer_refuses_bad_box(art, tmp_path, box, problem):
    out = tmp_path / "out"
    assert_one_line_error(_infer(IMAGE, art, out, "--box", box), "--box", problem)
    assert_nothing_left(out)


@pytest.mark.parametrize(("box", "problem"), [b for b in BAD_BOXES if b[0].count(",") == 3 and "[" not in b[0]])
def test_bench_refuses_bad_box(art, tmp_path, box, problem):
    out = tmp_path / "bench"
    res = runner.invoke(bench_app, [str(art), "-b", "ort-cpu", "--image", str(IMAGE), "--box", box, "--repeat", "1",
                                    "--warmup", "0", "--out", str(out)])
    assert_one_line_error(res, IMAGE.name if problem not in ("four numbers",) else "--box")
    assert_nothing_left(out)


_finite = st.floats(allow_nan=False, allow_infinity=False, width=32)
_any = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def invalid_boxes(draw) -> str:
    """Box strings that are wrong in one of several ways (every one must be refused before inference)."""
    kind = draw(st.sampled_from(["nonfinite", "reversed", "outside", "count", "text"]))
    if kind == "nonfinite":
        vals = [draw(_finite) for _ in range(4)]
        vals[draw(st.integers(0, 3))] = draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
        return ",".join(repr(v) for v in vals)
    if kind == "reversed":
        x0, y0 = draw(st.floats(0, 320)), draw(st.floats(0, 254))
        x1, y1 = draw(st.floats(0, 320)), draw(st.floats(0, 254))
        if draw(st.booleans()):
            x1 = min(x1, x0)
        else:
            y1 = min(y1, y0)
        return f"{x0!r},{y0!r},{x1!r},{y1!r}"
    if kind == "outside":
        x0, y0 = draw(st.floats(-1e6, 300)), draw(st.floats(-1e6, 240))
        x1, y1 = x0 + draw(st.floats(1, 1e6)), y0 + draw(st.floats(1, 1e6))
        if x0 >= 0 and y0 >= 0 and x1 <= 320 and y1 <= 254:
            x1 = 320 + draw(st.floats(0.01, 100))
        return f"{x0!r},{y0!r},{x1!r},{y1!r}"
    if kind == "count":
        n = draw(st.sampled_from([0, 1, 2, 3, 5, 6, 8]))
        return ",".join(repr(draw(_any)) for _ in range(n))
    return draw(st.text(max_size=30).filter(lambda s: s.count(",") != 3))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(box=invalid_boxes())
def test_infer_refuses_generated_bad_boxes(art, tmp_path, box):
    out = tmp_path / "out"
    assert_one_line_error(_infer(IMAGE, art, out, "--box", box))
    assert_nothing_left(out)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=40))
def test_box_parser_only_raises_user_errors(text):
    try:
        b = parse_box(text)
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert b.shape == (4,) and np.isfinite(b).all() and b[2] > b[0] and b[3] > b[1]


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 10) | st.floats() | st.text(max_size=4),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=3), kids, max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=_json)
@example(doc={"0": 5})  # once-known failures, kept so they are always tried
@example(doc={"0": {"a": 1}})
@example(doc=[{"frame": 0, "box": [1, 1, 5, 5], "object": "x"}])
@example(doc={"0": [[[1, 1, 5, 5]]]})
def test_boxes_file_parser_only_raises_user_errors(tmp_path, doc):
    p = tmp_path / "b.json"
    p.write_text(json.dumps(doc))
    try:
        table = load_boxes_file(p)
    except UserError as e:
        assert "\n" not in str(e) and str(p) in str(e)
        return
    for boxes in table.values():
        for b in boxes.values():
            assert b.shape == (4,) and np.isfinite(b).all()


BAD_BOX_FILES = [
    ("a.json", "{", "not valid JSON"), ("b.json", "[1, 2]", "record 0"), ("c.json", '{"0": [[1, 2, "x", 4]]}', "four"),
    ("d.json", '{"0": [[NaN, 1, 5, 5]]}', "finite"), ("e.json", "null", "expected"),
    ("f.csv", "", "empty"), ("g.csv", "frame,x0,y0,x1,y1\n0,1,1\n", "line 2"),
    ("h.csv", "frame,x0,y0,x1,y1\n0,1,1,nan,5\n", "finite"), ("i.csv", "frame,x0,y0,x1,y1\n0,9,9,1,1\n", "area"),
    ("j.csv", "frame,x0,y0,x1,y1,object\n0,1,1,5,5,one\n", "malformed"), ("k.csv", "a,b\n1,2\n", "columns"),
    ("l.json", '{"0": [[1, 1, 5000, 5]]}', "outside"),
]
BAD_BOX_FILES_BUGGY = [
    ("m.json", '{"0": 5}'), ("n.json", '{"0": {"a": 1}}'), ("o.json", '[{"frame": 0, "box": [1, 1, 5, 5], "object": "x"}]'),
    ("p.json", '{"0": [[[1, 1, 5, 5]]]}'), ("q.json", '[{"frame": [0], "box": [1, 1, 5, 5]}]'),
    ("r.json", '[{"frame": 0, "box": [[1, 1, 5, 5]]}]'), ("s.json", '{"0": [1, 1, true, 5]}'),
]


@pytest.mark.parametrize(("name", "text", "problem"), BAD_BOX_FILES)
def test_infer_refuses_bad_boxes_file(art, tmp_path, name, text, problem):
    f = tmp_path / name
    f.write_text(text)
    out = tmp_path / "out"
    assert_one_line_error(_infer(IMAGE, art, out, "--boxes", str(f)), problem)
    assert_nothing_left(out)


@pytest.mark.parametrize(("name", "text"), BAD_BOX_FILES_BUGGY)
def test_infer_refuses_wrongly_shaped_json_boxes(art, tmp_path, name, text):
    f = tmp_path / name
    f.write_text(text)
    out = tmp_path / "out"
    assert_one_line_error(_infer(IMAGE, art, out, "--boxes", str(f)), name)
    assert_nothing_left(out)


# ------------------------------------------------------------------ images, videos, volumes

def _jpeg() -> bytes:
    return IMAGE.read_bytes()


def _png() -> bytes:
    return cv2.imencode(".png", cv2.imread(str(IMAGE)))[1].tobytes()


def _tiff() -> bytes:
    return cv2.imencode(".tif", cv2.imread(str(IMAGE)))[1].tobytes()


def _nifti(tmp: Path, name: str, shape=(40, 36, 3)) -> Path:
    p = tmp / name
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random(shape).astype(np.float32), np.eye(4)), str(p))
    return p


BAD_FILES = {
    "empty.png": lambda: b"", "empty.jpg": lambda: b"",
    "trunc.jpg": lambda: truncated(_jpeg()), "garbage.jpg": lambda: garbage(5000, 1, b"\xff\xd8\xff\xe0"),
    "trunc.png": lambda: truncated(_png()), "garbage.png": lambda: garbage(3000, 2, b"\x89PNG\r\n\x1a\n"),
    "trunc.tif": lambda: truncated(_tiff()), "garbage.tiff": lambda: garbage(3000, 3, b"II*\x00"),
    "huge.png": lambda: png_header_only(12000, 12000),
    "empty.mp4": lambda: b"", "trunc.mp4": lambda: truncated(VIDEO.read_bytes()[:200_000], 0.02),
    "garbage.mp4": lambda: garbage(20000, 4), "garbage.avi": lambda: garbage(20000, 5, b"RIFF"),
    "garbage.nii.gz": lambda: garbage(2000, 6), "garbage.nii": lambda: garbage(2000, 7),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_infer_refuses_unreadable_input(art, tmp_path, name):
    f = tmp_path / name
    f.write_bytes(BAD_FILES[name]())
    out = tmp_path / "out"
    assert_one_line_error(_infer(f, art, out, "--box", "1,1,5,5"), name)
    assert_nothing_left(out)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_infer_refuses_truncated_nifti(art, tmp_path, suffix):
    good = _nifti(tmp_path, f"good{suffix}")
    bad = tmp_path / f"trunc{suffix}"
    bad.write_bytes(truncated(good.read_bytes(), 0.3))
    out = tmp_path / "out"
    assert_one_line_error(_infer(bad, art, out, "--box", "1,1,5,5"), bad.name)
    assert_nothing_left(out)


def test_infer_refuses_nifti_that_is_not_a_volume_and_boxes_outside_slices(art, tmp_path):
    flat = _nifti(tmp_path, "flat.nii.gz", shape=(40, 36))
    out = tmp_path / "out"
    assert_one_line_error(_infer(flat, art, out, "--box", "1,1,5,5"), "flat.nii.gz", "3-D")
    vol = _nifti(tmp_path, "vol.nii.gz")
    assert_one_line_error(_infer(vol, art, out, "--box", "1,1,41,5"), "vol.nii.gz", "outside")
    bfile = tmp_path / "slices.csv"
    bfile.write_text("frame,x0,y0,x1,y1\n7,1,1,5,5\n")  # the volume has slices 0..2
    assert_one_line_error(_infer(vol, art, out, "--boxes", str(bfile)), "vol.nii.gz", "slice")
    # the mask keeps the voxel grid: another --out-size is refused before the artifact loads (no "using" line)
    res = _infer(vol, art, out, "--box", "1,1,5,5", "--out-size", "64")
    assert_one_line_error(res, "vol.nii.gz", "--out-size")
    assert "using " not in res.output
    assert_nothing_left(out)


def test_infer_refuses_missing_input_folder_artifact_and_empty_folder(art, tmp_path):
    out = tmp_path / "out"
    assert_one_line_error(_infer(tmp_path / "nope.png", art, out, "--box", GOOD_BOX), "nope.png", "does not exist")
    assert_one_line_error(_infer(tmp_path / "nodir", art, out, "--box", GOOD_BOX), "nodir")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(_infer(empty, art, out, "--box", GOOD_BOX), "empty", "no images")
    assert_one_line_error(_infer(IMAGE, tmp_path / "noart", out, "--box", GOOD_BOX), "noart", "does not exist")
    assert_one_line_error(_infer(IMAGE, empty, out, "--box", GOOD_BOX), "manifest")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_one_line_error(_infer(IMAGE, a_file, out, "--box", GOOD_BOX), "a_file", "not a folder")
    assert_one_line_error(_infer(IMAGE, art, out, "--boxes", str(tmp_path / "nope.csv")), "nope.csv")
    assert_nothing_left(out)


@pytest.mark.parametrize(("option", "value"), [
    ("--max-growth", "0.5"), ("--max-growth", "-1"), ("--max-growth", "nan"), ("--max-growth", "inf"),
    ("--margin", "-0.1"), ("--margin", "nan"), ("--chunk", "0"), ("--query", "dense"),
    ("--min-confidence", "1.5"), ("--min-confidence", "nan"), ("--track-core", "0.6"), ("--track-core", "-0.1"),
    ("--track-core", "nan"), ("--search", "1"), ("--search", "-0.1"), ("--search", "nan"),
])
def test_infer_refuses_bad_options(art, tmp_path, option, value):
    out = tmp_path / "out"
    assert_one_line_error(_infer(IMAGE, art, out, "--box", GOOD_BOX, option, value), option, value)
    assert_nothing_left(out)


def test_infer_folder_with_one_bad_image_writes_nothing(art, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for img in SAMPLE_IMAGES[:2]:
        shutil.copy(img, folder / img.name)
    (folder / "zz_broken.jpg").write_bytes(truncated(_jpeg()))
    out = tmp_path / "out"
    assert_one_line_error(_infer(folder, art, out, "--box", GOOD_BOX), "zz_broken.jpg")
    assert_nothing_left(out)


def _gray(tmp: Path) -> Path:
    p = tmp / "gray.png"
    cv2.imwrite(str(p), cv2.imread(str(IMAGE), cv2.IMREAD_GRAYSCALE))
    return p


def _rgba(tmp: Path) -> Path:
    p = tmp / "rgba.png"
    bgra = cv2.cvtColor(cv2.imread(str(IMAGE)), cv2.COLOR_BGR2BGRA)
    bgra[..., 3] = 90
    cv2.imwrite(str(p), bgra)
    return p


def _sixteen(tmp: Path) -> Path:
    p = tmp / "sixteen.png"
    cv2.imwrite(str(p), cv2.imread(str(IMAGE)).astype(np.uint16) * 257)
    return p


def _sixteen_gray(tmp: Path) -> Path:
    p = tmp / "sixteen_gray.tif"
    cv2.imwrite(str(p), cv2.imread(str(IMAGE), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 257)
    return p


@pytest.mark.parametrize("make", [_gray, _rgba, _sixteen, _sixteen_gray], ids=["gray", "rgba", "16bit", "16bit-gray"])
def test_infer_accepts_unusual_but_valid_images(art, tmp_path, make):
    """Grey, RGBA and 16-bit files are images: segmented like the 8-bit RGB original (same mask)."""
    ref_out, out = tmp_path / "ref", tmp_path / "out"
    p = make(tmp_path)
    res = _infer(p, art, out, "--box", GOOD_BOX)
    assert res.exit_code == 0, res.output
    mask = cv2.imread(str(out / "masks" / f"{p.stem}.png"), cv2.IMREAD_GRAYSCALE)
    assert mask is not None and mask.shape == (254, 320)
    if make in (_rgba, _sixteen):  # same pixels as the original once read as 8-bit RGB
        assert _infer(IMAGE, art, ref_out, "--box", GOOD_BOX).exit_code == 0
        ref = cv2.imread(str(ref_out / "masks" / f"{IMAGE.stem}.png"), cv2.IMREAD_GRAYSCALE)
        assert np.array_equal(mask, ref)


def test_infer_one_pixel_image(art, tmp_path):
    p = tmp_path / "one.png"
    cv2.imwrite(str(p), np.full((1, 1, 3), 120, np.uint8))
    out = tmp_path / "out"
    assert_one_line_error(_infer(p, art, out, "--box", "0,0,2,2"), "one.png", "outside the 1x1")
    assert_nothing_left(out)
    res = _infer(p, art, out, "--box", "0,0,1,1")
    assert res.exit_code == 0, res.output
    assert cv2.imread(str(out / "masks" / "one.png"), cv2.IMREAD_GRAYSCALE).shape == (1, 1)


def test_infer_large_real_image(art, tmp_path):
    """A real 4000 x 3000 image (cheap: one colour): the mask has its size; memory stays bounded by chunking."""
    p = tmp_path / "large.jpg"
    big = np.full((3000, 4000, 3), 90, np.uint8)
    cv2.circle(big, (2000, 1500), 400, (40, 60, 200), -1)
    cv2.imwrite(str(p), big)
    out = tmp_path / "out"
    res = _infer(p, art, out, "--box", "1500,1000,2500,2000", "--out-size", "400")
    assert res.exit_code == 0, res.output
    assert cv2.imread(str(out / "masks" / "large.png"), cv2.IMREAD_GRAYSCALE).shape == (300, 400)


# ------------------------------------------------------------------ unwritable outputs

@pytest.fixture
def a_file(tmp_path) -> Path:
    """A regular file: a path under it cannot be created, even by root (chmod does not stop root)."""
    f = tmp_path / "a_file"
    f.write_text("not a folder")
    return f


def test_infer_refuses_output_that_is_a_file(art, a_file):
    assert_one_line_error(_infer(IMAGE, art, a_file, "--box", GOOD_BOX), "a_file")
    assert a_file.read_text() == "not a folder"


def test_infer_refuses_output_under_a_file(art, a_file):
    assert_one_line_error(_infer(IMAGE, art, a_file / "out", "--box", GOOD_BOX), "a_file")


def test_export_refuses_output_under_a_file(ckpt, a_file):
    res = runner.invoke(export_app, [str(ckpt), "--out", str(a_file / "art"), "--no-verify", "--max-points", "1024"])
    assert_one_line_error(res, "a_file")


def test_eval_refuses_json_under_a_file(ckpt, a_file, tmp_path):
    split = tmp_path / "one.txt"
    split.write_text(SAMPLE_IMAGES[0].stem + "\n")
    res = runner.invoke(eval_app, [str(ckpt), "--data", str(SAMPLE_DATA), "--split", str(split),
                                   "--json", str(a_file / "r.json")])
    assert_one_line_error(res, "a_file")


def test_bench_refuses_output_under_a_file(art, a_file):
    res = runner.invoke(bench_app, [str(art), "-b", "ort-cpu", "--query", "box", "--repeat", "1", "--warmup", "0",
                                    "--out", str(a_file / "bench")])
    assert_one_line_error(res, "a_file")


def test_train_refuses_runs_folder_that_is_a_file(tmp_path, monkeypatch):
    d = _data_copy(tmp_path, splits=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("not a folder")
    res = runner.invoke(train_app, ["folder", str(d), "--model", "tiny", "--input-size", "64", "--epochs", "1", "--points", "64",
                                    "--workers", "0", "--threads", "1", "--name", "r"])
    assert (tmp_path / "runs").read_text() == "not a folder"
    assert_one_line_error(res, "runs")


# ------------------------------------------------------------------ checkpoints (eval, export)

def _bad_checkpoints(tmp: Path, good: Path) -> dict[str, tuple[Path, str]]:
    raw = good.read_bytes()
    ck = torch.load(good, weights_only=True)
    out: dict[str, tuple[Path, str]] = {}

    def put(name: str, data: bytes, problem: str) -> None:
        (tmp / name).write_bytes(data)
        out[name] = (tmp / name, problem)

    put("empty.pt", b"", "truncated")
    put("trunc.pt", truncated(raw, 0.5), "truncated")
    put("garbage.pt", garbage(4000, 8), "")
    put("text.pt", b"hello, I am not a checkpoint\n", "")
    torch.save({"a": 1}, tmp / "other.pt")
    out["other.pt"] = (tmp / "other.pt", "not an imedsam checkpoint")
    torch.save({**ck, "model": {k: v[..., :1] if v.ndim else v for k, v in ck["model"].items()}}, tmp / "shape.pt")
    out["shape.pt"] = (tmp / "shape.pt", "wrong shape")
    torch.save({**ck, "config": "vit_b"}, tmp / "noconfig.pt")
    out["noconfig.pt"] = (tmp / "noconfig.pt", "config")
    return out


@pytest.fixture(scope="module")
def bad_ckpts(tmp_path_factory, ckpt) -> dict[str, tuple[Path, str]]:
    return _bad_checkpoints(tmp_path_factory.mktemp("badck"), ckpt)


BAD_CK_NAMES = ["empty.pt", "trunc.pt", "garbage.pt", "text.pt", "other.pt", "shape.pt", "noconfig.pt"]


@pytest.mark.parametrize("name", BAD_CK_NAMES)
def test_eval_refuses_bad_checkpoint(bad_ckpts, tmp_path, name):
    path, problem = bad_ckpts[name]
    res = runner.invoke(eval_app, [str(path), "--data", str(SAMPLE_DATA), "--json", str(tmp_path / "o" / "r.json")])
    assert_one_line_error(res, name, problem)
    assert_nothing_left(tmp_path / "o")


@pytest.mark.parametrize("name", BAD_CK_NAMES)
def test_export_refuses_bad_checkpoint(bad_ckpts, tmp_path, name):
    path, problem = bad_ckpts[name]
    out = tmp_path / "art"
    res = runner.invoke(export_app, [str(path), "--out", str(out), "--no-verify"])
    assert_one_line_error(res, name, problem)
    assert_nothing_left(out)


def test_checkpoint_with_invalid_config_is_named(ckpt, tmp_path):
    ck = torch.load(ckpt, weights_only=True)
    bad = tmp_path / "badcfg.pt"
    torch.save({**ck, "config": {**ck["config"], "input_size": -3}}, bad)
    res = runner.invoke(export_app, [str(bad), "--out", str(tmp_path / "art"), "--no-verify"])
    assert_one_line_error(res, "badcfg.pt")


def test_checkpoint_missing_weights_is_refused(ckpt, tmp_path):
    ck = torch.load(ckpt, weights_only=True)
    bad = tmp_path / "partial.pt"
    torch.save({**ck, "model": {k: v for i, (k, v) in enumerate(ck["model"].items()) if i % 2}}, bad)
    from imedsam_train.checkpoint import load_checkpoint

    with pytest.raises(UserError, match="partial.pt"):
        load_checkpoint(bad)


def test_checkpoint_non_finite_weights_are_refused(ckpt, tmp_path):
    ck = torch.load(ckpt, weights_only=True)
    key = next(k for k, v in ck["model"].items() if v.is_floating_point())
    bad = tmp_path / "nan.pt"
    torch.save({**ck, "model": {**ck["model"], key: torch.full_like(ck["model"][key], float("nan"))}}, bad)
    res = runner.invoke(export_app, [str(bad), "--out", str(tmp_path / "art"), "--no-verify"])
    assert_one_line_error(res, "nan.pt", key)
    assert_nothing_left(tmp_path / "art")


def test_export_refuses_bad_options_and_existing_output(ckpt, art, tmp_path):
    out = tmp_path / "art"
    for opts, problem in ([["--max-points", "0"], "max-points"], [["--max-points", "-5"], "max-points"],
                          [["--batch", "0"], "batch"], [["--opset", "5"], "opset"]):
        assert_one_line_error(runner.invoke(export_app, [str(ckpt), "--out", str(out), *opts]), problem)
        assert_nothing_left(out)
    assert_one_line_error(runner.invoke(export_app, [str(tmp_path / "nope.pt"), "--out", str(out)]), "nope.pt")
    before = sorted(p.name for p in art.iterdir())
    assert_one_line_error(runner.invoke(export_app, [str(ckpt), "--out", str(art), "--no-verify"]), "already exists")
    assert sorted(p.name for p in art.iterdir()) == before


# ------------------------------------------------------------------ data folders (train, eval)

def _data_copy(tmp: Path, n: int = 3, splits: bool = False) -> Path:
    """n sample pairs in tmp/data (with splits/: all but the last image train, the last val)."""
    d = tmp / "data"
    (d / "images").mkdir(parents=True)
    (d / "masks").mkdir()
    for img in SAMPLE_IMAGES[:n]:
        shutil.copy(img, d / "images")
        shutil.copy(SAMPLE_DATA / "masks" / f"{img.stem}.png", d / "masks")
    if splits:
        (d / "splits").mkdir()
        stems = [p.stem for p in SAMPLE_IMAGES[:n]]
        (d / "splits" / "train.txt").write_text("\n".join(stems[:-1]) + "\n")
        (d / "splits" / "val.txt").write_text(stems[-1] + "\n")
    return d


def _break_image(d: Path) -> str:
    p = sorted((d / "images").iterdir())[1]
    p.write_bytes(truncated(p.read_bytes()))
    return p.name


def _empty_image(d: Path) -> str:
    p = sorted((d / "images").iterdir())[1]
    p.write_bytes(b"")
    return p.name


def _garbage_mask(d: Path) -> str:
    p = sorted((d / "masks").iterdir())[1]
    p.write_bytes(garbage(300, 9, b"\x89PNG\r\n\x1a\n"))
    return p.name


def _size_mismatch(d: Path) -> str:
    p = sorted((d / "masks").iterdir())[1]
    cv2.imwrite(str(p), cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)[:-9])
    return p.name


@pytest.mark.parametrize("damage", [_break_image, _empty_image, _garbage_mask, _size_mismatch],
                         ids=["truncated-image", "empty-image", "garbage-mask", "size-mismatch"])
def test_eval_and_train_refuse_damaged_data(ckpt, tmp_path, monkeypatch, damage):
    d = _data_copy(tmp_path, splits=True)
    name = damage(d)
    res = runner.invoke(eval_app, [str(ckpt), "--data", str(d), "--json", str(tmp_path / "o" / "r.json")])
    assert_one_line_error(res, name)
    assert_nothing_left(tmp_path / "o")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(train_app, ["folder", str(d), "--model", "tiny", "--input-size", "64", "--epochs", "1", "--points", "64",
                                    "--workers", "0", "--threads", "1", "--name", "r"])
    assert_one_line_error(res, name)
    assert not (tmp_path / "runs" / "r" / "checkpoints").exists()


def test_eval_names_the_image_without_mask(ckpt, tmp_path):
    d = _data_copy(tmp_path)
    first = sorted((d / "masks").iterdir())[0]
    first.unlink()
    res = runner.invoke(eval_app, [str(ckpt), "--data", str(d)])
    assert_one_line_error(res, first.stem, "mask")


def test_eval_and_train_refuse_missing_folders_and_options(ckpt, tmp_path, monkeypatch):
    assert_one_line_error(runner.invoke(eval_app, [str(ckpt), "--data", str(tmp_path / "nodata")]), "nodata")
    assert_one_line_error(runner.invoke(eval_app, [str(tmp_path / "no.pt"), "--data", str(SAMPLE_DATA)]), "no.pt")
    assert_one_line_error(runner.invoke(eval_app, [str(ckpt), "--data", str(SAMPLE_DATA), "--split",
                                                   str(tmp_path / "nosplit.txt")]), "nosplit.txt")
    assert_one_line_error(runner.invoke(eval_app, [str(ckpt), "--data", str(SAMPLE_DATA), "--out-size", "0"]), "out-size")
    assert_one_line_error(runner.invoke(eval_app, [str(ckpt), "--data", str(SAMPLE_DATA), "--box-jitter", "-1"]),
                          "box-jitter")
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(runner.invoke(train_app, ["folder", str(tmp_path / "nodata"), "--model", "tiny", "--input-size", "64"]), "nodata")
    assert_one_line_error(runner.invoke(train_app, ["folder", str(SAMPLE_DATA), "--model", "tiny", "--input-size", "60", "--epochs", "1"]),
                          "60")
    monkeypatch.setenv("IMEDSAM_DATA", str(tmp_path / "nowhere"))
    assert_one_line_error(runner.invoke(train_app, ["kvasir", "--input-size", "64"]), "nowhere")
    assert_one_line_error(runner.invoke(train_app, ["bcv", "--input-size", "64"]), "nowhere")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


def test_train_refuses_garbage_nifti(tmp_path, monkeypatch):
    root = tmp_path / "BCV"
    for sub in ("img", "label"):
        (root / sub).mkdir(parents=True)
    (root / "img" / "img0001.nii.gz").write_bytes(garbage(2000, 10))
    (root / "label" / "label0001.nii.gz").write_bytes(garbage(2000, 11))
    (root / "splits").mkdir()
    for s in ("train", "val"):
        (root / "splits" / f"{s}.txt").write_text("0001\n")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(train_app, ["bcv", str(root), "--model", "tiny", "--input-size", "64", "--epochs", "1", "--workers", "0"])
    assert_one_line_error(res, "0001.nii.gz")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


# ------------------------------------------------------------------ bench

def test_bench_refuses_bad_artifact_and_image(art, tmp_path):
    out = tmp_path / "bench"
    common = ["-b", "ort-cpu", "--repeat", "1", "--warmup", "0", "--out", str(out)]
    assert_one_line_error(runner.invoke(bench_app, [str(tmp_path / "noart"), *common]), "noart")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert_one_line_error(runner.invoke(bench_app, [str(a_file), *common]), "a_file")
    assert_one_line_error(runner.invoke(bench_app, [str(tmp_path), *common]), "manifest")
    assert_one_line_error(runner.invoke(bench_app, [str(art), "--image", str(tmp_path / "no.png"), *common]), "no.png")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert_one_line_error(runner.invoke(bench_app, [str(art), "--image", str(empty), *common]), "empty.png")
    assert_one_line_error(runner.invoke(bench_app, [str(art), "--precision", "fp8", *common]), "precision")
    assert_nothing_left(out)


def test_bench_refuses_truncated_image(art, tmp_path):
    bad = tmp_path / "trunc.jpg"
    bad.write_bytes(truncated(_jpeg()))
    out = tmp_path / "bench"
    res = runner.invoke(bench_app, [str(art), "-b", "ort-cpu", "--image", str(bad), "--query", "box", "--repeat", "1",
                                    "--warmup", "0", "--out", str(out)])
    assert_one_line_error(res, "trunc.jpg")
    assert_nothing_left(out)


# ------------------------------------------------------------------ the real console scripts

def test_console_scripts_exit_2_with_one_stderr_line(art, ckpt, tmp_path):
    for name, args, needle in [
        ("imedsam-infer", [str(IMAGE), "--box", "nan,1,5,5", "--artifact", str(art), "--out", str(tmp_path / "o")], "finite"),
        ("imedsam-infer", [str(IMAGE), "--box", GOOD_BOX, "--artifact", str(tmp_path / "noart")], "noart"),
        ("imedsam-eval", [str(tmp_path / "no.pt"), "--data", str(SAMPLE_DATA)], "no.pt"),
        ("imedsam-export", [str(tmp_path / "no.pt"), "--out", str(tmp_path / "a")], "no.pt"),
        ("imedsam-bench", [str(tmp_path / "noart")], "noart"),
        ("imedsam-train", ["folder", str(tmp_path / "nodata")], "nodata"),
    ]:
        proc = console_script(name, args, tmp_path)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2, (name, proc.returncode, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], (name, proc.stderr)
        assert "Traceback" not in proc.stdout + proc.stderr
    assert_nothing_left(tmp_path / "o")
    assert_nothing_left(tmp_path / "a")


@pytest.mark.parametrize("name", ["trunc.png", "garbage.tiff", "garbage.mp4"])
def test_console_script_stderr_is_one_line_for_corrupt_media(art, tmp_path, name):
    f = tmp_path / name
    f.write_bytes(BAD_FILES[name]())
    proc = console_script("imedsam-infer", [str(f), "--box", "1,1,5,5", "--artifact", str(art), "--out",
                                            str(tmp_path / "o")], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and name in lines[0], proc.stderr


def test_fifo_inputs_do_not_hang(art, tmp_path):
    """A named pipe where a file is expected (nobody writes to it): refused, not read forever."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    boxes = tmp_path / "pipe.csv"
    os.mkfifo(boxes)
    for args, needle in (([str(fifo), "--box", GOOD_BOX], "pipe.png"), ([str(IMAGE), "--boxes", str(boxes)], "pipe.csv")):
        proc = console_script("imedsam-infer", [*args, "--artifact", str(art), "--out", str(tmp_path / "o")], tmp_path,
                              timeout=60)
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert_nothing_left(tmp_path / "o")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_train_resume_refuses_damaged_last_checkpoint(tmp_path, monkeypatch, damage):
    d = _data_copy(tmp_path, splits=True)
    ck = tmp_path / "runs" / "r" / "checkpoints"
    ck.mkdir(parents=True)
    shipped = REPO / "imedsam_train" / "weights" / "imedsam_tiny_kvasir.pt"  # a real checkpoint to cut short
    data = {"truncated": truncated(shipped.read_bytes()) if shipped.is_file() else garbage(900, 16),
            "garbage": garbage(900, 17), "empty": b""}[damage]
    (ck / "last.pt").write_bytes(data)
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(train_app, ["folder", str(d), "--model", "tiny", "--input-size", "64", "--epochs", "1", "--points", "64",
                                    "--workers", "0", "--threads", "1", "--name", "r", "--resume"])
    assert_one_line_error(res, "last.pt")
    assert (ck / "last.pt").read_bytes() == data and sorted(p.name for p in ck.iterdir()) == ["last.pt"]


# ------------------------------------------------------------------ decoder limits, non-finite values, short videos

def _png_huge_truncated(width: int = 60000, height: int = 60000) -> bytes:
    """A PNG header declaring width x height, then one tiny IDAT chunk and no IEND (the data cut off): past
    OpenCV's pixel limit this raises inside imdecode (a header-only PNG just returns None)."""
    idat = zlib.compress(b"\0" * 1000)
    crc = struct.pack(">I", zlib.crc32(b"IDAT" + idat) & 0xFFFFFFFF)
    return png_header_only(width, height)[:-12] + struct.pack(">I", len(idat)) + b"IDAT" + idat + crc


def _jpeg_huge(width: int = 60000, height: int = 60000) -> bytes:
    """A small real JPEG whose frame header (SOF0) claims width x height."""
    b = bytearray(cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    i = b.index(b"\xff\xc0")
    b[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(b)


@pytest.mark.parametrize(("name", "make"), [("huge60k.png", _png_huge_truncated), ("huge60k.jpg", _jpeg_huge)])
def test_infer_refuses_image_past_the_decoder_pixel_limit(art, tmp_path, name, make):
    f = tmp_path / name
    f.write_bytes(make())
    out = tmp_path / "out"
    assert_one_line_error(_infer(f, art, out, "--box", "1,1,5,5"), name, "too large")
    assert_nothing_left(out)
    folder = tmp_path / "folder"  # read on the prefetch thread: the same line
    folder.mkdir()
    shutil.copy(IMAGE, folder / "a.jpg")
    shutil.copy(f, folder / f"b{f.suffix}")
    assert_one_line_error(_infer(folder, art, out, "--box", "1,1,5,5"), f"b{f.suffix}", "too large")
    assert_nothing_left(out)


def test_console_script_huge_png_is_one_line_exit_2(art, tmp_path):
    f = tmp_path / "huge.png"
    f.write_bytes(_png_huge_truncated())
    res = console_script("imedsam-infer", [str(f), "--box", "1,1,5,5", "--artifact", str(art), "--out",
                                           str(tmp_path / "out"), "--backend", "ort-cpu", "-q"], tmp_path)
    assert res.returncode == 2, res.stderr
    assert res.stderr.strip().splitlines() == [f"error: {f}: image too large to decode (its header declares more "
                                               "pixels than OpenCV's limit)"]
    assert_nothing_left(tmp_path / "out")


def _huge_image(d: Path) -> str:
    p = sorted((d / "images").iterdir())[1]
    p.write_bytes(_png_huge_truncated())
    return p.name


def _huge_jpeg_mask(d: Path) -> str:
    p = sorted((d / "masks").iterdir())[1]
    p.write_bytes(_jpeg_huge())
    return p.name


def _nonfinite_image(d: Path) -> str:
    import tifffile

    p = sorted((d / "images").iterdir())[1]
    p.unlink()
    a = np.random.default_rng(0).random((254, 320), dtype=np.float32)
    a[10:20] = np.nan
    a[30, 5] = np.inf
    tifffile.imwrite(p.with_suffix(".tif"), a)
    return p.with_suffix(".tif").name


@pytest.mark.parametrize("damage", [_huge_image, _huge_jpeg_mask, _nonfinite_image],
                         ids=["huge-image", "huge-mask", "nonfinite-float-image"])
def test_eval_refuses_huge_and_nonfinite_data(ckpt, tmp_path, damage):
    d = _data_copy(tmp_path)
    name = damage(d)
    res = runner.invoke(eval_app, [str(ckpt), "--data", str(d), "--json", str(tmp_path / "o" / "r.json")])
    err = assert_one_line_error(res, name)
    assert "too large" in err or "NaN or infinite" in err, err
    assert_nothing_left(tmp_path / "o")


def _volume(tmp: Path, name: str, data: np.ndarray) -> Path:
    p = tmp / name
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), str(p))
    return p


@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf, "mixed"])
def test_infer_refuses_volume_without_a_finite_voxel(art, tmp_path, fill):
    data = np.full((40, 36, 3), np.nan if fill == "mixed" else fill, np.float32)
    if fill == "mixed":
        data[:, :, 1] = np.inf
    f = _volume(tmp_path, "nan.nii.gz", data)
    out = tmp_path / "out"
    assert_one_line_error(_infer(f, art, out, "--box", "1,1,30,30"), "nan.nii.gz", "NaN or infinite")
    assert_nothing_left(out)


def test_infer_marks_slices_with_nonfinite_voxels(art, tmp_path):
    from imedsam_deploy.volume import load_volume

    data = np.random.default_rng(0).normal(0, 100, (40, 36, 4)).astype(np.float32)
    data[:, :, 1] = np.nan  # a whole slice
    data[3, 4, 2] = np.inf  # one voxel
    f = _volume(tmp_path, "some_nan.nii.gz", data)
    vol = load_volume(f)
    assert np.isfinite(vol.data).all() and vol.nonfinite == {1: 40 * 36, 2: 1}
    assert vol.data[3, 4, 2] == vol.data.min()  # background, not a bright spot
    assert vol.window[1] - vol.window[0] < 1000  # the window from finite values (nan_to_num's Inf -> 3e38 broke it)
    out = tmp_path / "out"
    res = _infer(f, art, out, "--box", "1,1,30,30")
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "some_nan.nii.gz" in res.output and "nonfinite" in res.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["nonfinite_voxels"] == 40 * 36 + 1 and doc["nonfinite_slices"] == [1, 2]
    assert [r["status"] for r in doc["records"]] == ["given", "nonfinite", "nonfinite", "given"]
    assert "NaN/Inf" in doc["records"][1]["note"]
    assert "nonfinite" in (out / "results.csv").read_text()
    assert nib.load(str(out / "mask.nii.gz")).shape == data.shape


def test_infer_constant_volume_and_image(art, tmp_path):
    vol = _volume(tmp_path, "flat.nii.gz", np.full((40, 36, 2), 7.0, np.float32))
    out = tmp_path / "v"
    res = _infer(vol, art, out, "--box", "1,1,30,30")
    assert res.exit_code == 0, res.output
    assert {r["status"] for r in json.loads((out / "results.json").read_text())["records"]} == {"given"}
    img = tmp_path / "flat.png"
    cv2.imwrite(str(img), np.full((50, 60), 200, np.uint8))
    res = _infer(img, art, tmp_path / "i", "--box", "1,1,30,30")
    assert res.exit_code == 0, res.output


def _avi(path: Path, frames: int = 40) -> Path:
    w = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), 10, (64, 48))
    for i in range(frames):
        w.write(np.full((48, 64, 3), (i * 6) % 256, np.uint8))
    w.release()
    return path


def test_infer_refuses_video_that_stops_before_its_declared_frames(art, tmp_path):
    good = _avi(tmp_path / "good.avi")
    bad = tmp_path / "cut.avi"
    bad.write_bytes(good.read_bytes()[: int(good.stat().st_size * 0.7)])  # frames stop; the header still says 40
    cap = cv2.VideoCapture(str(bad))
    assert cap.isOpened() and cap.get(cv2.CAP_PROP_FRAME_COUNT) == 40
    cap.release()
    out = tmp_path / "out"
    err = assert_one_line_error(_infer(bad, art, out, "--box", "1,1,30,30"), "cut.avi", "truncated")
    assert "of the 40 frames" in err
    assert_nothing_left(out)
    res = _infer(good, art, tmp_path / "ok", "--box", "1,1,30,30")  # the whole file still runs
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ok" / "results.json").read_text())["frames"] == 40


def test_infer_refuses_zero_length_video(art, tmp_path):
    for name in ("zero.mp4", "zero.avi", "zero.mkv"):
        f = tmp_path / name
        f.write_bytes(b"")
        out = tmp_path / "out"
        assert_one_line_error(_infer(f, art, out, "--box", "1,1,5,5"), name)
        assert_nothing_left(out)


def test_infer_refuses_boxes_for_frames_the_input_lacks(art, tmp_path):
    """A --boxes entry that names no image / frame would be skipped without a word; it is refused, naming the
    boxes file, the entry and the input. A video's frames past its end are refused once it has been read."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for img in SAMPLE_IMAGES[:2]:
        shutil.copy(img, folder / img.name)
    video = _avi(tmp_path / "clip.avi")
    out = tmp_path / "out"
    cases = [(IMAGE, "5", "image 5", IMAGE.name), (folder, "2", "image 2", "imgs"),
             (folder, "nope.jpg", "'nope.jpg'", "imgs"), (folder, "-1", "image -1", "imgs"),
             (video, "40", "frame 40", "clip.avi"), (video, "a.png", "frame 'a.png'", "clip.avi")]
    for i, (inp, frame, what, name) in enumerate(cases):
        f = tmp_path / f"b{i}.csv"
        f.write_text(f"frame,x0,y0,x1,y1\n0,1,1,30,30\n{frame},1,1,30,30\n")
        assert_one_line_error(_infer(inp, art, out, "--boxes", str(f)), f.name, what, f"not in {name}")
        assert_nothing_left(out)
    # what does name a frame still runs: an image's stem, an index, a video's last frame
    ok = tmp_path / "ok.csv"
    ok.write_text(f"frame,x0,y0,x1,y1\n{SAMPLE_IMAGES[1].stem},1,1,30,30\n0,1,1,30,30\n")
    res = _infer(folder, art, tmp_path / "f", "--boxes", str(ok))
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "f" / "results.json").read_text())["records"]) == 2
    ok.write_text("frame,x0,y0,x1,y1\n39,1,1,30,30\n")
    res = _infer(video, art, tmp_path / "v", "--boxes", str(ok))
    assert res.exit_code == 0, res.output
    assert [r["frame"] for r in json.loads((tmp_path / "v" / "results.json").read_text())["records"]] == [39]


def test_train_refuses_nifti_with_nan(tmp_path, monkeypatch):
    root = tmp_path / "BCV"
    for sub in ("img", "label"):
        (root / sub).mkdir(parents=True)
    hu = np.random.default_rng(0).normal(0, 100, (32, 32, 4)).astype(np.float32)
    hu[5, 5, 2] = np.nan
    lab = np.zeros((32, 32, 4), np.uint8)
    lab[8:20, 8:20, :] = 1
    nib.save(nib.Nifti1Image(hu, np.eye(4)), str(root / "img" / "img0001.nii.gz"))
    nib.save(nib.Nifti1Image(lab, np.eye(4)), str(root / "label" / "label0001.nii.gz"))
    (root / "splits").mkdir()
    for s in ("train", "val"):
        (root / "splits" / f"{s}.txt").write_text("0001\n")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(train_app, ["bcv", str(root), "--model", "tiny", "--input-size", "64", "--epochs", "1", "--workers", "0"])
    assert_one_line_error(res, "img0001.nii.gz", "NaN or infinite")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))
