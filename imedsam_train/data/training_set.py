"""Torch datasets over ``Record``s: images stretched to S x S once and cached, one item per (image, class).

Every random draw of an item (augmentation, box jitter, query points) is seeded from (seed, epoch, index),
so an epoch's data is identical whatever the worker count and after a resume.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from imedsam_train.data.augment import apply_seeded, train_transforms
from imedsam_train.data.boxes import jitter_box, mask_box, stable_seed
from imedsam_train.data.records import Dataset


@dataclass
class Cached:
    stem: str
    image: torch.Tensor  # (3, S, S) uint8
    masks: list[tuple[int, torch.Tensor]]  # (class, (S, S) bool), non-empty only
    orig_size: tuple[int, int]  # (H, W) of the original image


def resize_sample(image: np.ndarray, masks: list[tuple[int, np.ndarray]], size: int) -> tuple[torch.Tensor, list[tuple[int, torch.Tensor]]]:
    """Stretch to size x size (contract: bilinear); masks resized as fractions and thresholded at 0.5."""
    img = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
    out = []
    for c, m in masks:
        r = cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR) >= 0.5
        out.append((c, torch.from_numpy(r)))
    return torch.from_numpy(img).permute(2, 0, 1).contiguous(), out


def cache_dataset(ds: Dataset, size: int, progress: Callable[[int, int], None] | None = None) -> tuple[list[Cached], int]:
    """Load and resize every record. Returns the cache and the number of empty masks skipped."""
    cache, empty = [], 0
    for i, rec in enumerate(ds.records):
        s = rec.load()
        nonempty = [(c, m) for c, m in s.masks if m.any()]
        empty += len(s.masks) - len(nonempty)
        img, masks = resize_sample(s.image, nonempty, size)
        masks = [(c, m) for c, m in masks if m.any()]  # tiny objects can vanish at size S
        if masks:
            cache.append(Cached(s.stem, img, masks, (s.image.shape[0], s.image.shape[1])))
        if progress:
            progress(i + 1, len(ds.records))
    return cache, empty


def pixel_coords(idx: torch.Tensor, size: int) -> torch.Tensor:
    """Flat pixel indices -> (x, y) pixel-centre coordinates in [-1, 1] (contract convention)."""
    i, j = idx // size, idx % size
    return torch.stack([(2 * j + 1) / size - 1, (2 * i + 1) / size - 1], dim=-1).float()


def boundary_band(mask: torch.Tensor, radius: int) -> torch.Tensor:
    m = mask[None, None].float()
    k = 2 * radius + 1
    dil = F.max_pool2d(m, k, stride=1, padding=radius)
    ero = -F.max_pool2d(-m, k, stride=1, padding=radius)
    return (dil > ero)[0, 0]


def sample_points(
    mask: torch.Tensor, box: torch.Tensor, n: int, g: torch.Generator, band_radius: int = 3
) -> torch.Tensor:
    """n flat pixel indices: 1/2 in the boundary band, 1/4 inside the prompt box, 1/4 anywhere.

    The boundary is where a box-prompted model has to learn something beyond the box itself.
    """
    size = mask.shape[-1]
    n_band, n_box = n // 2, n // 4
    n_any = n - n_band - n_box
    band = boundary_band(mask, band_radius).flatten().nonzero()[:, 0]
    if band.numel() == 0:
        band = torch.arange(size * size)
    pick_band = band[torch.randint(band.numel(), (n_band,), generator=g)]
    x0, y0, x1, y1 = box.tolist()
    bx = (x0 + torch.rand(n_box, generator=g) * max(x1 - x0, 1.0)).long().clamp(0, size - 1)
    by = (y0 + torch.rand(n_box, generator=g) * max(y1 - y0, 1.0)).long().clamp(0, size - 1)
    pick_any = torch.randint(size * size, (n_any,), generator=g)
    return torch.cat([pick_band, by * size + bx, pick_any])


class TrainSet(torch.utils.data.Dataset):
    """Augmented, box-jittered items with sampled query points and their labels.

    ``jitter_px`` is in model-input pixels (each side out by U(0, jitter_px)); ``points`` 0 = full grid.
    """

    def __init__(self, cache: list[Cached], size: int, seed: int, points: int, jitter_px: float,
                 augment: bool = True) -> None:
        self.items = [(i, j) for i, c in enumerate(cache) for j in range(len(c.masks))]
        self.cache, self.size, self.seed = cache, size, seed
        self.points, self.jitter_px, self.augment = points, jitter_px, augment
        self.tf = train_transforms() if augment else None
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ci, j = self.items[index]
        c = self.cache[ci]
        cls, mask = c.masks[j]
        s = stable_seed(self.seed, self.epoch, index)
        g = torch.Generator().manual_seed(s)
        rng = np.random.default_rng(s)
        tight = torch.from_numpy(mask_box(mask.numpy())).float()
        image, m = c.image.float() / 255.0, mask
        if self.tf is not None:
            drawn = apply_seeded(self.tf, c.image, mask, tight, s)
            if drawn is not None:
                image, m = drawn
        box = torch.from_numpy(
            jitter_box(mask_box(m.numpy()), self.jitter_px, self.size, self.size, rng)  # type: ignore[arg-type]
        ).float()
        if self.points > 0:
            idx = sample_points(m, box, self.points, g)
        else:
            idx = torch.arange(self.size * self.size)
        return {
            "image": image.contiguous(),
            "box": box,
            "coords": pixel_coords(idx, self.size),
            "labels": m.flatten()[idx].float(),
            "cls": torch.tensor(cls),
        }
