"""Rewrites of the box part (SAM's prompt encoder, two-way transformer and upscaling) for an inference copy run
by torch (torch-cuda's ``lean_box_part``); the box part runs once per box, every frame of a tracked video.

- ``freeze_dense_pe``: the dense positional map (depends on neither the image nor the box; ~17 kernels a call:
  a grid of cumsums, its Gaussian projection, sin, cos) computed once, under the autocast the backend runs, and
  read thereafter: bitwise the same values.
- ``ChannelsLastNorm``: the upscaling's LayerNorm2d (ten elementwise kernels in segment-anything's explicit form,
  in bf16 under autocast) as one ``layer_norm`` over the channels-last layout the transposed convolution
  writes (its input, the transformer's tokens, is channels-last already): fp32 under autocast, like every
  other LayerNorm; within fp32 rounding in fp32 (tests/test_box_part_rewrites.py).

The ONNX graphs keep the model's own forms.
"""

from __future__ import annotations

import contextlib

import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn

from imedsam_export.encoder_rewrites import layer_norm_of
from imedsam_train.model import IMedSAM


def freeze_dense_pe(model: IMedSAM, dtype: torch.dtype | None) -> torch.Tensor | None:
    """Compute the dense positional map once, as ``decoder_features`` would under autocast to ``dtype`` (None:
    no autocast), on the model's current device (freeze after moving), and make ``decoder_features`` read it.
    Returns it."""
    dev = next(model.parameters()).device
    amp = torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.no_grad(), amp:
        pe = model.prompt_encoder.get_dense_pe()
    model.frozen_dense_pe = pe
    return pe


class ChannelsLastNorm(nn.Module):
    """segment-anything's ``LayerNorm2d`` (over the channels of NCHW) as ``layer_norm`` over the channels-last view;
    returns an NCHW view of channels-last memory."""

    def __init__(self, norm: LayerNorm2d) -> None:
        super().__init__()
        self.norm = layer_norm_of(norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def lean_box_part(model: IMedSAM, dtype: torch.dtype | None) -> dict[str, int]:
    """Apply both rewrites to ``model`` in place (an inference copy); ``dtype``: the autocast dtype the backend
    runs (None: fp32). Returns how many of each were made."""
    freeze_dense_pe(model, dtype)
    ups = model.mask_decoder.output_upscaling
    norms = [i for i, m in enumerate(ups) if isinstance(m, LayerNorm2d)]
    for i in norms:
        ups[i] = ChannelsLastNorm(ups[i])
    return {"dense_pe_frozen": 1, "channels_last_norms": len(norms)}
