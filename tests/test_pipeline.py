"""imedsam_deploy.pipeline: frames read ahead and outputs written behind, in order, bounded, with errors
handed back where they belong and nothing left running after the block; and ``imedsam-infer``'s video, image
and volume runs write the same outputs with it as without it."""

from __future__ import annotations

import itertools
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from imedsam_deploy.pipeline import OrderedWriter, Prefetch, overlapped


def test_prefetch_keeps_order_and_stays_bounded():
    produced = []

    def source():
        for i in itertools.count():
            produced.append(i)
            yield i

    with Prefetch(source(), depth=3) as pre:
        got = [next(pre) for _ in range(5)]
        time.sleep(0.2)  # let the producer run as far ahead as it may
        ahead = len(produced) - len(got)
    assert got == [0, 1, 2, 3, 4]
    assert ahead <= 3 + 1  # the queue's depth, plus the item it is blocked putting


def test_prefetch_reraises_the_sources_error_at_its_place():
    def source():
        yield 1
        yield 2
        raise ValueError("frame 3 unreadable")

    pre = Prefetch(source())
    assert next(pre) == 1 and next(pre) == 2
    with pytest.raises(ValueError, match="frame 3 unreadable"):
        next(pre)
    with pytest.raises(StopIteration):
        next(pre)
    pre.close()


def test_prefetch_close_stops_an_endless_source():
    before = threading.active_count()
    pre = Prefetch(itertools.count(), depth=2)
    assert next(pre) == 0
    pre.close()
    assert threading.active_count() == before  # the producer thread has ended


def test_ordered_writer_runs_in_order_and_bounds_its_backlog():
    done: list[int] = []
    gate = threading.Event()

    def slow(i: int) -> None:
        gate.wait(5)
        done.append(i)

    with OrderedWriter(backlog=2) as w:
        w.submit(slow, 0)
        w.submit(slow, 1)
        t = threading.Thread(target=w.submit, args=(slow, 2))
        t.start()
        time.sleep(0.1)
        assert t.is_alive()  # a third call waits while two are unfinished
        gate.set()
        t.join(5)
        for i in range(3, 10):
            w.submit(done.append, i)
        w.drain()
    assert done == list(range(10))


def test_ordered_writer_hands_back_the_first_error_and_close_drops_the_rest():
    ran: list[int] = []

    def fail() -> None:
        raise OSError("disk full")

    w = OrderedWriter(backlog=8)
    w.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        w.drain()
    gate = threading.Event()
    w.submit(gate.wait, 5)
    for i in range(5):
        w.submit(ran.append, i)
    gate.set()
    w.close()  # waits for the running call; the ones not started are dropped or done, never after close
    n = len(ran)
    time.sleep(0.1)
    assert len(ran) == n and ran == list(range(n))


def test_overlapped_stops_both_threads_on_an_error_in_the_block():
    before = threading.active_count()
    written: list[int] = []
    with pytest.raises(RuntimeError, match="model failed"), overlapped(itertools.count()) as (frames, write):
        for i in frames:
            write(written.append, i)
            if i == 5:
                raise RuntimeError("model failed")
    n = len(written)
    time.sleep(0.1)
    assert threading.active_count() == before and len(written) == n <= 6
    # and in line, the same calls
    out: list[int] = []
    with overlapped(range(4), on=False) as (frames, write):
        for i in frames:
            write(out.append, i)
    assert out == [0, 1, 2, 3]


@pytest.fixture(scope="module")
def video_cut(tmp_path_factory) -> Path:
    from .conftest import cut_video

    return cut_video(tmp_path_factory.mktemp("pipe_video") / "cut.avi", 12)


def _outputs(root: Path) -> tuple[dict[str, bytes], list[dict]]:
    files = {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "masks").glob("*.png"))}
    rows = json.loads((root / "results.json").read_text())["records"]
    for r in rows:  # timings differ from run to run
        for k in ("latency_ms", "encode_ms", "decode_ms"):
            r.pop(k)
    return files, rows


def test_video_and_images_write_the_same_outputs_overlapped_or_not(tmp_path, video_cut, shipped_artifact):
    """The shipped model on a real clip, real images and a real CT volume: mask PNGs, per-frame records, the
    overlay video's frame count, the slice overlays and the label volume are the same with I/O overlapped
    (the default) as in line."""
    import nibabel as nib

    from imedsam_deploy._cv import cv2
    from imedsam_deploy.backends import open_backend
    from imedsam_deploy.infer import InputSpec, Prompts, run_images, run_video, run_volume
    from imedsam_deploy.manifest import load_artifact
    from imedsam_deploy.outputs import OutputSet
    from imedsam_deploy.runtime import Segmenter
    from imedsam_deploy.tracking import TrackConfig
    from imedsam_deploy.video import VideoReader
    from imedsam_deploy.volume import load_volume

    from .conftest import SAMPLE_DATA, SHARED_DATA

    volume = load_volume(SHARED_DATA / "ct-volume-totalseg" / "images" / "example_ct_sm.nii.gz", None)

    art = load_artifact(shipped_artifact)
    be, _ = open_backend("ort-cpu", art, None)
    seg = Segmenter(be, art, query="sparse")
    images = sorted((SAMPLE_DATA / "images").glob("*.jpg"))[:3]
    results = {}
    for on in (False, True):
        reader = VideoReader(video_cut)
        root = tmp_path / f"video-{on}"
        root.mkdir()
        outs = OutputSet(root, "video", reader.fps, (reader.width, reader.height))
        info = run_video(seg, reader, Prompts([np.array([150.0, 120, 300, 260])]), outs, 96, TrackConfig(),
                         lambda n: None, overlap_io=on)
        outs.finish(info)
        reader.close()
        cap = cv2.VideoCapture(str(root / "overlay.mp4"))
        n_video = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        cap.release()
        img_root = tmp_path / f"images-{on}"
        img_root.mkdir()
        img_outs = OutputSet(img_root, "images")
        img_info = run_images(seg, InputSpec("folder", images[0].parent, images),
                              Prompts([np.array([40.0, 40, 200, 180])]), img_outs, None, lambda n: None,
                              overlap_io=on)
        img_outs.finish(img_info)
        vol_root = tmp_path / f"volume-{on}"
        vol_root.mkdir()
        vol_outs = OutputSet(vol_root, "volume", mask_pngs=False)
        vol_info = run_volume(seg, volume, Prompts([], {10: {0: np.array([30.0, 30, 90, 80])},
                                                        15: {0: np.array([20.0, 25, 100, 90])}}),
                              vol_outs, None, lambda n: None, overlap_io=on)
        vol_outs.finish(vol_info)
        overlays = sorted(p.name for p in (vol_root / "overlay").iterdir())
        labels = np.asarray(nib.load(str(vol_root / "mask.nii.gz")).dataobj)
        results[on] = (_outputs(root), n_video, info["frames"], _outputs(img_root), overlays, labels.tobytes())
    assert results[True] == results[False]
    (files, rows), n_video, frames, (img_files, _), overlays, labels = results[True]
    assert frames == n_video == len(files) == 12 and len(rows) == frames and len(img_files) == 3
    assert overlays == ["slice_0010.png", "slice_0015.png"] and any(labels)
    assert sum(r["area"] for r in rows) > 0  # real masks, not empty ones on both sides
