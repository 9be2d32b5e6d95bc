"""I-MedSAM on LiteMedSAM (the ``lite`` preset): built so that, untrained, it IS zero-shot LiteMedSAM.

Encoder: LiteMedSAM's TinyViT, frozen, every weight from its file.
- LoRA (rank 4, A Kaiming, B zero) on the query and value parts of every attention block's fused qkv. TinyViT
  lays its qkv out per head (q, k, v of head 0, then head 1, ...), so the update's rows are interleaved the
  same way; merging is ``LoRAQKV.merge`` (idempotent).
- Frequency adapter on the hierarchical encoder: the centred amplitude spectrum of the input (one channel,
  min-max normalised, ``frequency.spectrum``) is patch-embedded once per attention stage (1-3) at that stage's
  resolution and width by a small trainable strided convolution (kernel = stride = input / stage resolution,
  1 -> C channels). TinyViT has no frozen patch embedding to reuse: its stem is pointwise at full resolution
  and reaches the token grids only through the MBConv stage and the patch merges (0.9 s of a CPU forward).
  Within a stage the tokens f are refined block by block by the bottleneck adapter
  (z = LayerNorm(f), d = up(gelu(down(z))), f <- z + d, as in the paper's chain), and each block adds
  0.5 * d beside its MLP: x = x + mlp(x) + 0.5 d. ``up`` (the adapter's last layer) starts at zero, so every
  addition is 0 and the encoder's output is LiteMedSAM's until training moves it. Stage 0 (MBConv) has none.

Decoder: LiteMedSAM's prompt encoder, two-way transformer and output upscaling (their weights, SAM's names)
give the 32-channel 4g x 4g image-side map, which is sampled with the dense positional map and a Fourier
encoding at each query point into the coarse and fine INRs (uncertainty-guided sampling, closed-form
uncertainty at inference). Residual read-out: the base mask head's own logit, computed as SAM does (the first
mask token's hypernetwork MLP dotted with the upscaled map, on the 4g x 4g grid) and sampled bilinearly at
the point, is added to both INR logits. The INR heads' logit rows start at zero, so the untrained model's
per-point logit is LiteMedSAM's low-resolution logit at that point. ``DecoderConfig.base_smoothing`` (off by
default; the shipped model's config sets it) smooths the base logit map with a fixed Gaussian first.

Frozen BatchNorm: the encoder's BatchNorm layers stay in eval mode in ``train()`` (batch statistics would
change the frozen function).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch import nn

from imedsam_train.config import FrequencyConfig, LoraConfig, ModelConfig, TinyViTConfig
from imedsam_train.model.fourier import fourier_dim
from imedsam_train.model.frequency import FrequencyAdapter, spectrum
from imedsam_train.model.imedsam import IMedSAM
from imedsam_train.model.inr import INR, PointPredictions
from imedsam_train.model.litemedsam import MASK_IN_CHANS
from imedsam_train.model.lora import LoRAQKV
from imedsam_train.model.smoothing import LogitSmoothing
from imedsam_train.model.tinyvit import AttentionStage, TinyViT, TinyViTBlock, WindowAttention


class HeadInterleavedLoRAQKV(LoRAQKV):
    """``LoRAQKV`` for a qkv whose output is laid out per head, [q_h, k_h, v_h] for h = 0.. (TinyViT's)."""

    def __init__(self, dim: int, rank: int, heads: int) -> None:
        super().__init__(dim, rank)
        self.heads = heads

    def delta_weight(self) -> torch.Tensor:
        thirds = super().delta_weight()  # rows [q (all heads), k, v]
        d = self.dim
        return thirds.view(3, self.heads, d // self.heads, d).transpose(0, 1).reshape(3 * d, d)


class StageFrequency(nn.Module):
    """One attention stage's frequency tokens: the spectrum patch-embedded, then one adapter per block."""

    def __init__(self, dim: int, stride: int, blocks: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(1, dim, kernel_size=stride, stride=stride)
        self.adapters = nn.ModuleList(FrequencyAdapter(dim, hidden) for _ in range(blocks))
        for a in self.adapters:
            assert isinstance(a, FrequencyAdapter)
            nn.init.zeros_(a.up.weight)
            nn.init.zeros_(a.up.bias)


class LiteImageEncoder(TinyViT):
    """TinyViT (LiteMedSAM's names) + LoRA on every qkv + the per-stage frequency adapter."""

    def __init__(self, cfg: TinyViTConfig, lora: LoraConfig, freq: FrequencyConfig) -> None:
        super().__init__(cfg)
        if lora.gate:
            raise ValueError("the lite preset has no gated LoRA")
        if lora.enabled:
            for m in self.modules():
                if isinstance(m, WindowAttention):
                    dim = m.qkv.in_features
                    m.qkv = HeadInterleavedLoRAQKV(dim, lora.rank, m.heads)
        self.freq_cfg = freq
        self.freq: nn.ModuleList | None = None
        if freq.enabled:
            stages = []
            for layer in self.layers[1:]:
                assert isinstance(layer, AttentionStage)
                if cfg.input_size % layer.resolution:
                    raise ValueError(f"input {cfg.input_size} is not a multiple of stage resolution {layer.resolution}")
                blk = layer.blocks[0]
                assert isinstance(blk, TinyViTBlock)
                dim = blk.attn.qkv.in_features
                stages.append(StageFrequency(dim, cfg.input_size // layer.resolution, len(layer.blocks), freq.hidden))
            self.freq = nn.ModuleList(stages)

    def frequency_spectrum(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, S, S) normalised spectrum; the exporter swaps this for DFT matrix products."""
        return spectrum(image, self.freq_cfg.channel, self.freq_cfg.mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.frequency_spectrum(x).to(x.dtype) if self.freq is not None else None
        h = self.layers[0](self.patch_embed(x))
        for i, layer in enumerate(self.layers[1:]):
            assert isinstance(layer, AttentionStage)
            if self.freq is None or spec is None:
                h = layer(h)
                continue
            sf = self.freq[i]
            assert isinstance(sf, StageFrequency)
            f = sf.embed(spec).flatten(2).transpose(1, 2)  # (B, H*W, C)
            for blk, ad in zip(layer.blocks, sf.adapters, strict=True):
                assert isinstance(blk, TinyViTBlock) and isinstance(ad, FrequencyAdapter)
                h, f = _block_with_adapter(blk, ad, h, f, self.freq_cfg.scale)
            if layer.downsample is not None:
                b, _, c = h.shape
                h = layer.downsample(h.transpose(1, 2).reshape(b, c, layer.resolution, layer.resolution))
        b, _, c = h.shape
        g = self.cfg.grid_size
        return self.neck(h.transpose(1, 2).reshape(b, c, g, g))  # type: ignore[no-any-return]


def _block_with_adapter(blk: TinyViTBlock, ad: FrequencyAdapter, x: torch.Tensor, f: torch.Tensor,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``TinyViTBlock.forward`` with the adapter's branch added beside the MLP."""
    b, n, c = x.shape
    r = blk.resolution
    x = x + blk.drop_path(blk._windowed(x))
    x = blk.local_conv(x.transpose(1, 2).reshape(b, c, r, r)).view(b, c, n).transpose(1, 2)
    z = ad.norm(f)
    d = ad.up(ad.act(ad.down(z)))
    return x + blk.drop_path(blk.mlp(x)) + scale * d, z + d


class LiteIMedSAM(IMedSAM):
    """The ``lite`` preset (see the module docstring). Top-level names as LiteMedSAM's / SAM's."""

    # only the multi-mask heads and the IoU head go unused: the first mask's hypernetwork MLP is the base read-out
    unused_prefixes: tuple[str, ...] = (
        "mask_decoder.iou_prediction_head.", "mask_decoder.output_hypernetworks_mlps.1.",
        "mask_decoder.output_hypernetworks_mlps.2.", "mask_decoder.output_hypernetworks_mlps.3.",
    )

    residual_readout = True  # the base mask head's logit is added to the INR's (``box_maps``, ``base_offset``)

    def __init__(self, cfg: ModelConfig) -> None:
        nn.Module.__init__(self)  # not IMedSAM's: it would build a SAM ViT
        if cfg.tinyvit is None or cfg.backbone != "tinyvit":
            raise ValueError("the lite model needs backbone 'tinyvit' and a TinyViTConfig")
        if cfg.decoder.box_mask_prompt:
            raise ValueError("the lite model has no box mask prompt (LiteMedSAM was not trained with one)")
        self.cfg = cfg
        tv, dec = cfg.tinyvit, cfg.decoder
        d, g = tv.out_chans, tv.grid_size
        # a TinyViT where IMedSAM has its ViT: the SAM-ViT-only paths (export rewrites) refuse this model
        self.image_encoder = LiteImageEncoder(tv, cfg.lora, cfg.frequency)  # type: ignore[assignment]
        self.prompt_encoder = PromptEncoder(
            embed_dim=d, image_embedding_size=(g, g), input_image_size=(cfg.input_size, cfg.input_size),
            mask_in_chans=MASK_IN_CHANS,
        )
        self.mask_decoder = MaskDecoder(
            transformer_dim=d,
            transformer=TwoWayTransformer(depth=dec.transformer_depth, embedding_dim=d,
                                          mlp_dim=dec.transformer_mlp_dim, num_heads=dec.transformer_heads),
            num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=256,
        )
        self.inr = INR(
            d // 8 + d + fourier_dim(dec.fourier_levels, dec.fourier_include_input), cfg.num_classes,
            dec.coarse_hidden, dec.coarse_feature, dec.fine_hidden, dec.dropout, dec.mc_samples, dec.refine_fraction,
        )
        # the base logit map smoothed before its points read it (``DecoderConfig.base_smoothing``; 0: off)
        self.base_smoothing: LogitSmoothing | None = None
        with torch.no_grad():  # residual read-out: the INR's logits start at 0 (its coarse feature does not)
            self.inr.coarse_head.weight[: cfg.num_classes].zero_()
            self.inr.coarse_head.bias[: cfg.num_classes].zero_()
            self.inr.fine_head.weight.zero_()
            self.inr.fine_head.bias.zero_()
        self.set_base_smoothing(dec.base_smoothing)
        self.apply_freeze_policy()
        self.train()  # a new module is in training mode: the frozen BatchNorm layers must not be

    def set_base_smoothing(self, sigma: float) -> None:
        """Smooth the base logit map with a Gaussian of ``sigma`` pixels from now on (0: off); the config
        follows, so a checkpoint saved from this model rebuilds it."""
        dec = dataclasses.replace(self.cfg.decoder, base_smoothing=sigma)  # validates sigma
        self.cfg = self.cfg.replace(decoder=dec)
        dev = self.inr.fine_head.weight.device
        self.base_smoothing = LogitSmoothing(sigma).to(dev) if sigma else None

    def is_trainable_name(self, name: str) -> bool:
        if name.startswith(self.unused_prefixes):
            return False
        if self.cfg.trainable == "all":
            return True
        return (".lora_" in name or ".freq." in name or name.startswith(
            ("prompt_encoder.", "mask_decoder.output_upscaling.", "mask_decoder.output_hypernetworks_mlps.0.",
             "inr.")))

    def stores_buffer(self, name: str) -> bool:
        # the encoder's buffers (frozen BatchNorm statistics) come from the base file
        return not name.startswith("image_encoder.")

    def train(self, mode: bool = True) -> LiteIMedSAM:
        super().train(mode)
        for m in self.image_encoder.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    def base_features(self, embedding: torch.Tensor, boxes: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Upscaled map (B, C/8, 4g, 4g), dense positional map (1, C, g, g) and the base mask head's logits
        (B, 1, 4g, 4g): SAM's ``predict_masks`` for the first mask token, smoothed if the config says so.
        boxes (B, 4), SAM's convention."""
        md = self.mask_decoder
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens.unsqueeze(0).expand(sparse.shape[0], -1, -1), sparse], dim=1)
        pe = self.prompt_encoder.get_dense_pe()
        src = embedding + dense
        b, c, h, w = src.shape
        hs, src = md.transformer(src, pe.expand(b, -1, -1, -1), tokens)
        up = md.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = md.output_hypernetworks_mlps[0](hs[:, 1, :])  # (B, C/8)
        low = (hyper[:, None, :] @ up.flatten(2)).view(b, 1, up.shape[-2], up.shape[-1])
        if self.base_smoothing is not None:
            low = self.base_smoothing(low)
        return up, pe, low

    def decoder_features(self, embedding: torch.Tensor, boxes: torch.Tensor, tokens: torch.Tensor | None = None,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        up, pe, _ = self.base_features(embedding, boxes)
        return up, pe

    def box_maps(self, embedding: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        up, _, low = self.base_features(embedding, boxes)
        return up, low

    def base_offset(self, low: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """The base logit at each point, (B, N, K): bilinear, border-clamped (as a crop-and-resize reads it)."""
        grid = coords[:, :, None, :].to(low.dtype)
        v = F.grid_sample(low, grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0, :, 0]
        return v[..., None].expand(-1, -1, self.cfg.num_classes)

    def decode(self, embedding: torch.Tensor, boxes: torch.Tensor, coords: torch.Tensor) -> PointPredictions:
        if coords.dim() == 2:
            coords = coords.unsqueeze(0).expand(embedding.shape[0], -1, -1)
        up, pe, low = self.base_features(embedding, boxes)
        return self.inr(self.point_features(up, pe, coords), self.base_offset(low, coords))

    def decode_dense(self, embedding: torch.Tensor, boxes: torch.Tensor, coords: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if coords.dim() == 2:
            coords = coords.unsqueeze(0).expand(embedding.shape[0], -1, -1)
        up, pe, low = self.base_features(embedding, boxes)
        return self.inr.dense(self.point_features(up, pe, coords), self.base_offset(low, coords))
