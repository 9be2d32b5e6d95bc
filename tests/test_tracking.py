"""Video box following: a prompt box feeds back into the next one, so its growth is bounded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imedsam_deploy.tracking import Track, TrackConfig, core_box, mask_box


def _square(hw: tuple[int, int], x0: int, y0: int, side_w: int, side_h: int) -> np.ndarray:
    m = np.zeros(hw, bool)
    m[y0 : y0 + side_h, x0 : x0 + side_w] = True
    return m


def test_a_mask_past_max_growth_times_the_given_box_is_lost_and_the_box_kept():
    tr = Track(0, TrackConfig(margin=0.1, min_margin_px=2, max_growth=2.0))
    tr.give(np.array([50.0, 50, 90, 70]))  # 40 x 20
    assert tr.observe(_square((200, 300), 50, 50, 40, 20), 0.9, given=True) == "given"
    # a box-filling model: each mask fills the (grown) prompt box, which then grows again
    sizes = []
    for _ in range(12):
        x0, y0, x1, y1 = (int(round(v)) for v in tr.box)
        st = tr.observe(_square((200, 300), x0, y0, x1 - x0, y1 - y0), 0.9, given=False)
        sizes.append((x1 - x0, y1 - y0, st))
        if st == "lost":
            break
    assert sizes[-1][2] == "lost" and all(s == "tracked" for *_, s in sizes[:-1])
    w, h, _ = sizes[-1]
    assert w > 80 or h > 40  # the mask that was refused is past 2x of 40 x 20 ...
    assert all(sw <= 80 and sh <= 40 for sw, sh, _ in sizes[:-1])  # ... the accepted ones are not
    assert "over 2x the given box (40x20)" in tr.lost_reason
    kept = tr.box.copy()
    x0, y0, x1, y1 = (int(round(v)) for v in kept)
    # the same too-large mask again: still lost, the box does not move
    assert tr.observe(_square((200, 300), x0, y0, x1 - x0, y1 - y0), 0.9, given=False) == "lost"
    assert np.array_equal(tr.box, kept)
    # an object back within bounds is found again, and a newly given box resets the limit
    assert tr.observe(_square((200, 300), 60, 52, 40, 20), 0.9, given=False) == "tracked"
    tr.give(np.array([10.0, 10, 110, 110]))
    assert tr.observe(_square((200, 300), 10, 10, 150, 150), 0.9, given=True) == "given"
    assert tr.lost_reason == "" and tr.box[2] > 160  # 150 px is within 2x of the 100 px given box


def test_a_mask_under_one_over_max_growth_of_the_given_box_is_lost_too():
    """A box that slid off the object onto a narrow strip beside it shrinks with each frame: under half the given
    width (max_growth 2) it is no longer the object."""
    tr = Track(0, TrackConfig(margin=0.0, min_margin_px=0, max_growth=2.0, core=0))
    tr.give(np.array([100.0, 100, 166, 216]))  # 66 x 116
    assert tr.observe(_square((400, 400), 110, 110, 34, 100), 0.9, given=False) == "tracked"  # 34 >= 33
    kept = tr.box.copy()
    assert tr.observe(_square((400, 400), 110, 110, 30, 100), 0.9, given=False) == "lost"
    assert "under 1/2 of the given box (66x116)" in tr.lost_reason and np.array_equal(tr.box, kept)
    assert tr.observe(_square((400, 400), 110, 110, 50, 50), 0.9, given=False) == "lost"  # too short now
    assert tr.observe(_square((400, 400), 110, 110, 60, 100), 0.9, given=False) == "tracked"


def test_max_growth_zero_turns_the_limit_off():
    tr = Track(0, TrackConfig(max_growth=0))
    tr.give(np.array([50.0, 50, 60, 60]))
    assert tr.observe(_square((200, 300), 0, 0, 300, 200), 0.9, given=False) == "tracked"


def _polyp_with_spike(hw: tuple[int, int], top: int) -> np.ndarray:
    """A disc of radius 30 centred at (150, 140) and a spike 6 px wide running up from it to row ``top``."""
    yy, xx = np.mgrid[: hw[0], : hw[1]]
    m = (yy - 140) ** 2 + (xx - 150) ** 2 <= 30**2
    m[top:140, 147:153] = True
    return m


def test_core_box_leaves_out_a_thin_spike_and_keeps_a_plain_mask():
    spiky = _polyp_with_spike((240, 320), 20)
    whole, core = mask_box(spiky), core_box(spiky, 0.1)
    assert whole is not None and core is not None
    assert whole[1] == 20  # the component's box runs up the spike ...
    np.testing.assert_allclose(core, [120, 110, 181, 171], atol=2)  # ... its core's is the disc's
    assert np.array_equal(core_box(spiky, 0.0), whole)  # 0: the whole component
    plain = _polyp_with_spike((240, 320), 140)  # no spike
    np.testing.assert_allclose(core_box(plain, 0.1), mask_box(plain), atol=1)
    # the largest component is the one measured: a far-off larger blob wins, its own core
    two = spiky.copy()
    two[10:110, 220:310] = True
    np.testing.assert_allclose(core_box(two, 0.1), [220, 10, 310, 110], atol=1)


def test_a_mask_that_runs_up_a_fold_does_not_stretch_the_box_when_the_core_is_followed():
    """A model that segments the polyp plus whatever the prompt box covers above it (a fold): following the whole
    mask, the box climbs until the object is lost; following its core, the box stays on the polyp."""
    hw = (240, 320)
    for core, want in ((0.0, "lost"), (0.1, "tracked")):
        tr = Track(0, TrackConfig(core=core, max_growth=2.0))
        tr.give(np.array([118.0, 108, 183, 173]))
        statuses = []
        for _ in range(15):
            top = max(0, int(tr.box[1]) - 10)  # the spike reaches 10 px past the prompt's top edge
            statuses.append(tr.observe(_polyp_with_spike(hw, top), 0.9, given=False))
        assert statuses[-1] == want, (core, statuses)
        if want == "tracked":
            assert set(statuses) == {"tracked"} and tr.box[1] > 95  # the box's top stays near the disc's (110)


@pytest.fixture(scope="module")
def clip_40(tmp_path_factory, shared_data) -> Path:
    from .conftest import cut_video

    return cut_video(tmp_path_factory.mktemp("track_video") / "cut.avi", 40)


def _follow(artifact: Path, clip: Path, cfg: TrackConfig, root: Path) -> list[dict]:
    import json

    from imedsam_deploy.backends import open_backend
    from imedsam_deploy.infer import Prompts, run_video
    from imedsam_deploy.manifest import load_artifact
    from imedsam_deploy.outputs import OutputSet
    from imedsam_deploy.runtime import Segmenter
    from imedsam_deploy.video import VideoReader

    art = load_artifact(artifact)
    be, _ = open_backend("ort-cpu", art, None)
    reader = VideoReader(clip)
    root.mkdir()
    outs = OutputSet(root, "video", reader.fps, (reader.width, reader.height))
    # the polyp in the clip's first frame
    info = run_video(Segmenter(be, art, query="sparse"), reader, Prompts([np.array([290.0, 262, 365, 380])]),
                     outs, None, cfg, lambda n: None, overlap_io=False)
    outs.finish(info)
    reader.close()
    return list(json.loads((root / "results.json").read_text())["records"])


def test_the_shipped_model_on_the_real_clip_does_not_inflate_its_box(tmp_path, shipped_artifact, clip_40):
    """The shipped tiny model segments the colon fold above the polyp as well: unbounded, its tracked box
    stretches to the frame's height within 40 frames and every frame says "tracked"; bounded, the frames
    whose mask outgrows 2x the given box are reported lost and no reported mask is that large."""
    free = _follow(shipped_artifact, clip_40, TrackConfig(max_growth=0, core=0, appearance=False), tmp_path / "free")
    bounded = _follow(shipped_artifact, clip_40, TrackConfig(core=0, appearance=False), tmp_path / "bounded")
    assert len(free) == len(bounded) == 40
    assert {r["status"] for r in free} == {"given", "tracked"}
    assert max(r["y1"] - r["y0"] for r in free) > 2.5 * 118  # the feedback is real on this clip
    lost = [r for r in bounded if r["status"] == "lost"]
    assert lost and all("over 2x the given box (75x118)" in r["note"] for r in lost)
    assert [r for r in bounded if r["status"] == "tracked"]
    for r in bounded:  # the box prompting each frame stays within the bound (plus the tracking margin)
        assert r["y1"] - r["y0"] <= 2 * 118 * 1.3 + 1 and r["x1"] - r["x0"] <= 2 * 75 * 1.3 + 1
    assert all(r["area"] == 0 for r in lost)  # a lost object's mask is not reported


def test_a_mask_cut_by_the_frames_edge_is_not_held_to_the_shrink_bound_on_that_side():
    """An object leaving the view at the bottom edge: its visible part may be short, not narrow."""
    tr = Track(0, TrackConfig(margin=0.0, min_margin_px=0, max_growth=2.0, core=0))
    tr.give(np.array([100.0, 100, 166, 216]))  # 66 x 116
    assert tr.observe(_square((400, 400), 110, 360, 60, 40), 0.9, given=False) == "tracked"  # cut at the bottom
    assert tr.observe(_square((400, 400), 110, 350, 60, 40), 0.9, given=False) == "lost"  # as short, not cut
    assert "under 1/2" in tr.lost_reason
    assert tr.observe(_square((400, 400), 0, 200, 20, 100), 0.9, given=False) == "tracked"  # cut at the left
    assert tr.observe(_square((400, 400), 370, 200, 30, 100), 0.9, given=False) == "tracked"  # cut at the right
    assert tr.observe(_square((400, 400), 370, 380, 30, 20), 0.9, given=False) == "tracked"  # in the corner
    assert tr.observe(_square((400, 400), 110, 360, 20, 40), 0.9, given=False) == "lost"  # narrow, cut below only
    # a search's find is held to the bound even there: a sliver in a corner is no evidence of the object
    assert tr.observe(_square((400, 400), 370, 380, 30, 20), 0.9, given=False, searched=True) == "lost"
