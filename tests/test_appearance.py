"""The tracker's appearance check and search (``appearance.py``, ``tracking.follow``): the cell geometry under
both preprocessings, the likeness of masks on synthetic features, a box that slid onto a confident look-alike
caught and the object picked up again, and the encoder's real features telling the polyp from the colon fold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imedsam_core.contract import LETTERBOX_MODE, RESIZE_MODE
from imedsam_deploy.appearance import FrameFeatures
from imedsam_deploy.preprocess import Preprocessing
from imedsam_deploy.tracking import Track, TrackConfig, follow

LETTERBOX = Preprocessing(LETTERBOX_MODE, 64)
STRETCH = Preprocessing(RESIZE_MODE, 64)
G = 16  # embedding grid: a cell is 4 model-input pixels


def _features(cells_hw: tuple[int, int], obj_cells: tuple[slice, slice], seed: int = 0) -> np.ndarray:
    """(1, 8, G, G): background cells near one direction, the object's near another, both with noise."""
    rng = np.random.default_rng(seed)
    e = np.zeros((8, G, G), np.float32)
    e[0] = 1.0
    e[1][obj_cells] = 3.0
    e[0][obj_cells] = 0.2
    e += 0.1 * rng.standard_normal(e.shape).astype(np.float32)
    e[:, cells_hw[0] :, :] = rng.standard_normal((8, G - cells_hw[0], G))  # the padding: anything
    return e[None]


def _rect(hw: tuple[int, int], x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros(hw, bool)
    m[y0:y1, x0:x1] = True
    return m


def test_cells_follow_the_letterbox_and_the_stretch():
    # 100 x 200 letterboxed into 64: the image fills 32 x 64 input pixels, 8 x 16 cells; a cell is 12.5 px
    f = FrameFeatures(_features((8, 16), (slice(0, 1), slice(0, 1))), (100, 200), LETTERBOX)
    assert f.valid == (32, 64) and f.cells == (8, 16) and f.features.shape == (8, 8, 16)
    np.testing.assert_allclose(np.linalg.norm(f.features, axis=0), 1, atol=1e-5)
    np.testing.assert_allclose(f.cells_to_box(2, 1, 4, 3), [25, 12.5, 50, 37.5])
    cover = f.cover(_rect((100, 200), 25, 25, 50, 50))
    assert cover.shape == (8, 16) and cover[2:4, 2:4].min() == pytest.approx(1, abs=1e-6)
    assert cover.sum() == pytest.approx(25 * 25 / 12.5**2, rel=1e-3) and cover[:, 5:].max() == 0
    # stretched: each axis its own scale, every cell valid
    s = FrameFeatures(np.ones((1, 4, G, G), np.float32), (100, 200), STRETCH)
    assert s.cells == (G, G)
    np.testing.assert_allclose(s.cells_to_box(0, 0, G, G), [0, 0, 200, 100])
    with pytest.raises(ValueError, match="embedding"):
        FrameFeatures(np.ones((4, 8, 16), np.float32), (100, 200), STRETCH)


def test_likeness_tells_the_object_from_the_background_and_search_finds_it_moved():
    hw = (100, 200)
    obj = _rect(hw, 50, 25, 100, 62)  # cells rows 2-4, cols 4-7
    first = FrameFeatures(_features((8, 16), (slice(2, 5), slice(4, 8))), hw, LETTERBOX)
    app = first.learn(obj)
    assert app is not None and app.reference > 0.5
    assert first.likeness(app, obj) == pytest.approx(app.reference)
    assert first.likeness(app, _rect(hw, 125, 50, 175, 87)) < 0  # background
    assert first.likeness(app, np.zeros(hw, bool)) == -1
    # a later frame: the object moved to rows 4-6, cols 10-13
    later = FrameFeatures(_features((8, 16), (slice(4, 7), slice(10, 14)), seed=1), hw, LETTERBOX)
    np.testing.assert_allclose(later.search(app, 0.3), [125, 50, 175, 87.5])
    assert later.likeness(app, obj) < 0 < later.likeness(app, _rect(hw, 125, 50, 175, 87))
    assert later.search(app, 2.0) is None  # nothing scores twice the given mask's own likeness
    # the check scores only the cells under the mask: the same as the whole map's cover-weighted mean
    for m in (obj, _rect(hw, 110, 40, 190, 100), _rect(hw, 3, 3, 9, 7)):
        cover = later.cover(m)
        want = float((app.scores(later.features) * cover).sum() / cover.sum())
        assert later.likeness(app, m) == pytest.approx(want, abs=1e-6)


def test_nothing_is_learnt_from_an_empty_mask_a_whole_frame_or_an_object_like_its_background():
    hw = (100, 200)
    f = FrameFeatures(_features((8, 16), (slice(2, 5), slice(4, 8))), hw, LETTERBOX)
    assert f.learn(np.zeros(hw, bool)) is None
    assert f.learn(np.ones(hw, bool)) is None
    plain = FrameFeatures(np.ones((1, 8, G, G), np.float32), hw, LETTERBOX)
    assert plain.learn(_rect(hw, 50, 25, 100, 62)) is None  # no likeness above 0: no check for this object


class _Scene:
    """A fake model on a fake video: it segments, confidently, the object or a look-alike (the "fold") that lies
    under the prompt box. The object jumps away at frame 3; the fold sits where it was."""

    hw = (100, 200)
    obj0, fold, obj1 = (50, 25, 100, 62), (50, 25, 100, 62), (125, 50, 175, 87)

    def __init__(self) -> None:
        self.t = 0
        self.prompts: list[np.ndarray] = []

    def frame(self) -> FrameFeatures:
        cells = (slice(2, 5), slice(4, 8)) if self.t < 3 else (slice(4, 7), slice(10, 14))
        return FrameFeatures(_features((8, 16), cells, seed=self.t), self.hw, LETTERBOX)

    def decode(self, box: np.ndarray) -> tuple[str, np.ndarray, float]:
        self.prompts.append(box.copy())
        x0, y0, x1, y1 = self.obj0 if self.t < 3 else self.obj1
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if box[0] <= cx <= box[2] and box[1] <= cy <= box[3]:
            return "object", _rect(self.hw, x0, y0, x1, y1), 0.9
        return "fold", _rect(self.hw, *self.fold), 0.9  # the look-alike, segmented just as confidently


@pytest.mark.parametrize("appearance", [False, True])
def test_a_box_left_on_a_look_alike_is_caught_and_the_object_found_again(appearance):
    scene = _Scene()
    tr = Track(0, TrackConfig(appearance=appearance))
    tr.give(np.array(scene.obj0, float))
    seen = []
    for t in range(6):
        scene.t = t
        res, st, searched = follow(tr, scene.decode, scene.frame(), given=t == 0)
        seen.append((res, st, searched))
    if not appearance:  # size and confidence alone: the fold is reported as the object from frame 3 on
        assert [s[:2] for s in seen[3:]] == [("fold", "tracked")] * 3
        return
    assert tr.look is not None and tr.look.reference > 0
    assert seen[:3] == [("object", "given", False), ("object", "tracked", False), ("object", "tracked", False)]
    # frame 3: the box's mask is the fold, unlike the object: the search's box gives the object back
    assert seen[3] == ("object", "tracked", True) and seen[4:] == [("object", "tracked", False)] * 2
    assert scene.prompts[4][0] > 100  # the search prompted frame 3 again, where the object now is
    assert tr.box[0] > 100  # and frame 4 is prompted there


def test_judge_gives_the_likeness_and_the_part_on_object_like_cells():
    hw = (100, 200)  # letterboxed into 64: 8 x 16 cells of 12.5 px
    obj = _rect(hw, 50, 25, 100, 62)  # cells rows 2-4, cols 4-7
    f = FrameFeatures(_features((8, 16), (slice(2, 5), slice(4, 8))), hw, LETTERBOX)
    look = f.learn(obj)
    assert look is not None
    spill = _rect(hw, 100, 0, 125, 62)  # a strip up the background beside it, still joined to it
    mask = obj | spill
    lk, part = f.judge(look, mask)
    assert lk == pytest.approx(f.likeness(look, mask), abs=1e-6) and 0 < lk < f.likeness(look, obj)
    assert np.array_equal(part, obj)  # the object's pixels, none of the strip's
    lk0, part0 = f.judge(look, np.zeros(hw, bool))
    assert lk0 == -1.0 and not part0.any()
    one = np.zeros((8, 16), np.uint8)
    one[1, 3] = 1
    px = f.cells_to_pixels(one)  # cell (1, 3): rows 12.5-25, columns 37.5-50 of the image (pixel centres inside)
    ys, xs = np.nonzero(px)
    assert (ys.min(), ys.max(), xs.min(), xs.max(), len(ys)) == (13, 24, 38, 49, 12 * 12)


@pytest.mark.parametrize("like_part", [False, True])
def test_a_spill_onto_unlike_cells_does_not_widen_the_next_box(like_part):
    hw = (100, 200)
    obj, spill = _rect(hw, 50, 25, 100, 62), _rect(hw, 100, 0, 125, 62)
    f = FrameFeatures(_features((8, 16), (slice(2, 5), slice(4, 8))), hw, LETTERBOX)
    tr = Track(0, TrackConfig(like_part=like_part))
    tr.give(np.array([50.0, 25.0, 100.0, 62.0]))
    follow(tr, lambda box: ("obj", obj, 0.9), f, given=True)
    res, st, searched = follow(tr, lambda box: ("spill", obj | spill, 0.9), f, given=False)
    assert (res, st, searched) == ("spill", "tracked", False)  # the mask passes, spill and all, and is reported
    assert tr.box is not None
    if like_part:  # the object's box plus the margin (15 % of 50 px: 7.5 px)
        np.testing.assert_allclose(tr.box, [42.5, 25 - 0.15 * 37, 107.5, 62 + 0.15 * 37])
    else:  # the whole mask's: the strip widens it to x 125 and up to the top
        assert tr.box[2] > 125 and tr.box[1] == 0


def test_a_failed_search_keeps_the_frames_own_reason_and_the_box():
    scene = _Scene()
    tr = Track(0, TrackConfig())
    tr.give(np.array(scene.obj0, float))
    follow(tr, scene.decode, scene.frame(), given=True)
    kept = tr.box.copy()
    scene.t = 3
    lookalike = FrameFeatures(_features((8, 16), (slice(2, 5), slice(4, 8)), seed=9), scene.hw, LETTERBOX)
    plain = FrameFeatures(np.ones((1, 8, G, G), np.float32), scene.hw, LETTERBOX)

    def empty(box: np.ndarray) -> tuple[str, np.ndarray, float]:
        return "none", np.zeros(scene.hw, bool), 0.0

    res, st, searched = follow(tr, empty, lookalike, given=False)  # the search finds cells, its mask is empty
    assert (res, st, searched) == ("none", "lost", False) and tr.lost_reason == "empty mask"
    assert np.array_equal(tr.box, kept)
    assert follow(tr, empty, plain, given=False)[1:] == ("lost", False)  # no cell scores: no second decode
    assert follow(tr, empty, None, given=False)[1:] == ("lost", False)  # a backend with no host embedding


def test_the_encoder_tells_the_polyp_from_the_fold_on_the_real_clip(shipped_artifact, shared_data):
    """The bundled tiny model's own embedding, on the shared clip's first frame: learnt from its mask of the
    polyp, the fold above the polyp scores under 0 on that frame and 30 frames later, the polyp's mask over it."""
    from imedsam_deploy.backends import open_backend
    from imedsam_deploy.manifest import load_artifact
    from imedsam_deploy.runtime import Segmenter
    from imedsam_deploy.video import VideoReader

    from .conftest import REAL_VIDEO

    art = load_artifact(Path(shipped_artifact))
    be, _ = open_backend("ort-cpu", art, None)
    seg = Segmenter(be, art, query="sparse")
    frames = [f for _, f in zip(range(31), VideoReader(REAL_VIDEO), strict=False)]
    hw = frames[0].shape[:2]
    fold = _rect(hw, 300, 120, 345, 250)  # the colon fold running up from the polyp
    (e0,), _ = seg.embed([frames[0]])
    polyp = seg.decode_box(e0, np.array([296.0, 262, 362, 378]), hw, hw).mask()
    first = FrameFeatures(be.host_embedding(e0), hw, seg.pre)
    app = first.learn(polyp)
    assert app is not None and app.reference > 0.05
    assert first.likeness(app, fold) < 0
    (e30,), _ = seg.embed([frames[30]])
    later = FrameFeatures(be.host_embedding(e30), hw, seg.pre)
    polyp30 = seg.decode_box(e30, np.array([296.0, 262, 362, 378]), hw, hw).mask()
    assert later.likeness(app, fold) < 0 < later.likeness(app, polyp30)


def test_run_video_reports_an_object_found_by_its_appearance(tmp_path):
    """``run_video`` on the scene above (a fake segmenter over a real 6-frame video file): frame 3 is tracked,
    from the search's box, with a note and a ``found`` event saying how; frame 4 is prompted there."""
    import json

    from imedsam_deploy._cv import cv2
    from imedsam_deploy.infer import Prompts, run_video
    from imedsam_deploy.outputs import OutputSet
    from imedsam_deploy.preprocess import Region
    from imedsam_deploy.runtime import ObjectMask
    from imedsam_deploy.video import VideoReader

    scene = _Scene()
    path = tmp_path / "scene.avi"
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (200, 100))
    for _ in range(6):
        w.write(np.full((100, 200, 3), 128, np.uint8))
    w.release()

    class FakeSegmenter:
        pre = LETTERBOX

        class backend:  # noqa: N801 - stands in for a Backend instance
            copies = 0

            @classmethod
            def host_embedding(cls, emb: int) -> np.ndarray:
                cls.copies += 1
                cells = (slice(2, 5), slice(4, 8)) if emb < 3 else (slice(4, 7), slice(10, 14))
                return _features((8, 16), cells, seed=emb)

        frames = 0

        def embed_frame(self, rgb: np.ndarray) -> tuple[list[int], float]:
            self.frames += 1
            scene.t = self.frames - 1
            return [scene.t], 1.0

        def decode_frame_box(self, embs: list[int], box: np.ndarray, hw: tuple[int, int],
                             ohw: tuple[int, int]) -> ObjectMask:
            _, mask, _ = scene.decode(box)
            logits = np.where(mask, 5.0, -5.0).astype(np.float32)[None]
            return ObjectMask(np.asarray(box, float), ohw, Region(0, 0, *ohw), logits, mask.size)

    def run(cfg: TrackConfig, name: str) -> dict:
        reader = VideoReader(path)
        outs = OutputSet(tmp_path / name, "video", reader.fps, (reader.width, reader.height))
        info = run_video(FakeSegmenter(), reader, Prompts([np.array(scene.obj0, float)]), outs, None,  # type: ignore[arg-type]
                         cfg, lambda n: None, overlap_io=False)
        outs.finish(info)
        reader.close()
        return json.loads((tmp_path / name / "results.json").read_text())

    # no appearance: the embedding never crosses to the host, and the fold is reported as the object from frame 3
    off = run(TrackConfig(appearance=False), "off")
    assert FakeSegmenter.backend.copies == 0 and [r["status"] for r in off["records"]][3:] == ["tracked"] * 3
    assert all(r["x0"] < 100 for r in off["records"])
    res = run(TrackConfig(), "out")
    assert FakeSegmenter.backend.copies == 6
    recs = res["records"]
    assert [r["status"] for r in recs] == ["given"] + ["tracked"] * 5
    assert recs[3]["note"] == "found by its appearance" and recs[3]["x0"] > 100 and recs[3]["area"] > 0
    assert all(r["note"] == "" for i, r in enumerate(recs) if i != 3) and recs[4]["x0"] > 100
    found = [e for e in res["events"] if e["event"] == "found"]
    assert len(found) == 1 and found[0]["frame"] == 3 and found[0]["how"] == "by its appearance"


def test_the_ort_backend_hands_over_its_embedding_on_the_host(shipped_artifact):
    """ONNX Runtime: a CPU embedding is already a host array; a device one (an OrtValue) is copied out."""
    import onnxruntime as ort

    from imedsam_deploy.backends import open_backend
    from imedsam_deploy.manifest import load_artifact

    art = load_artifact(Path(shipped_artifact))
    be, _ = open_backend("ort-cpu", art, None)
    (emb,) = be.encode(np.zeros((1, 3, art.input_size, art.input_size), np.float32))
    assert be.host_embedding(emb) is emb
    on_device = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(emb), "cpu", 0)
    np.testing.assert_array_equal(be.host_embedding(on_device), emb)
