"""Training augmentation, as the released code's (no hue jitter: its RGB<->HSV round trip costs more than the model step on CPU): torchvision.transforms.v2, which moves image, mask and box together.

Photometric: brightness/contrast/saturation, posterize, sharpen, blur, Gaussian noise.
Geometric: rotate ±20°, horizontal/vertical flips, scale 0.8–1.2, shear, translate.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


def train_transforms() -> v2.Compose:
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.RandomApply([v2.RandomAffine(degrees=20, translate=(0.1, 0.1), scale=(0.8, 1.2), shear=10)], p=0.8),
        v2.RandomApply([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.2)], p=0.8),
        v2.RandomPosterize(bits=5, p=0.1),
        v2.RandomAdjustSharpness(sharpness_factor=2.0, p=0.2),
        v2.RandomApply([v2.GaussianBlur(kernel_size=5, sigma=(0.1, 1.5))], p=0.2),
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.RandomApply([v2.GaussianNoise(sigma=0.03)], p=0.2),
    ])


def eval_transforms() -> v2.Compose:
    return v2.Compose([v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)])


def apply(
    tf: v2.Compose, image: torch.Tensor, mask: torch.Tensor, box: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """image (3,S,S) uint8, mask (S,S) bool, box (4,) -> transformed float image in [0,1], mask, box."""
    size = (int(image.shape[-2]), int(image.shape[-1]))
    img_t, mask_t, box_t = tf(
        tv_tensors.Image(image),
        tv_tensors.Mask(mask[None].to(torch.uint8)),
        tv_tensors.BoundingBoxes(box[None].float(), format="XYXY", canvas_size=size),
    )
    return img_t.as_subclass(torch.Tensor), mask_t.as_subclass(torch.Tensor)[0] > 0, box_t.as_subclass(torch.Tensor)[0]


def apply_seeded(
    tf: v2.Compose, image: torch.Tensor, mask: torch.Tensor, box: torch.Tensor, seed: int, tries: int = 3
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``apply`` drawn from ``seed`` (the global torch RNG left as it was): the transformed image and mask, redrawn
    up to ``tries`` times while a translation pushes the object out of the frame; None if every draw did."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(tries):
            img_a, m_a, _ = apply(tf, image, mask, box)
            if m_a.any():
                return img_a, m_a
    return None
