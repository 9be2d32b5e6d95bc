"""The ``lite`` preset exported and deployed: the runtime's letterbox equals training's, the graphs (LoRA
merged, the per-stage spectrum as DFT matrix products, the base logit riding in the box features) match
PyTorch on random inputs and real polyps, and ``imedsam-infer`` on the artifact gives PyTorch's masks at the
image's own size. The model's trainable part is perturbed (seeded), so the merged LoRA, the adapters and the
INR all move the output: an untrained lite model would be LiteMedSAM and hide a dropped branch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from imedsam_core import contract as C
from imedsam_core.errors import UserError
from imedsam_deploy.manifest import load_artifact
from imedsam_deploy.preprocess import Preprocessing, grid_coords
from imedsam_train.build import build
from imedsam_train.model import ugs_merge
from imedsam_train.model.lite import LiteIMedSAM
from imedsam_train.preprocess import input_boxes, output_coords, prepare_image, to_input
from tests.conftest import SAMPLE_DATA, encode_once, read_mask, read_rgb
from tests.conftest import SESSILE_STEMS as STEMS

S = 256


@pytest.fixture(scope="module")
def moved() -> LiteIMedSAM:
    # seeded: the new parts (LoRA's A, the adapters, the INR) are drawn from torch's global generator, whose state
    # depends on the tests this worker ran before; unseeded, the int8 check below saw a different model each run
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m, _ = build("lite", input_size=S)
    assert isinstance(m, LiteIMedSAM)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad and (".lora_b" in n or ".up." in n or n.startswith("inr.")):
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    m.set_base_smoothing(1.5)  # as the shipped model: the Gaussian on the base logit map goes through the export
    return m.eval()


@pytest.fixture(scope="module")
def exported(moved, tmp_path_factory) -> Path:
    from imedsam_export.api import export_artifact

    root = tmp_path_factory.mktemp("lite")
    # OpenVINO's int8 encoder too, calibrated on four of the bundled sample's train images (the export's default
    # is its whole train split): the parity check below then runs it on real polyps
    calib = root / "calibration"
    calib.mkdir()
    for stem in (SAMPLE_DATA / "splits" / "train.txt").read_text().split()[:4]:
        (calib / f"{stem}.jpg").symlink_to(SAMPLE_DATA / "images" / f"{stem}.jpg")
    out = root / "artifact"
    export_artifact(None, out, model=moved, batch=2, max_points=8192, real_images=2, ov_int8=True, calibration=calib)
    return out


def _case(sessile: Path, stem: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rgb = read_rgb(sessile / "images" / f"{stem}.jpg")
    gt = read_mask(sessile / "masks" / f"{stem}.jpg")
    ys, xs = np.nonzero(gt)
    return rgb, gt, np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


# what several tests compare with, made once: the PyTorch model's embeddings (``encode_once``, per model) and
# masks, and ONNX Runtime fp32's embedding and sparse mask; keyed by the model input's (and box's) bytes
_ENCODERS: dict[int, Any] = {}
_MASKS: dict[tuple[bytes, bytes], np.ndarray] = {}
_FP32: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}


@torch.no_grad()
def _torch_mask(m: LiteIMedSAM, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
    """The PyTorch model's full-grid mask at the image's own size (evaluation's read-out)."""
    pre, (h, w) = m.cfg.preprocess, rgb.shape[:2]
    u8, valid = prepare_image(rgb, pre, S)
    x = to_input(u8, pre, valid)[None]
    key = (x.numpy().tobytes(), np.asarray(box, np.float64).tobytes())
    if key not in _MASKS:
        emb = _ENCODERS.setdefault(id(m), encode_once(m))(x)
        c, f, u = m.decode_dense(emb, input_boxes(box[None], pre, (h, w), S), output_coords(pre, h, w, valid, S)[None])
        _MASKS[key] = (ugs_merge(c, f, u, m.cfg.decoder.refine_fraction)[0, 0].reshape(h, w) > 0).numpy()
    return _MASKS[key].copy()


def test_runtime_letterbox_equals_training_preprocessing(sessile, moved):
    pre = moved.cfg.preprocess
    twin = Preprocessing(C.LETTERBOX_MODE, S)
    rng = np.random.default_rng(0)
    images = [read_rgb(sessile / "images" / f"{STEMS[0]}.jpg"),
              rng.integers(0, 256, (300, 97, 3), dtype=np.uint8),  # portrait, odd width
              np.full((1, 1, 3), 7, np.uint8)]  # one pixel, constant (min-max's eps)
    for rgb in images:
        hw = rgb.shape[:2]
        u8, valid = prepare_image(rgb, pre, S)
        px = np.full((S, S, 3), 99, np.uint8)  # stale content: the padding must be cleared
        twin.resize_into(rgb, px)
        assert twin.valid(hw) == valid
        assert np.array_equal(px, u8.permute(1, 2, 0).numpy())
        x = twin.to_model(px[None], [hw])[0]
        np.testing.assert_allclose(x, to_input(u8, pre, valid).numpy(), atol=1e-6, rtol=0)
        box = np.array([[0.0, 0.0, hw[1], hw[0]], [hw[1] * 0.2, hw[0] * 0.3, hw[1] * 0.7, hw[0] * 0.9]])
        np.testing.assert_allclose(twin.box(box, hw), input_boxes(box, pre, hw, S).numpy(), atol=1e-5, rtol=0)
        for oh, ow in ((hw[0], hw[1]), (64, 48)):
            np.testing.assert_allclose(twin.coords(grid_coords(oh, ow), hw),
                                       output_coords(pre, oh, ow, valid, S).numpy(), atol=1e-6, rtol=0)


def test_lite_graphs_match_pytorch_and_manifest_declares_the_letterbox(exported):
    m = json.loads((exported / C.MANIFEST_NAME).read_text())
    assert m["preprocessing"] == C.preprocessing_manifest(S, C.LETTERBOX_MODE)
    assert m["model"]["backbone"] == "tinyvit" and m["embedding_shape"] == [256, 64, 64]
    par = m["parity"]
    assert par["passed"] and par["real"]["source"].startswith("data/sample")  # real polyps, not random images
    assert par["random"]["encoder_max_abs_diff"] <= 1e-3 and par["random"]["decoder_logit_max_abs_diff"] <= 1e-3
    assert par["random"]["split_decoder_max_abs_diff"] <= 1e-3
    assert par["real"]["fp32"]["logit_max_abs_diff"] <= 1e-3 and par["real"]["fp32"]["mask_agreement"] >= 0.999
    assert m["merge"]["lora_merged_layers"] == 10  # every TinyViT attention block's qkv
    assert m["model"]["decoder"]["base_smoothing"] == 1.5
    art = load_artifact(exported)
    assert art.resize == C.LETTERBOX_MODE


def test_infer_on_the_lite_artifact_gives_pytorchs_masks_at_the_images_size(sessile, moved, exported, tmp_path):
    from imedsam_deploy.backends.ort import OrtBackend
    from imedsam_deploy.cli_infer import app
    from imedsam_deploy.runtime import Segmenter

    art = load_artifact(exported)
    full = Segmenter(OrtBackend(art, "cpu", "fp32"), art, query="full")
    for stem in STEMS[:2]:
        rgb, gt, box = _case(sessile, stem)
        ref = _torch_mask(moved, rgb, box)
        got = full.segment(rgb, box[None]).objects[0].mask()
        assert got.shape == gt.shape and (got == ref).mean() >= 0.999
        assert ref.sum() > 0.3 * gt.sum()  # a real mask, not an empty one agreeing with an empty one
    # the command, default query mode (sparse), one image
    rgb, _, box = _case(sessile, STEMS[0])
    img = sessile / "images" / f"{STEMS[0]}.jpg"
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [str(img), "--box", ",".join(str(int(v)) for v in box), "--artifact",
                                   str(exported), "--out", str(out), "--backend", "ort-cpu", "-q"])
    assert res.exit_code == 0, res.output
    from imedsam_deploy._cv import cv2

    mask = cv2.imread(str(out / "masks" / f"{STEMS[0]}.png"), cv2.IMREAD_GRAYSCALE) > 127
    ref = _torch_mask(moved, rgb, box.astype(int).astype(np.float64))
    assert mask.shape == ref.shape and (mask == ref).mean() >= 0.999


def test_bench_reference_of_a_lite_artifact_is_litemedsam(sessile, exported, tmp_path):
    """``imedsam-bench --reference`` on a lite artifact times zero-shot LiteMedSAM's own pipeline on the same image
    and box, with ``--tta`` its mirrored average. The perturbed model is LiteMedSAM plus small updates, so its
    masks must be LiteMedSAM's nearly everywhere: a reference in another frame (box unscaled, mask unmirrored, the
    letterbox not cropped) would fail this."""
    from imedsam_deploy.cli_bench import app

    rgb, _, box = _case(sessile, STEMS[0])
    rows = {}
    for tta in (False, True):
        js = tmp_path / f"b{int(tta)}.json"
        res = CliRunner().invoke(app, [
            str(exported), "--reference", "--backend", "ort-cpu", "--precision", "fp32", "--query", "sparse",
            "--image", str(sessile / "images" / f"{STEMS[0]}.jpg"), "--box", ",".join(str(v) for v in box),
            "--repeat", "1", "--warmup", "0", "--out", str(tmp_path / "out"), "--json", str(js),
        ] + (["--tta"] if tta else []))
        assert res.exit_code == 0, res.output
        rep = json.loads(js.read_text())
        assert rep["settings"]["reference"] == "litemedsam" and rep["settings"]["tta"] is tta
        assert rep["reference"][0]["e2e_ms"]["p50"] > 0 and rep["reference"][0]["out_size"] == S
        (rows[tta],) = rep["results"]
        assert rows[tta]["speedup_vs_reference"] > 0
        assert rows[tta]["agreement"]["dice_in_box"] >= 0.9, rows[tta]["agreement"]
        assert "LiteMedSAM" in res.output
    assert rows[True]["decoder_points_per_frame"] > 1.5 * rows[False]["decoder_points_per_frame"]


def test_torch_cuda_refuses_a_lite_artifact_in_one_line(exported):
    from imedsam_cuda import torch_cuda

    why = torch_cuda.probe(load_artifact(exported))
    assert why is not None and "lite" in why and "\n" not in why


def test_an_unknown_preprocessing_is_refused_in_one_line(exported, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    mp = bad / C.MANIFEST_NAME
    m = json.loads(mp.read_text())
    m["preprocessing"]["resize"] = "letterbox"
    mp.write_text(json.dumps(m))
    with pytest.raises(UserError) as e:
        load_artifact(bad)
    assert "resize='letterbox'" in str(e.value) and "\n" not in str(e.value)
    m["preprocessing"] = {**C.preprocessing_manifest(S, C.LETTERBOX_MODE), "interpolation": "linear"}
    mp.write_text(json.dumps(m))
    with pytest.raises(UserError, match="interpolation"):
        load_artifact(bad)


# --- ov-cpu: the encoder on OpenVINO (bf16 where the CPU has AMX), ONNX Runtime's fp32 decoder ---

def _model_input(m: LiteIMedSAM, rgb: np.ndarray) -> np.ndarray:
    u8, valid = prepare_image(rgb, m.cfg.preprocess, S)
    return to_input(u8, m.cfg.preprocess, valid)[None].numpy()


def test_ov_cpu_fp32_gives_ort_cpus_embedding_and_masks(sessile, moved, exported):
    from imedsam_deploy.backends.openvino import OvBackend
    from imedsam_deploy.backends.ort import OrtBackend
    from imedsam_deploy.runtime import Segmenter

    art = load_artifact(exported)
    ov, ort = OvBackend(art, "fp32"), OrtBackend(art, "cpu", "fp32")
    assert ov.precision == "fp32" and "openvino" in ov.description and "onnxruntime" in ov.description
    assert "encoder" not in ov.sessions  # ONNX Runtime opens only the decoder's graphs
    rgb, _, box = _case(sessile, STEMS[0])
    x = _model_input(moved, rgb)
    (e_ov,), (e_ort,) = ov.encode(x), ort.encode(x)
    # fp32 in both: only the kernels' summation order differs (measured 4e-6 of the largest value)
    assert np.abs(e_ov - e_ort).max() <= 1e-4 * np.abs(e_ort).max()
    # a batch of two (--tta, serving) gets its own compiled model: the same embeddings as one at a time
    x2 = _model_input(moved, _case(sessile, STEMS[1])[0])
    (e_one,), pair = ov.encode(x2), ov.encode(np.concatenate([x, x2]))
    assert sorted(ov.encoder.requests) == [1, 2]
    assert np.abs(pair[0] - e_ov).max() <= 1e-4 * np.abs(e_ov).max()
    assert np.abs(pair[1] - e_one).max() <= 1e-4 * np.abs(e_one).max()
    for stem in STEMS[:2]:
        rgb, _, box = _case(sessile, stem)
        got = Segmenter(ov, art, query="sparse").segment(rgb, box[None]).objects[0].mask()
        ref = _torch_mask(moved, rgb, box)
        assert (got == ref).mean() >= 0.999 and got.sum() > 0


def _moves_embedding_keeps_masks(low, fp, art, moved, sessile, rel_max: float, dice_min: float,
                                 pixels_min: float = 0.99) -> None:
    """``low`` (a reduced-precision encoder) against ``fp`` (fp32, ONNX Runtime; its results kept for the next
    caller) on the three real polyps: the embedding moves (the lower bound catches a precision OpenVINO ignored)
    but the sparse masks hold."""
    from imedsam_deploy.runtime import Segmenter
    from imedsam_train.metrics import dice

    for stem in STEMS:
        rgb, _, box = _case(sessile, stem)
        x = _model_input(moved, rgb)
        if x.tobytes() not in _FP32:
            (e,) = fp.encode(x)
            _FP32[x.tobytes()] = e, Segmenter(fp, art, query="sparse").segment(rgb, box[None]).objects[0].mask()
        e_fp, ref = _FP32[x.tobytes()]
        (e_low,) = low.encode(x)
        rel = float(np.linalg.norm(e_low - e_fp) / np.linalg.norm(e_fp))
        assert 1e-3 < rel < rel_max, rel
        got = Segmenter(low, art, query="sparse").segment(rgb, box[None]).objects[0].mask()
        assert (got == ref).mean() >= pixels_min and dice(got, ref) >= dice_min, (stem, (got == ref).mean(),
                                                                                  dice(got, ref))


def test_ov_cpu_bf16_masks_agree_with_fp32_on_real_polyps(sessile, moved, exported):
    """bf16 on the matrix units moves the embedding but not the masks: on the shipped model, Kvasir-Sessile
    test, Dice 94.57 against fp32's 94.62, 99.94 % of the pixels the same (benchmarks/encoder_backend_eval.py,
    RESULTS.md)."""
    import openvino as ov_mod

    from imedsam_deploy.backends.openvino import OvBackend, native_bf16
    from imedsam_deploy.backends.ort import OrtBackend

    if not native_bf16(ov_mod.Core()):
        pytest.skip("this CPU has no native bf16 (AMX or AVX-512 BF16); the refusal is tested below")
    art = load_artifact(exported)
    bf, fp = OvBackend(art, "bf16"), OrtBackend(art, "cpu", "fp32")
    assert bf.precision == "bf16"
    # bf16 moves this embedding by 4-7 % (relative L2; PyTorch's own bf16 autocast: 5.8-6.8 % on the shipped
    # model's three images)
    _moves_embedding_keeps_masks(bf, fp, art, moved, sessile, rel_max=0.15, dice_min=97.0)


def test_ov_cpu_refuses_what_it_cannot_run_in_one_line(sessile, exported, tmp_path, monkeypatch):
    from imedsam_deploy.backends import open_backend, openvino, probe
    from imedsam_deploy.cli_infer import app

    art = load_artifact(exported)
    with pytest.raises(UserError, match="fp16") as e:
        openvino.OvBackend(art, "fp16")
    assert "\n" not in str(e.value)
    # int8 needs the OpenVINO int8 encoder (imedsam-export --ov-int8): an artifact without it is refused
    bare = tmp_path / "bare"
    shutil.copytree(exported, bare)
    man = json.loads((bare / C.MANIFEST_NAME).read_text())
    del man["graphs"][C.OV_INT8]
    (bare / C.MANIFEST_NAME).write_text(json.dumps(man))
    with pytest.raises(UserError, match="export with imedsam-export --ov-int8"):
        openvino.OvBackend(load_artifact(bare), "int8")
    img = sessile / "images" / f"{STEMS[0]}.jpg"
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [str(img), "--box", "10,10,100,100", "--artifact", str(bare), "--out",
                                   str(out), "--backend", "ov-cpu", "--precision", "int8", "-q"])
    assert res.exit_code != 0 and "--ov-int8" in res.output and not out.exists()
    # AVX-512 BF16 without AMX on an Intel core: fp32 by default (it was faster there), bf16 when asked for; on an
    # AMD core bf16 (faster there)
    monkeypatch.setattr(openvino, "native_bf16", lambda core: True)
    monkeypatch.setattr(openvino, "bf16_matmul_kernel", lambda: "brgemm_avx512_bf16")
    monkeypatch.setattr(openvino, "cpu_name", lambda: "Intel(R) Xeon(R) Gold 6348H CPU @ 2.30GHz")
    be, how = open_backend("ov-cpu", art)
    assert be.precision == "fp32" and "in fp32" in how
    assert openvino.OvBackend(art, "bf16").precision == "bf16"
    monkeypatch.setattr(openvino, "cpu_name", lambda: "AMD EPYC 9654 96-Core Processor")
    be, how = open_backend("ov-cpu", art)
    assert be.precision == "bf16" and "in bf16" in how
    # a CPU without native bf16: fp32 by default, bf16 refused
    monkeypatch.setattr(openvino, "native_bf16", lambda core: False)
    be, how = open_backend("ov-cpu", art)
    assert be.precision == "fp32" and "ov-cpu" in how
    with pytest.raises(UserError, match="no native bf16"):
        openvino.OvBackend(art, "bf16")
    # openvino missing: the probe says what to install, and auto falls back to ONNX Runtime
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)
    assert "openvino is not installed" in (probe("ov-cpu", art) or "")
    be, how = open_backend("auto", art)
    assert be.name == "ort-cpu" and "ov-cpu" in how


def test_ov_int8_encoder_is_exported_verified_and_keeps_the_masks(sessile, moved, exported, monkeypatch):
    """``--ov-int8``: NNCF's int8 encoder in the artifact (its .bin listed with a sha256), run by the export's
    parity check on real polyps, and by ``ov-cpu --precision int8``: the embedding moves (it is int8), the masks
    hold against fp32 on three real polyps. Never the default, even where bf16 is not."""
    from imedsam_deploy.backends import open_backend, openvino
    from imedsam_deploy.backends.ort import OrtBackend

    man = json.loads((exported / C.MANIFEST_NAME).read_text())
    assert man["graphs"][C.OV_INT8]["encoder"] == C.ENCODER_OV_INT8
    assert {C.ENCODER_OV_INT8, C.ENCODER_OV_INT8.replace(".xml", ".bin")} <= set(man["files"])
    assert man["merge"][C.OV_INT8]["fake_quantize_nodes"] > 20 and "4 images" in man["merge"][C.OV_INT8]["calibration"]
    real = man["parity"]["real"][C.OV_INT8]
    assert real["images"] == 2 and real["mask_agreement"] >= 0.99 and "openvino" in real["runner"]
    art = load_artifact(exported)
    q, fp = openvino.OvBackend(art, "int8"), OrtBackend(art, "cpu", "fp32")
    assert q.precision == "int8" and "encoder in int8" in q.description
    # pixels: the second polyp covers 22 % of its image, so int8's boundary shift there is 1.5 % of the pixels
    # (98.51 %, Dice 96.73; the other two 99.99 % and 99.78 %), measured on a real Zen 4 with the seeded model
    _moves_embedding_keeps_masks(q, fp, art, moved, sessile, rel_max=0.2, dice_min=95.0, pixels_min=0.98)
    monkeypatch.setattr(openvino, "bf16_pays", lambda kernel, cpu: False)
    be, how = open_backend("ov-cpu", art)
    assert be.precision == "fp32" and "in fp32" in how


def test_ov_int8_export_refuses_bad_calibration_in_one_line(tmp_path):
    from imedsam_export.cli import app as export_app
    from imedsam_export.ov_int8 import calibration_images, calibration_inputs
    from imedsam_train.config import PreprocessConfig

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "x.png").write_bytes(b"not a png")
    for args, msg in (
        (["--calibration", str(empty)], "calibrates the --ov-int8 encoder; add --ov-int8"),
        (["--ov-int8", "--calibration", str(tmp_path / "nowhere")], "not a folder"),
        (["--ov-int8", "--calibration", str(empty)], "no images"),
        (["--ov-int8", "--calibration", str(broken)], "not a readable image"),
    ):
        out = tmp_path / "art"
        res = CliRunner().invoke(export_app, ["--out", str(out), "--no-verify", *args])
        lines = [ln for ln in res.output.splitlines() if ln.strip() and not ln.startswith("using")]
        assert res.exit_code == 2 and lines[-1].startswith("error: --") and msg in lines[-1], res.output
        assert not out.exists()
    # the default calibration set: the bundled sample's train split, in the model's preprocessing
    images, where = calibration_images()
    assert len(images) == 24 and images[0].ndim == 3 and "train split (24 images)" in where
    xs = calibration_inputs(images[:2], 64, PreprocessConfig())
    assert len(xs) == 2 and xs[0].shape == (1, 3, 64, 64) and xs[0].dtype == np.float32


_PROBE = ("import openvino as ov; from imedsam_deploy.backends.openvino import bf16_matmul_kernel, cpu_name, "
          "default_precision; print(bf16_matmul_kernel(), default_precision(ov.Core()), cpu_name(), sep='\\n')")


def _probe(isa: str | None) -> tuple[str, str, str]:
    """(bf16 kernel, default precision, CPU name) in a fresh process: oneDNN reads ONEDNN_MAX_CPU_ISA once."""
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"} | ({"ONEDNN_MAX_CPU_ISA": isa} if isa else {})
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    kernel, default, cpu = out.stdout.strip().split("\n")
    return kernel, default, cpu


def test_bf16_pays_on_amx_and_on_amds_avx512_bf16_only():
    from imedsam_deploy.backends.openvino import bf16_pays

    intel, amd = "Intel(R) Xeon(R) Platinum 8480+", "AMD EPYC 9654 96-Core Processor"
    assert bf16_pays("brgemm_avx512_amx_bf16", intel) and bf16_pays("brgemm_avx512_amx_bf16", amd)
    assert bf16_pays("brgemm_avx512_bf16", amd) and bf16_pays("brgemm_avx512_bf16", "AMD Ryzen 9 7950X")
    assert not bf16_pays("brgemm_avx512_bf16", intel)  # slower than fp32 there (emulated Cooper Lake)
    assert not bf16_pays("jit_gemm_bf16", amd) and not bf16_pays("", amd)  # OpenVINO's emulation, or none


def test_ov_cpu_defaults_to_bf16_only_where_it_pays():
    """The probe reads the kernel OpenVINO really picked, so the default follows ``ONEDNN_MAX_CPU_ISA``: with AMX
    masked off (AVX-512 BF16 left, as on Zen 4 or Cooper Lake) bf16 only on an AMD core; with AVX-512 BF16 masked
    off too (bf16 emulated, where the CPU has AVX-512 VNNI) fp32 on any CPU; AMX is never claimed on a CPU whose
    flags lack it."""
    from imedsam_deploy.backends.openvino import bf16_pays

    kernel, default, cpu = _probe("AVX512_CORE_BF16")
    amd = "AMD" in cpu.upper()
    assert "amx" not in kernel and default == ("bf16" if amd and "avx512" in kernel else "fp32"), (kernel, default)
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    if "avx512_vnni" in flags:
        kernel, default, _ = _probe("AVX512_CORE_VNNI")
        assert "avx512" not in kernel and default == "fp32", (kernel, default)
    kernel, default, cpu = _probe(None)
    assert default == ("bf16" if bf16_pays(kernel, cpu) else "fp32")  # the rule: the test above
    if "amx" in kernel and flags:
        assert "amx_bf16" in flags


def test_auto_and_the_commands_run_ov_cpu(sessile, moved, exported, tmp_path):
    from imedsam_deploy.backends import open_backend
    from imedsam_deploy.cli_bench import app as bench_app
    from imedsam_deploy.cli_infer import app

    art = load_artifact(exported)
    be, how = open_backend("auto", art)
    assert be.name == "ov-cpu" and how.startswith("backend auto -> ov-cpu")
    rgb, _, box = _case(sessile, STEMS[1])
    img = sessile / "images" / f"{STEMS[1]}.jpg"
    out = tmp_path / "out"
    res = CliRunner().invoke(app, [str(img), "--box", ",".join(str(int(v)) for v in box), "--artifact",
                                   str(exported), "--out", str(out), "--backend", "ov-cpu", "--precision", "fp32", "-q"])
    assert res.exit_code == 0, res.output
    from imedsam_deploy._cv import cv2

    mask = cv2.imread(str(out / "masks" / f"{STEMS[1]}.png"), cv2.IMREAD_GRAYSCALE) > 127
    ref = _torch_mask(moved, rgb, box.astype(int).astype(np.float64))
    assert mask.shape == ref.shape and (mask == ref).mean() >= 0.999
    js = tmp_path / "b.json"
    res = CliRunner().invoke(bench_app, [str(exported), "--backend", "ov-cpu", "--query", "sparse", "--image", str(img),
                                         "--box", ",".join(str(v) for v in box), "--repeat", "1", "--warmup", "0",
                                         "--threads", "2", "--out", str(tmp_path / "bo"), "--json", str(js)])
    assert res.exit_code == 0, res.output
    rows = json.loads(js.read_text())["results"]  # one per output size and precision
    assert rows and all(r["backend"] == "ov-cpu" and r["e2e_ms"]["p50"] > 0 for r in rows), rows
    # no --precision: the OpenVINO int8 encoder the artifact holds is timed beside ov-cpu's default
    import openvino as ov_mod

    from imedsam_deploy.backends.openvino import default_precision

    assert {r["precision"] for r in rows} == {default_precision(ov_mod.Core()), "int8"}
