"""The encoder/decoder contract, declared once.

Imported by the model (imedsam_train), the exporter (imedsam_export) and the runtime (imedsam_deploy),
so names, layouts and preprocessing never get retyped. Pure Python: no numpy, no torch.

Coordinate convention (everywhere): a query point is (x, y) in [-1, 1]; -1 is the left/top *edge* of the
image and +1 the right/bottom edge, so the centre of output pixel (i, j) of an H x W output is
x = (2j + 1) / W - 1, y = (2i + 1) / H - 1 (``grid_sample(..., align_corners=False)``).
Boxes are (x0, y0, x1, y1) in the pixel frame of the model input (0 .. INPUT_SIZE), i.e. the original
image's box scaled by INPUT_SIZE / width and INPUT_SIZE / height.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

# --- preprocessing (the released code feeds RGB / 255 with no mean/std normalisation) ---
DEFAULT_INPUT_SIZE: Final = 384
COLOR_ORDER: Final = "RGB"
PIXEL_SCALE: Final = 1.0 / 255.0
# The image is stretched to INPUT_SIZE x INPUT_SIZE (aspect ratio not kept), bilinear, so that normalised
# query coordinates map linearly onto the original image.
RESIZE_MODE: Final = "stretch"
RESIZE_INTERPOLATION: Final = "linear"


# LiteMedSAM's preprocessing (the ``lite`` preset): the longest side resized to S (INTER_AREA), min-max scaled
# to [0, 1] over the resized image, zero-padded at the bottom and right; boxes scaled by the same factor in
# SAM's convention (x1/y1 the last covered column/row); an output grid covers the unpadded region only.
LETTERBOX_MODE: Final = "letterbox_minmax"
LETTERBOX_INTERPOLATION: Final = "area"
MINMAX_EPS: Final = 1e-8  # LiteMedSAM's
RESIZE_MODES: Final = (RESIZE_MODE, LETTERBOX_MODE)


def letterbox_shape(h: int, w: int, size: int) -> tuple[float, int, int]:
    """(scale, new h, new w) of the longest side resized to ``size`` (LiteMedSAM's rounding)."""
    scale = size / max(h, w)
    return scale, int(h * scale + 0.5), int(w * scale + 0.5)


def preprocessing_manifest(input_size: int, resize: str = RESIZE_MODE) -> dict[str, object]:
    """The preprocessing declaration written into every artifact manifest (``resize``: one of RESIZE_MODES)."""
    if resize == LETTERBOX_MODE:
        return {
            "input_size": input_size,
            "color_order": COLOR_ORDER,
            "pixel_scale": None,
            "mean": None,
            "std": None,
            "resize": LETTERBOX_MODE,
            "interpolation": LETTERBOX_INTERPOLATION,
            "normalise": f"min-max over the resized image to [0, 1] (eps {MINMAX_EPS})",
            "padding": "zeros at the bottom and right",
            "layout": "NCHW",
            "dtype": "float32",
            "box_frame": "model-input pixels (x0, y0, x1 - 1, y1 - 1) x scale (SAM's convention)",
            "coord_frame": "normalised [-1, 1] of the model input, (x, y), align_corners=False; an output grid "
                           "covers the unpadded region",
        }
    if resize != RESIZE_MODE:
        raise ValueError(f"unknown preprocessing {resize!r}")
    return {
        "input_size": input_size,
        "color_order": COLOR_ORDER,
        "pixel_scale": PIXEL_SCALE,
        "mean": None,
        "std": None,
        "resize": RESIZE_MODE,
        "interpolation": RESIZE_INTERPOLATION,
        "layout": "NCHW",
        "dtype": "float32",
        "box_frame": "model-input pixels (x0, y0, x1, y1)",
        "coord_frame": "normalised [-1, 1], (x, y), align_corners=False",
    }


# --- test-time augmentation ---
# ``--tta``: a prediction's logits averaged with those of the horizontally mirrored image and box, mirrored
# back (two encoder passes). The training and deploy paths both mirror with ``mirror_box``.


def mirror_box(box: Iterable[float], width: float) -> tuple[float, float, float, float]:
    """A pixel-edge box (x0, y0, x1, y1) on an image ``width`` pixels wide -> the same box on the image mirrored
    left to right (pixel edges: the box covering columns x0 .. x1 - 1 covers width - x1 .. width - x0 - 1 there)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return width - x1, y0, width - x0, y1


# --- graph I/O names ---
ENC_IN_IMAGE: Final = "image"  # (B, 3, S, S) float32, RGB * PIXEL_SCALE
ENC_OUT_EMBEDDING: Final = "image_embedding"  # (B, C, S/16, S/16)
DEC_IN_EMBEDDING: Final = "image_embedding"  # (B, C, h, w)
DEC_IN_BOXES: Final = "boxes"  # (B, 4) float32, model-input pixel frame
DEC_IN_COORDS: Final = "coords"  # (B, N, 2) float32 in [-1, 1]
DEC_OUT_COARSE: Final = "coarse_logits"  # (B, K, N) one channel per class
DEC_OUT_FINE: Final = "fine_logits"  # (B, K, N)
DEC_OUT_UNCERTAINTY: Final = "uncertainty"  # (B, K, N), >= 0

ENCODER_INPUTS: Final = (ENC_IN_IMAGE,)
ENCODER_OUTPUTS: Final = (ENC_OUT_EMBEDDING,)
DECODER_INPUTS: Final = (DEC_IN_EMBEDDING, DEC_IN_BOXES, DEC_IN_COORDS)
DECODER_OUTPUTS: Final = (DEC_OUT_COARSE, DEC_OUT_FINE, DEC_OUT_UNCERTAINTY)
# The decoder split in two (optional, fp32 / int8 artifacts; ONNX Runtime uses it): the box-conditioned part
# (prompt encoder, two-way transformer, upscaling) runs once per box, the per-point part once per chunk.
DEC_BOX_FEATURES: Final = "box_features"  # (B, C/8, 4h, 4w)
PROMPT_INPUTS: Final = (DEC_IN_EMBEDDING, DEC_IN_BOXES)
PROMPT_OUTPUTS: Final = (DEC_BOX_FEATURES,)
POINTS_INPUTS: Final = (DEC_BOX_FEATURES, DEC_IN_COORDS)

# Dynamic axis names used in the ONNX graphs and the TensorRT optimisation profile.
AXIS_BATCH: Final = "batch"
AXIS_POINTS: Final = "points"

# --- artifact layout ---
MANIFEST_NAME: Final = "manifest.json"
ENCODER_ONNX: Final = "encoder.onnx"
DECODER_ONNX: Final = "decoder.onnx"
ENCODER_ONNX_FP16: Final = "encoder.fp16.onnx"
DECODER_ONNX_FP16: Final = "decoder.fp16.onnx"
ENCODER_ONNX_INT8: Final = "encoder.int8.onnx"  # CPU only; pairs with the fp32 decoder
# OpenVINO's int8 encoder (``--ov-int8``): an OpenVINO model (this .xml, its weights in the .bin beside it) that
# pairs with the fp32 decoder graphs; its manifest graphs key is OV_INT8, ``ov-cpu --precision int8`` runs it
ENCODER_OV_INT8: Final = "encoder.ov-int8.xml"
OV_INT8: Final = "ov-int8"
DECODER_PROMPT_ONNX: Final = "decoder_prompt.onnx"  # the decoder split in two (see PROMPT_INPUTS)
DECODER_POINTS_ONNX: Final = "decoder_points.onnx"
# precisions an artifact can hold; "int8" = int8-weight encoder (ONNX Runtime CPU) + fp32 decoder
PRECISIONS: Final = ("fp32", "fp16", "bf16", "int8")
MANIFEST_FORMAT: Final = "imedsam-artifact"
MANIFEST_VERSION: Final = 1

# --- uncertainty-guided sampling defaults (paper / released code) ---
DEFAULT_REFINE_FRACTION: Final = 0.125


def refine_count(n_points: int, fraction: float) -> int:
    """Number of points the fine INR refines among n_points: ceil(fraction * n), at least 1 when n > 0."""
    if n_points <= 0:
        return 0
    k = -(-int(round(fraction * n_points * 1e6)) // 1_000_000)  # ceil without float drift
    return max(1, min(n_points, k))
