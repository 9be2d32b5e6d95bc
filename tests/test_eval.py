"""Evaluation: metrics against brute force, the box baselines, the imedsam-eval CLI (JSON/CSV/PNG,
jitter, output size, default checkpoint), multi-class mapping, and the shipped model's quality."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from imedsam_train.baselines import box_mask, ellipse_mask
from imedsam_train.build import build
from imedsam_train.checkpoint import model_payload, save_checkpoint
from imedsam_train.eval_cli import app
from imedsam_train.evaluate import predict_logits
from imedsam_train.metrics import all_metrics, dice, hausdorff, iou, paired, surface_distances
from tests.conftest import SAMPLE_DATA, read_mask

TEST_SPLIT = SAMPLE_DATA / "splits" / "test.txt"


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    m, _ = build("tiny", input_size=64)
    p = tmp_path_factory.mktemp("ck") / "tiny64.pt"
    save_checkpoint(p, model_payload(m, None))
    return p


def _brute_hd(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(HD95, HD) without ndimage: a boundary pixel is a mask pixel with a 4-neighbour outside the mask (or
    outside the image); distances are every pairwise distance between the two boundaries."""

    def surf(m):
        p = np.pad(m, 1)
        inner = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
        return np.argwhere(m & ~inner)

    pa, pb = surf(a), surf(b)
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    ab, ba = d.min(1), d.min(0)
    return max(np.percentile(ab, 95), np.percentile(ba, 95)), max(ab.max(), ba.max())


def _blob_pairs(seed: int, n: int):
    """Seeded random blob pairs of random sizes (some touching the image border), both non-empty."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    while n:
        h, w = (int(v) for v in rng.integers(6, 64, 2))
        x, y = (ndimage.binary_dilation(rng.random((h, w)) > rng.uniform(0.9, 0.995),
                                        iterations=int(rng.integers(0, 4))) for _ in range(2))
        if x.any() and y.any():
            n -= 1
            yield x, y


def test_metrics_against_hand_and_brute_force():
    a = np.zeros((40, 40), bool)
    a[10:20, 10:20] = True
    b = np.roll(a, 3, axis=1)
    assert dice(a, b) == pytest.approx(200 * 70 / 200)
    assert iou(a, b) == pytest.approx(100 * 70 / 130)
    hd95, hd = hausdorff(a, b)
    assert hd == pytest.approx(3.0)
    rng = np.random.default_rng(0)
    from scipy import ndimage

    for _ in range(3):
        x = ndimage.binary_dilation(rng.random((48, 48)) > 0.985, iterations=3)  # a few blobs
        y = ndimage.binary_dilation(x, iterations=2) ^ (rng.random((48, 48)) > 0.97)
        assert x.any() and y.any()
        got = hausdorff(x, y)
        want = _brute_hd(x, y)
        assert got[0] == pytest.approx(want[0]) and got[1] == pytest.approx(want[1])
    m = all_metrics(np.zeros((8, 8), bool), a[:8, :8] | True)
    assert m["dice"] == 0 and math.isnan(m["hd95"])


def test_hausdorff_boundary_is_the_cross_erosion():
    # a plus sign: every pixel has a background 8-neighbour, but the centre's 4-neighbours are all inside
    plus = np.zeros((5, 5), bool)
    plus[2, 1:4] = plus[1:4, 2] = True
    point = np.zeros((5, 5), bool)
    point[2, 2] = True
    # the centre is not boundary, so it lies 1 px from the plus's boundary (0 px with a full 3x3 erosion)
    to_plus, to_point = surface_distances(point, plus)
    assert to_plus.tolist() == [1.0] and sorted(to_point.tolist()) == [1.0] * 4


def test_hausdorff_matches_brute_force_on_random_blobs():
    for x, y in _blob_pairs(1, 150):
        got, want = hausdorff(x, y), _brute_hd(x, y)
        assert got == pytest.approx(want, abs=1e-9), (x.astype(int), y.astype(int))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notice inside get_mask_edges
def test_hausdorff_matches_monai():
    monai_metrics = pytest.importorskip("monai.metrics")

    def ref(x: np.ndarray, y: np.ndarray, pct: float | None) -> float:
        t = [torch.from_numpy(m[None, None].astype(np.float32)) for m in (x, y)]
        return float(monai_metrics.compute_hausdorff_distance(t[0], t[1], percentile=pct)[0, 0])

    full = np.ones((12, 9), bool)
    line = np.zeros((12, 9), bool)
    line[3, :] = True
    dot = np.zeros((12, 9), bool)
    dot[0, 0] = True
    column = np.zeros((12, 9), bool)
    column[:, 8] = True
    edge_cases = [(full, line), (full, dot), (line, dot), (full, full), (line, column | dot), (dot, dot)]
    for x, y in [*edge_cases, *_blob_pairs(2, 300)]:
        hd95, hd = hausdorff(x, y)
        assert hd95 == pytest.approx(ref(x, y, 95), abs=1e-4)
        assert hd == pytest.approx(ref(x, y, None), abs=1e-4)


def test_hausdorff_is_nan_when_a_mask_is_empty():
    some = np.zeros((8, 8), bool)
    some[2:5, 2:5] = True
    empty = np.zeros((8, 8), bool)
    for x, y in [(some, empty), (empty, some), (empty, empty)]:
        assert all(math.isnan(v) for v in hausdorff(x, y))


def test_paired_difference_by_hand():
    # d = model - base = [2, -1, 10]: mean 11/3, sample sd 5.859, t(0.975, 2 dof) = 4.3027
    p = paired([90.0, 80.0, 70.0], [88.0, 81.0, 60.0])
    half = 4.302653 * math.sqrt(((2 - 11 / 3) ** 2 + (-1 - 11 / 3) ** 2 + (10 - 11 / 3) ** 2) / 2) / math.sqrt(3)
    assert p["mean"] == pytest.approx(11 / 3) and p["n"] == 3 and (p["better"], p["worse"]) == (2, 1)
    assert p["ci95"] == pytest.approx([11 / 3 - half, 11 / 3 + half], abs=1e-4)
    # distances: lower is better; a case undefined on either side is left out of every figure
    h = paired([3.0, 5.0, math.nan, 4.0], [4.0, 4.0, 1.0, 6.0], lower_is_better=True)
    assert h["n"] == 3 and h["mean"] == pytest.approx(-2 / 3) and (h["better"], h["worse"]) == (2, 1)
    # no spread: the interval is the point; one case: no interval
    assert paired([5.0, 6.0], [4.0, 5.0])["ci95"] == [1.0, 1.0]
    one = paired([5.0], [4.0])
    assert one["mean"] == 1.0 and all(math.isnan(x) for x in one["ci95"])


def test_baselines():
    box = np.array([10.0, 5.0, 50.0, 25.0])
    bm, em = box_mask(box, 40, 60), ellipse_mask(box, 40, 60)
    assert bm.sum() == 40 * 20
    assert (em & ~bm).sum() == 0
    assert em.sum() / bm.sum() == pytest.approx(math.pi / 4, abs=0.02)


def test_chunked_prediction_equals_the_model_forward(random_ckpt):
    from imedsam_train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(random_ckpt)
    img = torch.rand(1, 3, 64, 64)
    box = torch.tensor([[8.0, 10.0, 40.0, 50.0]])
    with torch.no_grad():
        ref = model(img, box, out_size=(48, 48)).fine[0]
    got = predict_logits(model, img, box, 48, chunk=500)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def _eval(args: list[str]) -> tuple[int, str]:
    res = CliRunner().invoke(app, args)
    return res.exit_code, res.output


def test_eval_cli_json_csv_png_and_baselines(random_ckpt, tmp_path):
    out = tmp_path / "tight.json"
    code, text = _eval([str(random_ckpt), "--data", str(SAMPLE_DATA), "--split", str(TEST_SPLIT), "--json", str(out)])
    assert code == 0, text
    s = json.loads(out.read_text())
    assert s["n"] == 8 and 0 <= s["dice"] <= 100 and set(s["baselines"]) == {"box", "ellipse"}
    # independent check of the box baseline with tight boxes, at the model's 64 px output
    import cv2

    want = []
    for stem in TEST_SPLIT.read_text().split():
        m = read_mask(SAMPLE_DATA / "masks" / f"{stem}.png")
        h, w = m.shape
        ys, xs = np.nonzero(m)
        box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) * [64 / w, 64 / h, 64 / w, 64 / h]
        gt = cv2.resize(m.astype(np.float32), (64, 64), interpolation=cv2.INTER_LINEAR) >= 0.5
        want.append(dice(box_mask(box, 64, 64), gt))
    assert s["baselines"]["box"] == pytest.approx(float(np.mean(want)))
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert len(rows) == 9 and rows[0].startswith("stem,class,dice")
    assert s["paired"]["ellipse"]["dice"]["mean"] == pytest.approx(s["dice"] - s["baselines"]["ellipse"])
    assert "model - " not in text  # printed only beside the models a user asked to compare with
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    jit = tmp_path / "jit.json"
    code, text = _eval([str(random_ckpt), "--data", str(SAMPLE_DATA), "--split", str(TEST_SPLIT),
                        "--box-jitter", "20", "--seed", "3", "--out-size", "96", "--json", str(jit)])
    assert code == 0, text
    j = json.loads(jit.read_text())
    assert j["out_size"] == 96 and j["box_jitter"] == 20
    assert j["baselines"]["box"] < s["baselines"]["box"]  # looser boxes, worse box baseline
    code, _ = _eval([str(random_ckpt), "--data", str(SAMPLE_DATA), "--split", str(TEST_SPLIT),
                     "--box-jitter", "20", "--seed", "3", "--out-size", "96", "--json", str(tmp_path / "again.json")])
    assert json.loads((tmp_path / "again.json").read_text())["dice"] == j["dice"]  # seeded


def test_eval_cli_refusals(random_ckpt, tmp_path):
    code, text = _eval([str(random_ckpt), "--data", str(tmp_path / "missing")])
    assert code == 2 and "missing" in text
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    code, text = _eval([str(bad), "--data", str(SAMPLE_DATA)])
    assert code == 2 and "bad.pt" in text
    code, text = _eval([str(random_ckpt), "--data", str(SAMPLE_DATA), "--box-jitter", "-1"])
    assert code == 2


def test_multiclass_organ_pngs_by_name(tmp_path, shared_data):
    torch.manual_seed(0)
    m, _ = build("tiny", input_size=64, num_classes=3)
    p = tmp_path / "organs.pt"
    save_checkpoint(p, {**model_payload(m, None), "classes": ["spleen", "liver", "aorta"]})
    out = tmp_path / "o.json"
    code, text = _eval([str(p), "--data", str(shared_data / "ct-slices-amos-totalseg"), "--json", str(out)])
    assert code == 2 and "not among the model's" in text  # AMOS has organs the model does not know
    sub = tmp_path / "amos"
    (sub / "images").mkdir(parents=True)
    (sub / "masks").mkdir()
    src = shared_data / "ct-slices-amos-totalseg"
    for f in src.glob("images/amos_0006_90.png"):
        (sub / "images" / f.name).write_bytes(f.read_bytes())
    for f in src.glob("masks/amos_0006_90_*"):
        if any(o in f.name for o in ("liver", "spleen")):
            (sub / "masks" / f.name).write_bytes(f.read_bytes())
    code, text = _eval([str(p), "--data", str(sub), "--json", str(out)])
    assert code == 0, text
    s = json.loads(out.read_text())
    assert s["n"] == 2 and set(s["per_class"]) == {"liver", "spleen"}


def test_default_checkpoint_is_the_newest_run_then_the_shipped_model(random_ckpt, tmp_path, monkeypatch):
    from imedsam_train.weights import default_checkpoint, shipped_checkpoint

    monkeypatch.chdir(tmp_path)
    assert default_checkpoint() == shipped_checkpoint()
    run = tmp_path / "runs" / "x" / "checkpoints"
    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(random_ckpt.read_bytes())
    assert default_checkpoint() == shipped_checkpoint()  # an unfinished run is never a default
    (run.parent / "finished.json").write_text('{"finished": true}')
    assert default_checkpoint() == Path("runs/x/checkpoints/best.pt").resolve() or \
        default_checkpoint().resolve() == (run / "best.pt").resolve()
    code, text = _eval(["--data", str(SAMPLE_DATA), "--split", str(TEST_SPLIT)])
    assert code == 0 and "runs/x/checkpoints/best.pt" in text


def test_shipped_lite_model_holds_its_own_against_litemedsam_on_held_out_polyps(tmp_path, monkeypatch):
    """The shipped lite checkpoint (trained on Kvasir-SEG minus the Sessile val/test stems, then Sessile train)
    on the bundled sample's held-out stems, jittered boxes, beside zero-shot LiteMedSAM on the same boxes."""
    from imedsam_train.checkpoint import load_checkpoint
    from imedsam_train.weights import shipped_checkpoint, tiny_checkpoint

    ck = shipped_checkpoint()
    assert ck.stat().st_size <= 4 * 2**20  # only the trained part
    model, raw = load_checkpoint(ck)
    assert model.cfg.name == "lite" and load_checkpoint(tiny_checkpoint())[0].cfg.name == "tiny"
    monkeypatch.chdir(tmp_path)  # no runs here: the shipped model is the default
    held = tmp_path / "held.txt"
    stems = (SAMPLE_DATA / "splits" / "val.txt").read_text().split() + TEST_SPLIT.read_text().split()
    held.write_text("\n".join(stems) + "\n")
    out = tmp_path / "s.json"
    code, text = _eval(["--data", str(SAMPLE_DATA), "--split", str(held), "--box-jitter", "20", "--json", str(out),
                        "--baseline", "litemedsam"])
    assert code == 0, text
    assert "the shipped model" in text
    s = json.loads(out.read_text())
    assert s["n"] == 16
    assert s["dice"] > s["baselines"]["ellipse"] + 10, s
    # within half a point of LiteMedSAM on these 16 images (88.10 against 88.45 with the base smoothing the
    # shipped model carries, 88.25 without: it trades a little Dice for HD95 here); the comparison that counts,
    # on the 39 test images, is in benchmarks/RESULTS.md
    assert s["dice"] >= s["baselines"]["litemedsam"] - 0.5, s


def test_eval_tta_scores_the_mirrored_average_beside_litemedsams_own(tmp_path, monkeypatch):
    """--tta: the model's logits averaged with the mirrored image's, recorded in the JSON; litemedsam-tta is
    LiteMedSAM with the same average (its own test: tests/test_lite.py), scored on the same boxes."""
    monkeypatch.chdir(tmp_path)
    one = tmp_path / "one.txt"  # one image, scored by the model and LiteMedSAM
    one.write_text(TEST_SPLIT.read_text().split()[0] + "\n")
    runs = {}
    for tta in (False, True):
        out = tmp_path / f"s{int(tta)}.json"
        args = ["--data", str(SAMPLE_DATA), "--split", str(one), "--box-jitter", "20", "--json", str(out),
                "--baseline", "litemedsam"]
        # litemedsam-tta (two more LiteMedSAM encoder passes) in the --tta run only
        code, text = _eval(args + (["--tta", "--baseline", "litemedsam-tta"] if tta else []))
        assert code == 0, text
        runs[tta] = json.loads(out.read_text())
    assert runs[True]["tta"] == "flip" and runs[False]["tta"] is None
    base = {k: v for k, v in runs[True]["baselines"].items() if k != "litemedsam-tta"}
    assert base == runs[False]["baselines"]  # the baselines do not depend on --tta
    assert runs[True]["baselines"]["litemedsam-tta"] != runs[True]["baselines"]["litemedsam"]
    assert (runs[True]["dice"], runs[True]["metrics"]["hd95"]["mean"]) != (runs[False]["dice"], runs[False]["metrics"]["hd95"]["mean"])
    code, text = _eval(["--data", str(SAMPLE_DATA), "--split", str(one), "--base-checkpoint", str(one)])
    assert code != 0 and "--baseline litemedsam" in text
