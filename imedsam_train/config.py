"""Typed model configuration. A checkpoint stores ``ModelConfig.to_dict()`` and rebuilds its own model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from imedsam_core.contract import DEFAULT_INPUT_SIZE, DEFAULT_REFINE_FRACTION


@dataclass(frozen=True)
class EncoderConfig:
    """SAM ViT image encoder (key names match segment-anything's ``image_encoder``)."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    patch_size: int = 16
    mlp_ratio: float = 4.0
    out_chans: int = 256  # = prompt/transformer dim


@dataclass(frozen=True)
class LoraConfig:
    """LoRA on the query and value parts of every block's fused qkv (released code: rank 4, no scaling)."""

    rank: int = 4
    enabled: bool = True
    # The released code's per-block data-dependent scalar gate (not in the paper). Cannot be merged.
    gate: bool = False


@dataclass(frozen=True)
class FrequencyConfig:
    """Frequency adapter: spectrum of one image channel, patch-embedded, chained per-block adapters."""

    enabled: bool = True
    mode: Literal["amplitude", "phase"] = "amplitude"
    channel: int = 0  # which RGB channel is transformed (released code: one channel)
    hidden: int = 4
    scale: float = 0.5  # each block adds scale * f beside its MLP


@dataclass(frozen=True)
class DecoderConfig:
    """Prompt encoder + two-way transformer + upscaling, feeding coarse and fine coordinate MLPs."""

    transformer_depth: int = 2
    transformer_mlp_dim: int = 2048
    transformer_heads: int = 8
    fourier_levels: int = 10  # L: frequencies 2^k * pi, k = 0..L-1
    fourier_include_input: bool = True  # concatenate raw (x, y) to the sin/cos features
    coarse_hidden: tuple[int, ...] = (1024, 512)
    coarse_feature: int = 256
    fine_hidden: tuple[int, ...] = (256, 256, 128)
    mc_samples: int = 2  # T, MC-dropout passes at training time
    dropout: float = 0.5
    refine_fraction: float = DEFAULT_REFINE_FRACTION  # K
    # Also give the box as a dense prompt (the filled box rasterised on SAM's mask-prompt grid, through
    # SAM's own mask_downscaling). Not in the paper (off for the SAM sizes): a from-scratch model has no
    # pretrained box understanding, and this makes "inside the box" visible to every image token.
    box_mask_prompt: bool = False
    # Residual read-out only (lite): sigma, in pixels of the base logit map (4g x 4g, the lite input's pixels),
    # of a Gaussian applied to the base mask head's logit map before it is read at the points, in every
    # forward. 0: off. Chosen on val after training (benchmarks/base_smoothing.py): it removes the specks and
    # pinholes that carry the mean HD95, at a cost of about 0.2 Dice with tight boxes (RESULTS.md).
    base_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if not (0.0 <= self.base_smoothing <= 16.0):  # also refuses NaN
            raise ValueError(f"decoder base_smoothing {self.base_smoothing}: expected 0 .. 16 pixels")


@dataclass(frozen=True)
class PreprocessConfig:
    """How an original image becomes the model input (size: ``ModelConfig.input_size``).

    ``stretch``: RGB/255 resized (bilinear) to S x S whatever the aspect ratio; boxes scaled per axis, pixel
    edges. ``letterbox_minmax`` (LiteMedSAM's): the longest side resized to S (area), min-max scaled to [0, 1]
    over the resized image, zero-padded at the bottom and right; boxes scaled by the same factor in SAM's
    convention (x1/y1 the last covered column/row); outputs read only from the unpadded region.
    """

    kind: Literal["stretch", "letterbox_minmax"] = "stretch"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "vit_b"
    input_size: int = DEFAULT_INPUT_SIZE
    num_classes: int = 1
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    frequency: FrequencyConfig = field(default_factory=FrequencyConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    # "adapters": SAM-pretrained encoder/transformer frozen (paper). "all": train every used weight
    # (from scratch, where there is no pretrained encoder worth freezing).
    trainable: Literal["adapters", "all"] = "adapters"
    # "sam_vit": SAM's ViT (``encoder``). "tinyvit": LiteMedSAM's TinyViT (``tinyvit``; ``encoder`` unused
    # but for its out_chans, the prompt / mask decoder width), the ``lite`` preset.
    backbone: Literal["sam_vit", "tinyvit"] = "sam_vit"
    tinyvit: TinyViTConfig | None = None
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)

    @property
    def grid_size(self) -> int:
        if self.backbone == "tinyvit":
            assert self.tinyvit is not None
            return self.tinyvit.grid_size
        return self.input_size // self.encoder.patch_size

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        kw: dict[str, Any] = dict(d)
        sub = {"encoder": EncoderConfig, "lora": LoraConfig, "frequency": FrequencyConfig, "decoder": DecoderConfig,
               "tinyvit": TinyViTConfig, "preprocess": PreprocessConfig}
        for key, typ in sub.items():
            if key in kw and kw[key] is not None:
                kw[key] = _from_plain(typ, kw[key])
        return cls(**kw)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _to_plain(x: Any) -> Any:
    # Only primitives, lists and dicts: loadable with torch.load(weights_only=True) and JSON.
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


def _from_plain(typ: Any, d: dict[str, Any]) -> Any:
    kw = {}
    for f in dataclasses.fields(typ):
        if f.name in d:
            v = d[f.name]
            kw[f.name] = tuple(v) if isinstance(v, list) else v
    return typ(**kw)


# --- named presets (segment-anything's sizes, plus a tiny one for tests and CPU demos) ---

def vit_b_config(input_size: int = DEFAULT_INPUT_SIZE, num_classes: int = 1) -> ModelConfig:
    return ModelConfig(name="vit_b", input_size=input_size, num_classes=num_classes)


def vit_l_config(input_size: int = DEFAULT_INPUT_SIZE, num_classes: int = 1) -> ModelConfig:
    enc = EncoderConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23))
    return ModelConfig(name="vit_l", input_size=input_size, num_classes=num_classes, encoder=enc)


def vit_h_config(input_size: int = DEFAULT_INPUT_SIZE, num_classes: int = 1) -> ModelConfig:
    enc = EncoderConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31))
    return ModelConfig(name="vit_h", input_size=input_size, num_classes=num_classes, encoder=enc)


def tiny_config(input_size: int = DEFAULT_INPUT_SIZE, num_classes: int = 1) -> ModelConfig:
    """Same structure as vit_b, small widths: for tests, CPU demos and the shipped demo model."""
    enc = EncoderConfig(
        embed_dim=96, depth=4, num_heads=3, global_attn_indexes=(1, 3), window_size=7, out_chans=64
    )
    dec = DecoderConfig(
        transformer_depth=2,
        transformer_mlp_dim=256,
        transformer_heads=4,
        coarse_hidden=(128, 64),
        coarse_feature=32,
        fine_hidden=(64, 64, 32),
        box_mask_prompt=True,
    )
    return ModelConfig(
        name="tiny", input_size=input_size, num_classes=num_classes, encoder=enc, decoder=dec, trainable="all"
    )


def lite_config(input_size: int = 256, num_classes: int = 1) -> ModelConfig:
    """I-MedSAM on LiteMedSAM: its TinyViT (frozen, LoRA + frequency adapter), prompt encoder and mask decoder,
    read out by a residual implicit decoder; its preprocessing. Starts equal to zero-shot LiteMedSAM."""
    if input_size != 256:
        raise ValueError(f"the lite model takes LiteMedSAM's 256 px input, not {input_size}")
    dec = DecoderConfig(coarse_hidden=(256, 128), coarse_feature=32, fine_hidden=(128, 64, 32))
    return ModelConfig(
        name="lite", input_size=input_size, num_classes=num_classes, decoder=dec, backbone="tinyvit",
        tinyvit=TinyViTConfig(input_size=input_size), preprocess=PreprocessConfig(kind="letterbox_minmax"),
    )


# the builder a training command uses when --model is not given: the shipped model's
DEFAULT_BUILDER = "lite"
PRESETS = {"vit_b": vit_b_config, "vit_l": vit_l_config, "vit_h": vit_h_config, "tiny": tiny_config,
           "lite": lite_config}


def preset(name: str, input_size: int = DEFAULT_INPUT_SIZE, num_classes: int = 1) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model '{name}': choose one of {', '.join(PRESETS)}")
    return PRESETS[name](input_size=input_size, num_classes=num_classes)


@dataclass(frozen=True)
class TinyViTConfig:
    """TinyViT image encoder as LiteMedSAM uses it (key names match its ``image_encoder.*``).

    Stage 0 is MBConv blocks at full input resolution (the stem's convolutions are 1 x 1, stride 1);
    stages 1-3 are windowed-attention blocks. Each stage but the last ends in a patch merge with the
    given stride, so 256 px in gives a 64 x 64 grid out.
    """

    input_size: int = 256
    in_chans: int = 3
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)  # stage 0 (convolutional) ignores its entry
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    merge_strides: tuple[int, ...] = (2, 2, 1)  # patch merges after stages 0, 1, 2
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    drop_path: float = 0.0  # stochastic depth at the last block, linear from 0
    out_chans: int = 256  # the neck's width = the SAM prompt / mask decoder width

    @property
    def grid_size(self) -> int:
        g = self.input_size
        for s in self.merge_strides:
            g = -(-g // s)
        return g
