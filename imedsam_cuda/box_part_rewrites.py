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
- ``use_lean_two_way``: the two-way transformer's forward without its repeated work, where the box part runs
  without autocast (fp32): ``keys + key_pe`` made once a layer (segment-anything makes it twice), the queries
  plus their embedding reused from the layer before (the next layer's self-attention and the final attention
  read the same sum), and each MLP's first layer with its ReLU as one GEMM epilogue: bitwise the same
  operations on the same values, six kernels fewer a box (tests/test_box_part_rewrites.py). With
  ``fused_norms`` (a Triton kernel, ``fused_add_norm``), each residual add, its LayerNorm and the positional
  add after it are one kernel: fourteen fewer again, within fp32 rounding.

The ONNX graphs keep the model's own forms.
"""

from __future__ import annotations

import contextlib
import math
import types
from typing import Any

import numpy as np
import torch
from segment_anything.modeling.common import LayerNorm2d, MLPBlock
from segment_anything.modeling.transformer import TwoWayAttentionBlock, TwoWayTransformer
from torch import nn

from imedsam_cuda import fused_add_norm
from imedsam_cuda.encoder_rewrites import layer_norm_of
from imedsam_train.model import IMedSAM


def freeze_dense_pe(model: IMedSAM, dtype: torch.dtype | None) -> torch.Tensor | None:
    """Compute the dense positional map once, as ``decoder_features`` would under autocast to ``dtype`` (None:
    no autocast), on the model's current device (freeze after moving), and make this instance's ``dense_pe`` return
    it (what ``decoder_features`` reads; the prompt encoder's own ``get_dense_pe`` is untouched). Returns it."""
    dev = next(model.parameters()).device
    amp = torch.autocast(dev.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.no_grad(), amp:  # channels-last: read as (g g, C) tokens by the transformer, contiguous that way
        pe = model.prompt_encoder.get_dense_pe().contiguous(memory_format=torch.channels_last)
    model.dense_pe = lambda: pe  # type: ignore[method-assign]
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
    """Apply the rewrites to ``model`` in place (an inference copy); ``dtype``: the autocast dtype the box part
    runs under (None: none, fp32; the lean two-way transformer then too). Returns how many of each were made."""
    freeze_dense_pe(model, dtype)
    ups = model.mask_decoder.output_upscaling
    norms = [i for i, m in enumerate(ups) if isinstance(m, LayerNorm2d)]
    for i in norms:
        ups[i] = ChannelsLastNorm(ups[i])
    lean = dtype is None and use_lean_two_way(model.mask_decoder.transformer)
    return {"dense_pe_frozen": 1, "channels_last_norms": len(norms), "lean_two_way": int(lean)}


def use_lean_two_way(transformer: nn.Module, on: bool = True) -> bool:
    """Switch a ``TwoWayTransformer``'s forward (this instance's) to the lean one, or back; returns whether it
    is on. Its ``fused_norms`` attribute (``use_fused_box_norms``) picks the Triton kernel for its norms."""
    if not isinstance(transformer, TwoWayTransformer):
        raise TypeError(f"use_lean_two_way: not segment-anything's TwoWayTransformer: {type(transformer).__name__}")
    if on:
        transformer.forward = types.MethodType(_lean_two_way_forward, transformer)  # type: ignore[method-assign]
    elif "forward" in transformer.__dict__:
        del transformer.forward
    setattr(transformer, "fused_norms", False)  # noqa: B010  # a plain attribute of this instance
    return on


def use_fused_box_norms(transformer: nn.Module, on: bool = True) -> bool:
    """The lean two-way transformer's adds, norms and positional adds as ``fused_add_norm`` kernels (or torch
    ops); returns whether they are now fused (never without the lean forward)."""
    fused = on and "forward" in transformer.__dict__
    setattr(transformer, "fused_norms", fused)  # noqa: B010
    return fused


def _norm(x: torch.Tensor, a: torch.Tensor | None, norm: nn.LayerNorm, fused: bool) -> torch.Tensor:
    """LN(x + a) (a optional), as one kernel when ``fused``."""
    if fused:  # through the module's attribute, which benchmarks/op_count replaces to count it
        return fused_add_norm.add_norm(x, a, None, norm, x.dtype, write_sum=False)[1]
    return norm(x + a if a is not None else x)  # type: ignore[no-any-return]


def _norm_post(x: torch.Tensor, a: torch.Tensor | None, norm: nn.LayerNorm, post: torch.Tensor,
               fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, y + post) for y = LN(x + a) (a optional), as one kernel when ``fused``."""
    if fused:
        return fused_add_norm.add_norm_post(x, a, norm, post, x.dtype)
    y = _norm(x, a, norm, False)
    return y, y + post


def _mlp(mlp: MLPBlock, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's MLPBlock; with a ReLU, lin1 and the ReLU as one GEMM with a ReLU epilogue."""
    if not isinstance(mlp.act, nn.ReLU):
        return mlp(x)  # type: ignore[no-any-return]
    h = torch._addmm_activation(mlp.lin1.bias, x.reshape(-1, x.shape[-1]), mlp.lin1.weight.t())
    return mlp.lin2(h.view(*x.shape[:-1], -1))  # type: ignore[no-any-return]


def _lean_layer(layer: TwoWayAttentionBlock, queries: torch.Tensor, keys: torch.Tensor, q: torch.Tensor | None,
                k: torch.Tensor, query_pe: torch.Tensor, key_pe: torch.Tensor, fused: bool) -> tuple[Any, ...]:
    """``TwoWayAttentionBlock.forward`` given q = queries + query_pe (None: not made yet) and k = keys + key_pe;
    returns the new (queries, keys, q, k)."""
    if layer.skip_first_layer_pe:
        queries, q = _norm_post(layer.self_attn(q=queries, k=queries, v=queries), None, layer.norm1, query_pe, fused)
    else:
        q = queries + query_pe if q is None else q
        queries, q = _norm_post(queries, layer.self_attn(q=q, k=q, v=queries), layer.norm1, query_pe, fused)
    queries = _norm(queries, layer.cross_attn_token_to_image(q=q, k=k, v=keys), layer.norm2, fused)
    queries, q = _norm_post(queries, _mlp(layer.mlp, queries), layer.norm3, query_pe, fused)
    keys, k = _norm_post(keys, layer.cross_attn_image_to_token(q=k, k=q, v=queries), layer.norm4, key_pe, fused)
    return queries, keys, q, k


def _lean_two_way_forward(self: TwoWayTransformer, image_embedding: torch.Tensor, image_pe: torch.Tensor,
                          point_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``TwoWayTransformer.forward`` with each sum made once (module docstring); segment-anything's own under
    autocast, whose casts these rewrites do not reproduce."""
    if torch.is_autocast_enabled(image_embedding.device.type):
        return TwoWayTransformer.forward(self, image_embedding, image_pe, point_embedding)  # type: ignore[no-any-return]
    fused = bool(getattr(self, "fused_norms", False))
    keys = image_embedding.flatten(2).permute(0, 2, 1)
    key_pe = image_pe.flatten(2).permute(0, 2, 1)
    if image_pe.stride(0) == 0:  # one map for every image (expanded): read as such, by the adds and the kernel
        key_pe = key_pe[:1]
    queries, q, k = point_embedding, None, keys + key_pe
    for layer in self.layers:
        queries, keys, q, k = _lean_layer(layer, queries, keys, q, k, point_embedding, key_pe, fused)
    # the final attention's q is the last layer's queries + point_embedding, made after its norm3
    q = queries + point_embedding if q is None else q
    attn = self.final_attn_token_to_image(q=q, k=k, v=keys)
    queries = _norm(queries, attn, self.norm_final_attn, fused)
    return queries, keys


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
