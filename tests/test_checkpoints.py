"""Checkpoints: official SAM format loading, our own format round trip, refusal of bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from imedsam_core.errors import UserError
from imedsam_train.build import build, load_sam_weights
from imedsam_train.checkpoint import load_checkpoint, model_payload, save_checkpoint
from imedsam_train.cli import app
from imedsam_train.config import preset
from imedsam_train.model import IMedSAM


@pytest.fixture(scope="module")
def official_vit_b(tmp_path_factory) -> tuple[Path, dict]:
    """An official-format checkpoint made with segment-anything's own builder (random init)."""
    from segment_anything import sam_model_registry

    torch.manual_seed(0)
    sam = sam_model_registry["vit_b"]()
    with torch.no_grad():  # non-zero relative position tables, so their resizing is exercised
        for n, p in sam.named_parameters():
            if "rel_pos" in n:
                p.normal_(0, 0.02)
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_01ec64.pth"
    sd = sam.state_dict()
    torch.save(sd, path)
    return path, sd


def test_official_checkpoint_loads_into_vit_b_384(official_vit_b):
    path, sd = official_vit_b
    model, digest = build("vit_b", input_size=384, sam_checkpoint=path)
    assert len(digest) == 64
    got = model.state_dict()
    torch.testing.assert_close(got["image_encoder.blocks.3.attn.qkv.weight"], sd["image_encoder.blocks.3.attn.qkv.weight"])
    torch.testing.assert_close(got["mask_decoder.transformer.layers.0.mlp.lin1.weight"],
                               sd["mask_decoder.transformer.layers.0.mlp.lin1.weight"])
    assert got["image_encoder.pos_embed"].shape == (1, 24, 24, 768)
    # global block (2): 127 -> 47 entries; window block (0) keeps its 27
    assert got["image_encoder.blocks.2.attn.rel_pos_h"].shape == (47, 64)
    assert got["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)
    torch.testing.assert_close(got["image_encoder.blocks.0.attn.rel_pos_h"], sd["image_encoder.blocks.0.attn.rel_pos_h"])
    # resizing keeps the table's end points (linear interpolation, align_corners=False keeps the mean)
    r_old, r_new = sd["image_encoder.blocks.2.attn.rel_pos_h"], got["image_encoder.blocks.2.attn.rel_pos_h"]
    torch.testing.assert_close(r_new.mean(0), r_old.mean(0), atol=5e-3, rtol=0)
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 384, 384), torch.tensor([[100.0, 80, 260, 300]]), out_size=(24, 24))
    assert torch.isfinite(out.fine).all()
    # our checkpoint keeps only the trainable part and the base's identity, and rebuilds the model
    ck = model_payload(model, digest, path.name)
    assert "image_encoder.blocks.0.mlp.lin1.weight" not in ck["model"]
    out_path = path.parent / "imedsam.pt"
    save_checkpoint(out_path, ck)
    with pytest.raises(UserError, match="--sam-checkpoint"):
        load_checkpoint(out_path)
    rebuilt, _ = load_checkpoint(out_path, sam_checkpoint=path)
    for k, v in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_size", "not_sam", "pickle_code"])
def test_bad_sam_checkpoints_are_refused_in_one_line(official_vit_b, tmp_path, damage):
    path, sd = official_vit_b
    bad = tmp_path / "bad.pth"
    if damage == "truncate":
        data = path.read_bytes()
        bad.write_bytes(data[: len(data) // 3])
    elif damage == "garbage":
        bad.write_bytes(b"\x00not a checkpoint" * 100)
    elif damage == "wrong_size":
        model = IMedSAM(preset("tiny"))
        torch.save({k: v for k, v in model.state_dict().items() if "lora" not in k}, bad)
    elif damage == "not_sam":
        torch.save({"weight": torch.zeros(3)}, bad)
    else:
        marker = tmp_path / "pwned"

        class Evil:
            def __reduce__(self):
                return (Path.touch, (marker,))

        bad.write_bytes(pickle.dumps({"x": Evil()}))
    model = IMedSAM(preset("vit_b"))
    with pytest.raises(UserError) as e:
        load_sam_weights(model, bad)
    msg = str(e.value)
    assert str(bad) in msg and "\n" not in msg
    if damage == "pickle_code":
        assert not (tmp_path / "pwned").exists()
    runner = CliRunner()
    r = runner.invoke(app, ["info", "vit_b", "--sam-checkpoint", str(bad)])
    assert r.exit_code == 2
    assert r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1


def test_tiny_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = IMedSAM(preset("tiny", input_size=128)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = tmp_path / "ck.pt"
    save_checkpoint(path, model_payload(model, None))
    assert not list(tmp_path.glob(".*tmp"))  # atomic: no temp file left
    rebuilt, ck = load_checkpoint(path)
    assert rebuilt.cfg == model.cfg
    img, box = torch.rand(1, 3, 128, 128), torch.tensor([[5.0, 5, 100, 120]])
    with torch.no_grad():
        a, b = model(img, box, out_size=(32, 32)), rebuilt(img, box, out_size=(32, 32))
    assert torch.equal(a.fine, b.fine)


def test_info_cli_prints_trainable_line():
    r = CliRunner().invoke(app, ["info", "vit_b"])
    assert r.exit_code == 0, r.output
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("trainable: ")
    assert 1_500_000 <= int(last.split(": ")[1]) <= 1_700_000
