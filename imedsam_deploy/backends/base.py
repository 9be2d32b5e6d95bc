"""One interface for every inference backend (ONNX Runtime, TensorRT, and an optional torch backend).

A backend module under ``imedsam_deploy.backends`` provides:

    probe(artifact: Artifact) -> str | None     # None when usable here, else a one-line reason
    create(artifact: Artifact, precision: str | None = None) -> Backend

and its ``Backend`` subclass implements ``encode`` and ``decode`` on numpy arrays (float32, the contract's
layouts). An embedding handle returned by ``encode`` is opaque to the runtime (a numpy array, an ONNX
Runtime OrtValue on the device, a TensorRT device buffer...); it stays valid until the next ``encode``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import numpy as np

from imedsam_deploy.preprocess import Region, pixels_to_model

Embedding = Any  # opaque per-image handle, only passed back to the backend that made it


class Backend(abc.ABC):
    """Runs the two exported graphs. The runtime (``Segmenter``) does preprocessing, chunking and UGS."""

    #: short name shown to the user, e.g. "ort-cpu"
    name: str = "?"

    def __init__(self, max_batch: int, max_points: int) -> None:
        self.max_batch = max_batch  # most rows one encode/decode call takes
        self.max_points = max_points  # most query points one decode call takes

    @property
    def description(self) -> str:
        """One line naming the engine/provider actually in use (printed by the CLIs)."""
        return self.name

    @abc.abstractmethod
    def encode(self, images: np.ndarray) -> Sequence[Embedding]:
        """images (B, 3, S, S) float32 (RGB x PIXEL_SCALE) -> one embedding handle per image, B <= max_batch."""

    def encode_pixels(self, pixels: np.ndarray) -> Sequence[Embedding]:
        """pixels (B, S, S, 3) uint8, RGB already resized to the model input -> ``encode``'s handles. Here the
        rest of preprocessing runs on the host (``pixels_to_model``); a GPU backend may upload the uint8 pixels
        (a third of the float32 bytes) and convert them on its device, to the same values."""
        return self.encode(pixels_to_model(pixels))

    @abc.abstractmethod
    def decode(
        self, embedding: Embedding, boxes: np.ndarray, coords: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Decode B boxes on ONE image: boxes (B, 4) model-input pixels, coords (B, N, 2) in [-1, 1].

        Returns (coarse, fine, uncertainty), each (B, K, N) float32 numpy. B <= max_batch, N <= max_points.
        """

    def sparse_region(
        self, embedding: Embedding, boxes: np.ndarray, region: tuple[int, int, int, int], out_hw: tuple[int, int],
        fraction: float, cfg: Any,
    ) -> tuple[np.ndarray, int] | None:
        """Optional: the sparse query mode's planner run by the backend itself (``sparse.sparse_decode``'s
        decisions) for one box (boxes (1, 4), model-input pixels) on output rows/cols ``region`` = (r0, r1,
        c0, c1): (logits (K, h, w), points queried). None: the runtime runs the host planner instead.
        This and ``decode_merged`` build output-grid coordinates in the stretch frame (``contract.RESIZE_MODE``):
        a backend that offers them refuses other artifacts when it opens them (torch-cuda's ``probe``), so the
        runtime asks every backend alike."""
        return None

    def decode_merged(self, embedding: Embedding, boxes: np.ndarray, region: Region, out_hw: tuple[int, int],
                      chunk: int, k: int) -> np.ndarray | None:
        """Optional: decode one box (boxes (1, 4)) at every pixel of ``region`` of the ``out_hw`` output grid
        (row-major, ``preprocess.region_chunk_coords``, at most ``chunk`` points per decoder call) and UGS-merge
        them where the outputs are: (K, region.size) logits, the fine one at each class's k most uncertain
        points, the coarse one elsewhere (``runtime.ugs_merge``). None: the runtime builds the coordinates,
        decodes and merges on the host."""
        return None

    def host_embedding(self, embedding: Embedding) -> np.ndarray | None:
        """The embedding as a host array (1, C, G, G), for the video tracker's appearance check
        (``appearance.py``); None where the backend cannot hand it over (the check is then skipped)."""
        return embedding if isinstance(embedding, np.ndarray) else None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device memory and sessions."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
