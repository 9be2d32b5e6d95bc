"""An int8 encoder for OpenVINO on Intel CPUs without AMX (``--ov-int8``): NNCF's post-training quantisation of the
encoder's matrix products, calibrated on real images.

Why: where an Intel CPU has no AMX, ``ov-cpu`` runs the encoder in fp32 (bf16 there was slower still). With int8
matrix products on AVX-512 VNNI the lite encoder took 0.26 s against fp32's 0.40 s (the dev VM with AMX masked off,
``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``; benchmarks/RESULTS.md). Where int8 runs without VNNI (AVX2 alone) it was
slower than fp32, and where ``ov-cpu`` defaults to bf16 slower than bf16 (AMX; a real AMD Zen 4: 0.39 s against
0.30 s). ``ov-cpu`` runs it only when asked (``--precision int8``): its
mean HD95 on Kvasir-Sessile test fell behind LiteMedSAM's with jittered boxes, which a default may not.

What is quantised: NNCF's transformer scheme (``ModelType.TRANSFORMER``: matrix products with SmoothQuant; softmax,
LayerNorm and the rest float), with every convolution left float: quantising the convolutions too (NNCF's default)
flipped a case's mask by up to 16 Dice points on val, against 0.9 with them float. Calibration: the model's own
preprocessing of real images, by default the bundled sample's train split (24 Kvasir-Sessile images: never the
val or test images the parity check and the benchmarks score). The float weights are stored in fp16 (OpenVINO's
default for saved models) and computed in fp32. The export's parity check runs the graph on OpenVINO beside the
fp32 decoder and refuses it past the int8 tolerances (``verify.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from imedsam_core import contract as C
from imedsam_core.errors import UserError
from imedsam_export.verify import SAMPLE_DIR, make_sample
from imedsam_train.config import PreprocessConfig
from imedsam_train.data.io import IMAGE_SUFFIXES, find_image

CALIBRATION_MAX = 300  # images; NNCF's statistics settle well before this, and each costs an encoder pass
IGNORED_TYPES = ("Convolution", "GroupConvolution")  # OpenVINO's op types for the convolutions left float


def calibration_images(folder: Path | None = None) -> tuple[list[np.ndarray], str]:
    """The calibration images (RGB uint8) and where they came from: every image in ``folder`` (up to
    CALIBRATION_MAX, sorted by name), or the bundled sample's train split. Read before the export's slow steps, so
    a bad folder is refused at once, in one line."""
    if folder is None:
        split = SAMPLE_DIR / "splits" / "train.txt"
        if not split.is_file():
            raise UserError("--ov-int8: the bundled sample (data/sample/kvasir-sessile) is not in this install; "
                            "pass --calibration DIR (a folder of images like the ones the model will see)")
        stems = split.read_text().split()[:CALIBRATION_MAX]
        found = [find_image(SAMPLE_DIR / "images", s) for s in stems]
        missing = [s for s, f in zip(stems, found, strict=True) if f is None]
        if missing:
            raise UserError(f"{split}: {len(missing)} of its images are missing from {SAMPLE_DIR / 'images'} "
                            f"(e.g. {missing[0]}); pass --calibration DIR")
        files = [f for f in found if f is not None]
        where = f"the bundled {SAMPLE_DIR.name} sample's train split ({len(files)} images)"
    else:
        if not folder.is_dir():
            raise UserError(f"--calibration {folder}: not a folder")
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:CALIBRATION_MAX]
        if not files:
            raise UserError(f"--calibration {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
        where = f"{folder} ({len(files)} images)"
    import cv2

    out = []
    for p in files:
        bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if bgr is None:
            raise UserError(f"--calibration {p}: not a readable image")
        out.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return out, where


def calibration_inputs(images: list[np.ndarray], size: int, pre: PreprocessConfig) -> list[np.ndarray]:
    """The encoder's inputs (1, 3, S, S) for ``images`` (RGB), in the model's own preprocessing."""
    out = []
    for i, rgb in enumerate(images):
        h, w = rgb.shape[:2]
        box = np.array([0, 0, w, h], np.float32)  # not used: only the image reaches the encoder
        out.append(make_sample(str(i), rgb, box, None, size, pre).image[None])
    return out


def quantize_ov_int8(src: Path, dst: Path, inputs: list[np.ndarray], size: int) -> dict[str, Any]:
    """``src`` (the fp32 encoder ONNX) quantised with ``inputs`` -> the OpenVINO model ``dst`` (.xml, its .bin
    beside it), batch left dynamic. Returns what the manifest records."""
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        raise UserError(f"--ov-int8 needs {e.name} (pip install 'imedsam[train]' brings it)") from None
    logging.getLogger("nncf").setLevel(logging.ERROR)  # its per-step INFO lines; ours say what it did
    model = ov.Core().read_model(str(src))
    model.reshape({C.ENC_IN_IMAGE: [1, 3, size, size]})  # the calibration batches' shape
    quantized = nncf.quantize(model, nncf.Dataset(inputs), subset_size=len(inputs),
                              model_type=nncf.ModelType.TRANSFORMER,
                              ignored_scope=nncf.IgnoredScope(types=list(IGNORED_TYPES)))
    quantized.reshape({C.ENC_IN_IMAGE: [-1, 3, size, size]})
    ov.save_model(quantized, str(dst))  # float weights compressed to fp16 (OpenVINO's default), computed in fp32
    fq = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ops())
    return {"tool": f"nncf {nncf.__version__}, openvino {ov.__version__.split('-')[0]}",
            "scheme": "ModelType.TRANSFORMER (SmoothQuant), convolutions float", "fake_quantize_nodes": fq,
            "calibration_images": len(inputs)}
