"""Untrusted files: checkpoints crafted to run code when unpickled are refused without running it;
artifacts whose files do not match their manifest (or that are corrupt yet consistent) are refused by
imedsam-infer and imedsam-bench, each with one line."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from imedsam_core.errors import UserError
from imedsam_deploy.cli_bench import app as bench_app
from imedsam_deploy.cli_infer import app as infer_app
from imedsam_export.cli import app as export_app
from imedsam_train.cli import app as train_app
from imedsam_train.eval_cli import app as eval_app
from tests.reliability_helpers import (
    GOOD_BOX,
    IMAGE,
    SAMPLE_DATA,
    assert_nothing_left,
    assert_one_line_error,
    console_script,
    garbage,
    tiny_artifact,
    tiny_checkpoint,
)

runner = CliRunner()


class _Payload:
    """Unpickling this calls exec(), which creates the marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _evil_files(tmp: Path, good_ckpt: Path) -> tuple[Path, dict[str, Path]]:
    """(marker, {name: file}): imedsam and SAM checkpoints, zip (torch.save) and legacy (pickle) formats."""
    marker = tmp / "MARKER"
    ck = torch.load(good_ckpt, weights_only=True)
    files = {}
    files["imedsam_zip.pt"] = tmp / "imedsam_zip.pt"
    torch.save({**ck, "extra": _Payload(marker)}, files["imedsam_zip.pt"])  # a real checkpoint plus a payload
    files["imedsam_legacy.pt"] = tmp / "imedsam_legacy.pt"
    with open(files["imedsam_legacy.pt"], "wb") as f:
        pickle.dump({**ck, "extra": _Payload(marker)}, f, protocol=2)
    files["sam_zip.pth"] = tmp / "sam_zip.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1, 4, 4, 8), "x": _Payload(marker)}, files["sam_zip.pth"])
    files["sam_legacy.pth"] = tmp / "sam_legacy.pth"
    with open(files["sam_legacy.pth"], "wb") as f:
        pickle.dump(_Payload(marker), f, protocol=4)
    assert not marker.exists()
    return marker, files


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evil")
    return _evil_files(tmp, tiny_checkpoint(tmp_path_factory))


def test_the_payload_really_runs_code_when_unpickled_unsafely(tmp_path):
    """Guard: the payload is live (an unsafe load creates the marker), so its absence below means something."""
    marker = tmp_path / "MARKER"
    pickle.loads(pickle.dumps(_Payload(marker)))  # noqa: S301 - deliberately unsafe, on our own payload
    assert marker.read_text() == "pwned"


@pytest.mark.parametrize("name", ["imedsam_zip.pt", "imedsam_legacy.pt"])
def test_eval_and_export_refuse_code_carrying_checkpoint(evil, tmp_path, name):
    marker, files = evil
    res = runner.invoke(eval_app, [str(files[name]), "--data", str(SAMPLE_DATA), "--json", str(tmp_path / "o/r.json")])
    assert_one_line_error(res, name, "refused")
    res = runner.invoke(export_app, [str(files[name]), "--out", str(tmp_path / "art"), "--no-verify"])
    assert_one_line_error(res, name, "refused")
    assert not marker.exists()
    assert_nothing_left(tmp_path / "o")
    assert_nothing_left(tmp_path / "art")


@pytest.mark.parametrize("name", ["sam_zip.pth", "sam_legacy.pth"])
def test_sam_checkpoint_that_runs_code_is_refused(evil, tmp_path, monkeypatch, name):
    marker, files = evil
    res = runner.invoke(train_app, ["info", "tiny", "--input-size", "64", "--sam-checkpoint", str(files[name])])
    assert_one_line_error(res, name, "refused")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(train_app, ["folder", str(SAMPLE_DATA), "--model", "tiny", "--input-size", "64", "--epochs", "1", "--workers", "0",
                                    "--sam-checkpoint", str(files[name]), "--name", "r"])
    assert_one_line_error(res, name, "refused")
    assert not marker.exists()
    assert not (tmp_path / "runs" / "r" / "checkpoints").exists()


def test_resume_from_code_carrying_last_checkpoint_is_refused(evil, tmp_path, monkeypatch):
    """A last.pt swapped for a payload: --resume refuses it and nothing runs."""
    marker, files = evil
    ck_dir = tmp_path / "runs" / "r" / "checkpoints"
    ck_dir.mkdir(parents=True)
    shutil.copy(files["imedsam_zip.pt"], ck_dir / "last.pt")
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(train_app, ["folder", str(SAMPLE_DATA), "--model", "tiny", "--input-size", "64", "--epochs", "1", "--workers", "0",
                                    "--name", "r", "--resume"])
    assert_one_line_error(res, "last.pt", "refused")
    assert not marker.exists()


def test_legacy_pickle_refusal_is_one_stderr_line(evil, tmp_path):
    marker, files = evil
    proc = console_script("imedsam-eval", [str(files["sam_legacy.pth"]), "--data", str(SAMPLE_DATA)], tmp_path)
    assert proc.returncode == 2 and not marker.exists(), proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr


# ------------------------------------------------------------------ artifacts

@pytest.fixture(scope="module")
def art(tmp_path_factory) -> Path:
    return tiny_artifact(tmp_path_factory)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _flip_byte(a: Path) -> str:
    p = a / "decoder.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    return "sha256"


def _truncate(a: Path) -> str:
    p = a / "encoder.onnx"
    p.write_bytes(p.read_bytes()[:1000])
    return "bytes"


def _delete(a: Path) -> str:
    (a / "decoder.onnx").unlink()
    return "missing"


def _swap(a: Path) -> str:
    enc, dec = a / "encoder.onnx", a / "decoder.onnx"
    tmp = a / "x"
    enc.rename(tmp)
    dec.rename(enc)
    tmp.rename(dec)
    return "the manifest says"


def _edit_manifest_hash(a: Path) -> str:
    m = json.loads((a / "manifest.json").read_text())
    m["files"]["encoder.onnx"]["sha256"] = "0" * 64
    (a / "manifest.json").write_text(json.dumps(m))
    return "sha256"


def _manifest_garbage(a: Path) -> str:
    (a / "manifest.json").write_bytes(garbage(500, 12))
    return "manifest"


def _manifest_preprocessing(a: Path) -> str:
    m = json.loads((a / "manifest.json").read_text())
    m["preprocessing"] = {**m["preprocessing"], "pixel_scale": 1.0}
    (a / "manifest.json").write_text(json.dumps(m))
    return "preprocessing"


TAMPER = [_flip_byte, _truncate, _delete, _swap, _edit_manifest_hash, _manifest_garbage, _manifest_preprocessing]


@pytest.mark.parametrize("tamper", TAMPER, ids=lambda f: f.__name__.strip("_"))
def test_tampered_artifact_is_refused_by_infer_and_bench(art, tmp_path, tamper):
    bad = tmp_path / "art"
    shutil.copytree(art, bad)
    _refused_by_infer_and_bench(bad, tmp_path, tamper(bad))


def _refused_by_infer_and_bench(bad: Path, tmp_path: Path, needle: str) -> None:
    """imedsam-infer and imedsam-bench on ort-cpu both refuse ``bad`` in one line naming ``needle`` and leave
    no output behind."""
    out = tmp_path / "out"
    res = runner.invoke(infer_app, [str(IMAGE), "--box", GOOD_BOX, "--artifact", str(bad), "--out", str(out),
                                    "--backend", "ort-cpu", "-q"])
    assert_one_line_error(res, needle)
    assert_nothing_left(out)
    res = runner.invoke(bench_app, [str(bad), "-b", "ort-cpu", "--repeat", "1", "--warmup", "0",
                                    "--out", str(tmp_path / "bench")])
    assert_one_line_error(res, needle)
    assert_nothing_left(tmp_path / "bench")


def _consistent(a: Path, name: str, data: bytes) -> None:
    """Replace a file and update its manifest entry: corrupt, yet consistent with the manifest."""
    (a / name).write_bytes(data)
    m = json.loads((a / "manifest.json").read_text())
    m["files"][name] = {"sha256": _sha(a / name), "bytes": len(data)}
    (a / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("what", ["garbage", "truncated"])
@pytest.mark.parametrize("name", ["decoder_points.onnx", "decoder.onnx"])
def test_corrupt_onnx_matching_its_manifest_is_refused(art, tmp_path, what, name):
    """A corrupt graph that the ONNX Runtime CPU backend runs: the split decoder's per-point part, or the
    one-graph decoder of an artifact without the split (an older export)."""
    bad = tmp_path / "art"
    shutil.copytree(art, bad)
    if name == "decoder.onnx":
        m = json.loads((bad / "manifest.json").read_text())
        for g in m["graphs"].values():
            for part in ("decoder_prompt", "decoder_points"):
                g.pop(part, None)
        (bad / "manifest.json").write_text(json.dumps(m))
    data = (bad / name).read_bytes()
    _consistent(bad, name, garbage(4000, 13) if what == "garbage" else data[: len(data) // 2])
    _refused_by_infer_and_bench(bad, tmp_path, name)


def test_garbage_engine_is_refused_or_ignored_cleanly(art, tmp_path):
    """An artifact listing a TensorRT engine that is garbage: the TensorRT backend refuses it in one line (here:
    TensorRT is absent, which is also one line); the ONNX Runtime backend never opens it."""
    bad = tmp_path / "art"
    shutil.copytree(art, bad)
    _consistent(bad, "encoder.fp16.engine", garbage(3000, 14))
    _consistent(bad, "decoder.fp16.engine", garbage(3000, 15))
    m = json.loads((bad / "manifest.json").read_text())
    m["engines"] = {"fp16": {"encoder": "encoder.fp16.engine", "decoder": "decoder.fp16.engine",
                             "tensorrt": "10.0.0", "gpu": "NVIDIA H100", "compute_capability": "9.0",
                             "onnx_sha256": {"encoder": "0" * 64, "decoder": "0" * 64}}}
    (bad / "manifest.json").write_text(json.dumps(m))
    out = tmp_path / "out"
    res = runner.invoke(infer_app, [str(IMAGE), "--box", GOOD_BOX, "--artifact", str(bad), "--out", str(out),
                                    "--backend", "tensorrt", "-q"])
    assert_one_line_error(res, "tensorrt")
    assert_nothing_left(out)
    res = runner.invoke(infer_app, [str(IMAGE), "--box", GOOD_BOX, "--artifact", str(bad), "--out", str(out),
                                    "--backend", "ort-cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert (out / "results.json").is_file()


def test_load_artifact_checks_every_file_before_opening_a_graph(art, tmp_path):
    """The runtime's check itself: every listed file, not only the graphs of the chosen precision."""
    from imedsam_deploy.manifest import load_artifact

    bad = tmp_path / "art"
    shutil.copytree(art, bad)
    m = json.loads((bad / "manifest.json").read_text())
    (bad / "notes.txt").write_text("hello")
    m["files"]["notes.txt"] = {"sha256": "f" * 64, "bytes": 5}
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(UserError, match="notes.txt"):
        load_artifact(bad)
