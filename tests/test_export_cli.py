"""imedsam-export: bad input, atomic output, defaults, and a gated-LoRA model exported in-graph."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from typer.testing import CliRunner

from imedsam_core import contract as C
from imedsam_core.errors import UserError
from imedsam_export import api
from imedsam_export.api import default_out, export_artifact, resolve_source
from imedsam_export.cli import app
from imedsam_export.graphs import EncoderGraph
from imedsam_export.merge import merge_for_export
from imedsam_export.onnx_export import export_encoder
from imedsam_train.checkpoint import model_payload, save_checkpoint

from .export_helpers import S, tiny_model


def _one_line_error(res) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "runs" / "r1" / "checkpoints" / "best.pt"
    save_checkpoint(path, model_payload(tiny_model(), None))
    return path


def test_missing_checkpoint(tmp_path):
    out = tmp_path / "art"
    line = _one_line_error(CliRunner().invoke(app, [str(tmp_path / "nope.pt"), "--out", str(out)]))
    assert "nope.pt" in line and "no such" in line
    assert not out.exists()


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 definitely not a zip archive" * 10)
    out = tmp_path / "art"
    line = _one_line_error(CliRunner().invoke(app, [str(bad), "--out", str(out)]))
    assert "bad.pt" in line
    assert _listing(tmp_path) == ["bad.pt"]


def test_existing_output_needs_force(ckpt, tmp_path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    line = _one_line_error(CliRunner().invoke(app, [str(ckpt), "--out", str(out)]))
    assert "already exists" in line and "--force" in line
    assert _listing(out) == ["keep.txt"]


@pytest.mark.parametrize("opt", [["--max-points", "0"], ["--max-points", "-5"], ["--batch", "0"], ["--opset", "17"],
                                 ["--opset", "20"]])
def test_bad_options(ckpt, tmp_path, opt):
    before = _listing(tmp_path)
    line = _one_line_error(CliRunner().invoke(app, [str(ckpt), "--out", str(tmp_path / "art"), *opt]))
    assert opt[0] in line
    assert _listing(tmp_path) == before


def test_zero_shot_refuses_a_checkpoint_a_wrong_base_file_and_an_existing_output(ckpt, tmp_path, monkeypatch):
    """``--zero-shot`` exports LiteMedSAM's own weights: a CHECKPOINT beside it, a --sam-checkpoint that is not
    LiteMedSAM's file, or an existing --out is refused in one line before anything is built or written. (The
    zero-shot model itself: tests/test_lite.py; a lite model's export: tests/test_lite_export.py.)"""
    monkeypatch.chdir(tmp_path)
    before = _listing(tmp_path)
    line = _one_line_error(CliRunner().invoke(app, [str(ckpt), "--zero-shot"]))
    assert str(ckpt) in line and "--zero-shot" in line and "CHECKPOINT" in line
    other = tmp_path / "other.pth"
    other.write_bytes(b"\0" * 1000)
    line = _one_line_error(CliRunner().invoke(app, ["--zero-shot", "--sam-checkpoint", str(other)]))
    assert "other.pth" in line and "LiteMedSAM" in line
    assert _listing(tmp_path) == sorted([*before, "other.pth"])  # no runs/zero-shot, no staging folder
    out = tmp_path / "art"
    out.mkdir()
    line = _one_line_error(CliRunner().invoke(app, ["--zero-shot", "--out", str(out)]))
    assert "already exists" in line and _listing(out) == []


def test_defaults_latest_run_then_shipped(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, shipped = resolve_source(None)  # runs/r1 has not finished: not a default
    assert shipped or path.resolve() != ckpt.resolve()
    (tmp_path / "runs" / "r1" / "finished.json").write_text('{"finished": true}')
    path, shipped = resolve_source(None)
    assert path == Path("runs/r1/checkpoints/best.pt") or path.resolve() == ckpt.resolve()
    assert not shipped
    assert default_out(ckpt, False) == (tmp_path / "runs" / "r1" / "export").resolve()
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    try:  # no run here: the shipped model, or a one-line error when this install lacks it
        path, shipped = resolve_source(None)
    except UserError as e:
        assert "shipped" in str(e)
    else:
        assert shipped and path.is_file()
        assert default_out(path, True) == empty / "runs" / "shipped" / "export"


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    def crash(graph, path, *args, **kwargs):
        Path(path).write_bytes(b"half an onnx file")
        raise KeyboardInterrupt

    monkeypatch.setattr(api, "export_encoder", crash)
    out = tmp_path / "art"
    with pytest.raises(KeyboardInterrupt):
        export_artifact(None, out, model=tiny_model(), max_points=16, batch=1)
    assert _listing(tmp_path) == []


def test_gated_lora_exports_with_gate_in_graph(tmp_path):
    # the gate is data dependent, so LoRA is not merged: the encoder graph computes gate and update
    model = tiny_model(gate=True)
    folded, report = merge_for_export(model)
    assert report.lora_gate_in_graph and report.lora_merged_layers == 0
    path = tmp_path / C.ENCODER_ONNX
    export_encoder(EncoderGraph(folded), path, S, 2, 18)
    enc = onnx.load(str(path))
    assert len([t for t in enc.graph.initializer if ".qkv.gate." in t.name]) >= 4  # every block's gate
    image = torch.rand(2, 3, S, S)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (emb,) = sess.run(None, {C.ENC_IN_IMAGE: image.numpy()})
    with torch.no_grad():
        ref = model.encode(image).numpy()
        # the gate matters: with it forced to 0 (no LoRA update) the embedding differs
        for blk in model.image_encoder.blocks:
            blk.attn.qkv.gate.bias.fill_(-1e4)
            blk.attn.qkv.gate.weight.zero_()
        off = model.encode(image).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-4)
    assert np.abs(off - ref).max() > 1e-3


def test_cli_entry_point_is_installed():
    assert os.environ.get("PATH") is not None
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert eps["imedsam-export"] == "imedsam_export.cli:main"


def test_tensorrt_profile_and_missing_tensorrt_message():
    from imedsam_export.tensorrt_build import engine_name, profile_shapes, tensorrt_unavailable

    cfg = tiny_model().cfg
    enc = profile_shapes("encoder", cfg, 4, 1000)
    assert enc == {C.ENC_IN_IMAGE: ((1, 3, S, S), (1, 3, S, S), (4, 3, S, S))}
    dec = profile_shapes("decoder", cfg, 4, 1000)
    assert set(dec) == set(C.DECODER_INPUTS)
    assert dec[C.DEC_IN_COORDS] == ((1, 1, 2), (1, 1000, 2), (4, 1000, 2))
    assert dec[C.DEC_IN_EMBEDDING][2] == (4, 64, S // 16, S // 16)
    assert engine_name(C.DECODER_ONNX_FP16) == "decoder.fp16.engine"
    why = tensorrt_unavailable()
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert why is not None and "\n" not in why and "tensorrt is not installed" in why
