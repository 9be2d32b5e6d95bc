"""Rewrites of the box part (SAM's prompt encoder, two-way transformer and upscaling) for an inference copy run
by torch (torch-cuda's ``lean_box_part``); the box part runs once per box, every frame of a tracked video.

- ``freeze_dense_pe``: the dense positional map (depends on neither the image nor the box; ~17 kernels a call:
  a grid of cumsums, its Gaussian projection, sin, cos) computed once, under the autocast the backend runs, and
  read thereafter: bitwise the same values.
- ``ChannelsLastNorm``: the upscaling's LayerNorm2d (ten elementwise kernels in segment-anything's explicit form,
  in bf16 under autocast) as one ``layer_norm`` over the channels-last layout the transposed convolution
  writes (its input, the transformer's tokens, is channels-last already): fp32 under autocast, like every
  other LayerNorm; within fp32 rounding in fp32 (tests/test_box_part_rewrites.py).

- ``HostPromptTokens``: the transformer's input tokens for a box (the output tokens, the box corners' random
  Fourier encoding plus their embeddings) made on the host in float64, uploaded instead of the box: none of the
  ~20 small kernels the prompt encoder runs a box (its coordinate arithmetic, a 2 x 128 matmul, sin, cos, the
  corners' adds and three concatenations), and closer to the fp32 model than the device's fp32 (and much closer
  than its bf16, which rounds the coordinates to 8 bits before the matmul under autocast).

The ONNX graphs keep the model's own forms.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
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
    with torch.no_grad(), amp:  # channels-last: read as (g g, C) tokens by the transformer, contiguous that way
        pe = model.prompt_encoder.get_dense_pe().contiguous(memory_format=torch.channels_last)
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


class HostPromptTokens:
    """boxes (B, 4) in the model-input pixel frame (numpy) -> the transformer's input tokens (B, 5 + 2, C) float32,
    as ``IMedSAM.decoder_features`` makes them from the prompt encoder (segment-anything's ``_embed_boxes``: pixel
    centres, normalised to [-1, 1], times the Gaussian matrix, times 2 pi, sin and cos), in float64."""

    def __init__(self, model: IMedSAM) -> None:
        pe, md = model.prompt_encoder, model.mask_decoder

        def host(t: torch.Tensor) -> np.ndarray:
            return t.detach().to("cpu", torch.float64).numpy()

        self.gauss = host(pe.pe_layer.positional_encoding_gaussian_matrix)  # (2, C / 2)
        self.corners = np.stack([host(pe.point_embeddings[2].weight[0]), host(pe.point_embeddings[3].weight[0])])
        self.out_tokens = np.concatenate([host(md.iou_token.weight), host(md.mask_tokens.weight)])  # (5, C)
        self.hw = pe.input_image_size

    def __call__(self, boxes: np.ndarray) -> np.ndarray:
        b = boxes.shape[0]
        xy = (np.asarray(boxes, np.float64).reshape(b, 2, 2) + 0.5) / np.array([self.hw[1], self.hw[0]])
        arg = 2 * math.pi * ((2 * xy - 1) @ self.gauss)  # (B, 2, C / 2)
        corners = np.concatenate([np.sin(arg), np.cos(arg)], axis=-1) + self.corners
        out = np.broadcast_to(self.out_tokens, (b, *self.out_tokens.shape))
        return np.concatenate([out, corners], axis=1).astype(np.float32)
