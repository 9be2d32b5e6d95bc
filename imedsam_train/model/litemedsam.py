"""LiteMedSAM: our TinyViT encoder + segment-anything's prompt encoder and mask decoder, box-prompted.

Its preprocessing (declared here once, applied in ``imedsam_train.pretrained``): the longest side resized
to INPUT_SIZE (area interpolation), the whole image min-max scaled to [0, 1], zero-padded at the bottom
and right to INPUT_SIZE x INPUT_SIZE; boxes scaled by the same factor. Its 256 x 256 low-resolution logits
are cropped to the unpadded region and resized to the output size.
"""

from __future__ import annotations

from typing import Final

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from imedsam_core.contract import MINMAX_EPS
from imedsam_train.config import TinyViTConfig
from imedsam_train.model.tinyvit import TinyViT

INPUT_SIZE: Final = 256
RESIZE: Final = "longest-side"  # aspect ratio kept, then zero padding at the bottom and right
RESIZE_INTERPOLATION: Final = "area"
INTENSITY: Final = "min-max"  # over the whole resized image, all channels: (x - min) / max(max - min, 1e-8)
MASK_IN_CHANS: Final = 16
__all__ = ["INPUT_SIZE", "MASK_IN_CHANS", "MINMAX_EPS", "LiteMedSAM"]


class LiteMedSAM(nn.Module):
    """Box-prompted SAM on a TinyViT encoder; parameter names are LiteMedSAM's (strict loading)."""

    def __init__(self, encoder: TinyViTConfig | None = None) -> None:
        super().__init__()
        cfg = encoder or TinyViTConfig(input_size=INPUT_SIZE)
        g, dim = cfg.grid_size, cfg.out_chans
        self.image_encoder = TinyViT(cfg)
        self.prompt_encoder = PromptEncoder(
            embed_dim=dim, image_embedding_size=(g, g), input_image_size=(cfg.input_size, cfg.input_size),
            mask_in_chans=MASK_IN_CHANS,
        )
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=dim, mlp_dim=2048, num_heads=8),
            transformer_dim=dim, iou_head_depth=3, iou_head_hidden_dim=256,
        )

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed -> (B, 256, S/4, S/4)."""
        return self.image_encoder(image)

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """One image's embedding (1, C, g, g) and K boxes (K, 4) in SAM's frame (input pixels, x1/y1 the
        last covered column/row) -> low-resolution logits (K, 1, 4g, 4g), the single-mask output."""
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes[:, None, :], masks=None)
        logits, _ = self.mask_decoder(
            image_embeddings=embedding, image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
        )
        return logits

    def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(image), boxes)
