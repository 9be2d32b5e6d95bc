"""I-MedSAM: SAM ViT encoder (LoRA + frequency adapter) and an implicit, box-prompted decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from imedsam_train.config import ModelConfig
from imedsam_train.model.encoder import ImageEncoder
from imedsam_train.model.fourier import fourier_dim, fourier_encode
from imedsam_train.model.inr import INR, PointPredictions
from imedsam_train.model.lora import LoRAQKV

# Parts of SAM's mask decoder that I-MedSAM does not use (its mask/IoU heads): kept for checkpoint
# compatibility, never trained, never exported.
UNUSED_PREFIXES = ("mask_decoder.output_hypernetworks_mlps.", "mask_decoder.iou_prediction_head.")


def grid_coords(height: int, width: int, device: torch.device | None = None) -> torch.Tensor:
    """Pixel-centre query coordinates of an H x W output, (H*W, 2) as (x, y) in [-1, 1], row-major."""
    ys = (2 * torch.arange(height, device=device, dtype=torch.float32) + 1) / height - 1
    xs = (2 * torch.arange(width, device=device, dtype=torch.float32) + 1) / width - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(-1, 2)


class IMedSAM(nn.Module):
    """Top-level names match segment-anything's ``Sam`` (image_encoder, prompt_encoder, mask_decoder)."""

    # state-dict prefixes never used (nor trained, nor stored in a checkpoint)
    unused_prefixes: tuple[str, ...] = UNUSED_PREFIXES
    # whether decoding adds a base logit map to the INR's logits (``box_maps``' second map); the lite preset's
    residual_readout = False

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.decoder.base_smoothing:
            raise ValueError("decoder base_smoothing needs a base logit map: only the lite model has one")
        self.cfg = cfg
        d, dec, g = cfg.encoder.out_chans, cfg.decoder, cfg.grid_size
        self.image_encoder = ImageEncoder(cfg.encoder, cfg.input_size, cfg.lora, cfg.frequency)
        self.prompt_encoder = PromptEncoder(
            embed_dim=d, image_embedding_size=(g, g), input_image_size=(cfg.input_size, cfg.input_size),
            mask_in_chans=16,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=d,
            transformer=TwoWayTransformer(
                depth=dec.transformer_depth, embedding_dim=d, mlp_dim=dec.transformer_mlp_dim,
                num_heads=dec.transformer_heads,
            ),
            num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256,
        )
        in_dim = d // 8 + d + fourier_dim(dec.fourier_levels, dec.fourier_include_input)
        self.inr = INR(
            in_dim, cfg.num_classes, dec.coarse_hidden, dec.coarse_feature, dec.fine_hidden,
            dec.dropout, dec.mc_samples, dec.refine_fraction,
        )
        self.apply_freeze_policy()

    # --- freezing ---
    def is_trainable_name(self, name: str) -> bool:
        if name.startswith(self.unused_prefixes):
            return False
        if self.cfg.trainable == "all":
            return True
        # paper: adapters (LoRA, FA), prompt encoder, output upscaling, INR
        return (
            ".lora_" in name or ".qkv.gate." in name or ".freq." in name
            or name.startswith(("prompt_encoder.", "mask_decoder.output_upscaling.", "inr."))
        )

    def stores_buffer(self, name: str) -> bool:
        """Whether a checkpoint fine-tuned from a base file holds this buffer (here: every buffer)."""
        return True

    def apply_freeze_policy(self) -> None:
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_trainable_name(name))

    def parameter_report(self) -> dict[str, tuple[int, int]]:
        """{part: (total, trainable)} per top-level part, LoRA and FA counted apart from the ViT."""
        rep: dict[str, list[int]] = {}
        for name, p in self.named_parameters():
            if ".lora_" in name or ".qkv.gate." in name:
                part = "lora"
            elif ".freq." in name:
                part = "frequency_adapter"
            elif name.startswith("mask_decoder.output_upscaling."):
                part = "output_upscaling"
            elif name.startswith("mask_decoder.transformer.") or name.startswith("mask_decoder."):
                part = "mask_decoder (transformer, tokens, unused heads)"
            else:
                part = name.split(".")[0]
            r = rep.setdefault(part, [0, 0])
            r[0] += p.numel()
            r[1] += p.numel() if p.requires_grad else 0
        return {k: (v[0], v[1]) for k, v in rep.items()}

    def merge_lora(self) -> int:
        """Fold every LoRA update into its qkv weight (idempotent). Returns the number of merged layers."""
        n = 0
        for m in self.modules():
            if isinstance(m, LoRAQKV):
                m.merge()
                n += 1
        return n

    # --- forward pieces ---
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) RGB in [0, 1] -> image embedding (B, C, S/16, S/16). Box-independent."""
        return self.image_encoder(image)

    def dense_pe(self) -> torch.Tensor:
        """The prompt encoder's dense positional map (1, C, g, g): it depends on neither the image nor the box."""
        return self.prompt_encoder.get_dense_pe()  # type: ignore[no-any-return]

    def decoder_features(self, embedding: torch.Tensor, boxes: torch.Tensor, tokens: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Box-conditioned feature maps: upscaled (B, C/8, 4g, 4g) and the dense positional map (1, C, g, g).

        boxes: (B, 4) in the model-input pixel frame, one per embedding row. tokens: the transformer's input
        tokens for them (B, 5 + 2, C: the output tokens, then the box's two corners), if made elsewhere (an
        inference copy makes them on the host); None: made here by the prompt encoder.
        """
        masks = self.box_mask(boxes) if self.cfg.decoder.box_mask_prompt else None
        md = self.mask_decoder
        if tokens is None:
            sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=masks)
            tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
            tokens = torch.cat([tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
        elif masks is not None:
            dense = self.prompt_encoder._embed_masks(masks)
        else:  # as the prompt encoder's, without its expand (the add below broadcasts)
            dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        pe = self.dense_pe()
        src = embedding + dense
        b, c, h, w = src.shape
        _, src = md.transformer(src, pe.expand(b, -1, -1, -1), tokens)
        up = md.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        return up, pe

    def box_mask(self, boxes: torch.Tensor) -> torch.Tensor:
        """The boxes as dense mask prompts (B, 1, 4g, 4g): +1 at cells whose centre is inside, -1 outside."""
        m = self.prompt_encoder.mask_input_size[0]
        c = (torch.arange(m, device=boxes.device, dtype=torch.float32) + 0.5) * (self.cfg.input_size / m)
        b = boxes.float()
        in_x = (c[None, :] >= b[:, 0:1]) & (c[None, :] <= b[:, 2:3])  # (B, m)
        in_y = (c[None, :] >= b[:, 1:2]) & (c[None, :] <= b[:, 3:4])
        inside = in_y[:, :, None] & in_x[:, None, :]
        return (inside.float() * 2 - 1)[:, None]

    def box_maps(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The box-conditioned maps the exported decoder samples: the upscaled map (B, C/8, 4g, 4g) and, for a
        model with a residual read-out, the base logit map (B, 1, 4g, 4g) (else None)."""
        return self.decoder_features(embedding, boxes)[0], None

    def point_features(self, up: torch.Tensor, pe: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """INR input at each query point: (B, N, C/8 + C + fourier). coords (B, N, 2) in [-1, 1]."""
        grid = coords[:, :, None, :].to(up.dtype)
        f_up = F.grid_sample(up, grid, mode="bilinear", align_corners=False)[..., 0]
        f_pe = F.grid_sample(pe.expand(coords.shape[0], -1, -1, -1), grid.to(pe.dtype), mode="bilinear",
                             align_corners=False)[..., 0]
        dec = self.cfg.decoder
        gamma = fourier_encode(coords, dec.fourier_levels, dec.fourier_include_input).to(up.dtype)
        return torch.cat([f_up.transpose(1, 2), f_pe.transpose(1, 2).to(up.dtype), gamma], dim=-1)

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor, coords: torch.Tensor) -> PointPredictions:
        """Predictions at arbitrary query points: coords (B, N, 2) or (N, 2) shared by the batch."""
        if coords.dim() == 2:
            coords = coords.unsqueeze(0).expand(embedding.shape[0], -1, -1)
        up, pe = self.decoder_features(embedding, boxes)
        return self.inr(self.point_features(up, pe, coords))

    def decode_dense(
        self, embedding: torch.Tensor, boxes: torch.Tensor, coords: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eval-mode export contract: coarse, fine (at every point) and uncertainty, each (B, K, N)."""
        up, pe = self.decoder_features(embedding, boxes)
        return self.inr.dense(self.point_features(up, pe, coords))

    def forward(
        self, image: torch.Tensor, boxes: torch.Tensor, coords: torch.Tensor | None = None,
        out_size: tuple[int, int] | None = None,
    ) -> PointPredictions:
        """Segment: query ``coords`` (B, N, 2) / (N, 2), or the full grid of ``out_size`` (default S x S).

        Full-grid outputs come back as (B, K, N) with N = H*W row-major; ``to_maps`` reshapes them.
        """
        if coords is None:
            h, w = out_size or (self.cfg.input_size, self.cfg.input_size)
            coords = grid_coords(h, w, image.device)
        return self.decode(self.encode(image), boxes, coords)


def to_maps(values: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, K, H*W) -> (B, K, H, W)."""
    return values.reshape(values.shape[0], values.shape[1], height, width)
