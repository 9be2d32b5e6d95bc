"""The segmentation runtime on top of a backend: one embedding per image, chunked box-local queries, UGS.

Query modes:
- ``full`` (the ``Segmenter``'s default): every output pixel is decoded: the reference the export is checked
  against (the slowest).
- ``box``: only the output pixels inside the box grown by ``margin`` are decoded; every other
  pixel is background. The UGS refine count is the full grid's, ``refine_count(H*W, fraction)`` (capped at
  the queried points), so the fine INR refines the same number of points as a full-grid query would: when
  the full grid's most uncertain points all lie in the region the two modes agree exactly inside it.
- ``sparse`` (``imedsam-infer``'s default): the box plus ``margin``, queried at multiple resolutions (``sparse.py``, Occupancy Networks'
  extraction with the global UGS threshold estimated over the whole output): near-exact (99.95% of in-box
  pixels on the Kvasir-Sessile test split, see benchmarks/RESULTS.md) and the fastest CPU path. Its logits
  are the decoder's at queried pixels and interpolated (sign-preserving) elsewhere in the region.
Queries go through the decoder in chunks of at most ``chunk`` points, so memory stays bounded for any
output size; the UGS merge is done after, over all of a box's points, so chunking never changes a result.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from imedsam_core.contract import mirror_box, refine_count
from imedsam_core.errors import UserError
from imedsam_deploy.backends.base import Backend, Embedding
from imedsam_deploy.manifest import Artifact
from imedsam_deploy.preprocess import Preprocessing, Region, box_region, region_chunk_coords
from imedsam_deploy.sparse import SparseConfig, sparse_decode

QueryMode = Literal["box", "full", "sparse"]
QUERY_MODES: tuple[QueryMode, ...] = ("full", "box", "sparse")
# sparse: 16x faster than full on 2 CPU cores, 99.99% of the pixels and Dice 99.97 against full on
# Kvasir-Sessile test with the shipped model (benchmarks/sparse_agreement.py --artifact)
DEFAULT_QUERY: QueryMode = "sparse"  # imedsam-infer's; the Segmenter's own default stays the reference
DEFAULT_MARGIN = 0.25  # fraction of the box's width/height added on each side in ``box`` mode
DEFAULT_CHUNK = 32768  # query points per decoder call (bounded memory for any output size)


def ugs_merge(coarse: np.ndarray, fine: np.ndarray, unc: np.ndarray, k: int) -> np.ndarray:
    """(K, N) arrays: the fine logit at each class's k most uncertain points, the coarse one elsewhere."""
    merged = coarse.copy()
    n = coarse.shape[-1]
    k = min(k, n)
    if k <= 0:
        return merged
    for c in range(coarse.shape[0]):
        idx = np.arange(n) if k == n else np.argpartition(unc[c], n - k)[n - k :]
        merged[c, idx] = fine[c, idx]
    return merged


def sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic in float32: 1 / (1 + exp(-x)), in place after the exp (twice as fast as the tanh form).
    exp(-x) overflows to inf below x = -88, where 1 / (1 + inf) = 0 is the right answer."""
    with np.errstate(over="ignore"):
        e = np.exp(np.negative(x, dtype=np.float32))
    e += 1.0
    return np.reciprocal(e, out=e)


@dataclass
class ObjectMask:
    """One box's result at the output size. Values live on ``region``; everything outside is background."""

    box: np.ndarray  # (4,) image pixels
    out_hw: tuple[int, int]
    region: Region
    logits: np.ndarray  # (K, rh, rw) merged (UGS) logits on the region
    queried: int  # points sent to the decoder

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[0])

    def region_mask(self) -> np.ndarray:
        """(K, rh, rw) bool, the mask on the region: computed once (a frame asks for it several times)."""
        return self._region_mask

    @cached_property
    def _region_mask(self) -> np.ndarray:
        return self.logits > 0

    def mask(self, cls: int | None = None) -> np.ndarray:
        """(H, W) bool at the output size: class ``cls``, or the union over classes when None."""
        full = np.zeros(self.out_hw, dtype=bool)
        rm = self.region_mask()
        r = self.region
        full[r.r0 : r.r1, r.c0 : r.c1] = rm.any(axis=0) if cls is None else rm[cls]
        return full

    def probability(self) -> np.ndarray:
        """(K, H, W) float32 sigmoid of the merged logit; 0 outside the queried region."""
        full = np.zeros((self.num_classes, *self.out_hw), dtype=np.float32)
        r = self.region
        full[:, r.r0 : r.r1, r.c0 : r.c1] = sigmoid(self.logits)
        return full

    @property
    def area(self) -> int:
        return int(self.region_mask().any(axis=0).sum())

    @cached_property
    def mean_probability(self) -> float:
        """Mean foreground probability over the mask (its confidence); 0 for an empty mask. Once per object."""
        return _masked_mean_probability(self.logits, self.region_mask())

    def class_mean_probability(self, cls: int) -> float:
        """``mean_probability`` of one class's mask."""
        if self.num_classes == 1:
            return self.mean_probability
        return _masked_mean_probability(self.logits[cls], self.region_mask()[cls])


def _masked_mean_probability(logits: np.ndarray, mask: np.ndarray) -> float:
    """Mean logistic of the logits under ``mask`` (of those only, not of the whole region); 0 if it is empty."""
    return float(sigmoid(logits[mask]).mean()) if mask.any() else 0.0


@dataclass
class FrameResult:
    objects: list[ObjectMask]
    image_hw: tuple[int, int]
    out_hw: tuple[int, int]
    encode_ms: float = 0.0
    decode_ms: float = 0.0
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def latency_ms(self) -> float:
        return self.encode_ms + self.decode_ms


def mirrored_average(om: ObjectMask, om_m: ObjectMask) -> ObjectMask:
    """``om``'s logits averaged with ``om_m``'s, the same box's on the image mirrored left to right, mirrored back
    (``--tta``). On ``om``'s region; where the mirrored region does not reach (a column at the margin's edge, from
    rounding), ``om``'s own logits stay."""
    r, rm, ow = om.region, om_m.region, om.out_hw[1]
    back = om_m.logits[:, :, ::-1]  # columns ow - rm.c1 .. ow - rm.c0 of the original frame
    r0, r1 = max(r.r0, rm.r0), min(r.r1, rm.r1)
    c0, c1 = max(r.c0, ow - rm.c1), min(r.c1, ow - rm.c0)
    logits = om.logits.copy()
    if r0 < r1 and c0 < c1:
        mine = logits[:, r0 - r.r0 : r1 - r.r0, c0 - r.c0 : c1 - r.c0]
        theirs = back[:, r0 - rm.r0 : r1 - rm.r0, c0 - (ow - rm.c1) : c1 - (ow - rm.c1)]
        mine += theirs
        mine *= 0.5
    return ObjectMask(om.box, om.out_hw, r, logits, om.queried + om_m.queried)


def check_tta(artifact: Artifact) -> None:
    """Refuse ``--tta``, in one line naming the artifact, before a backend opens on an artifact whose encoder takes
    one image a call (the image and its mirror must be encoded together)."""
    if artifact.max_batch < 2:
        raise UserError(f"{artifact.path}: --tta encodes two images a call and this artifact takes "
                        f"{artifact.max_batch} (export it with --batch 2 or more)")


def open_segmenter(path: Path, backend_name: str, precision: str | None, options: Mapping[str, str] | None,
                   threads: int | None, tta: bool = False, **kw: Any) -> tuple[Segmenter, str]:
    """What ``imedsam-infer`` and ``imedsam-serve`` do to start: load the artifact at ``path``, refuse ``--tta`` it
    cannot take before anything opens, open the backend (``backends.open_backend``), wrap it (``kw``: query, margin,
    chunk). Returns the segmenter (its backend to be closed by the caller) and the backend's line."""
    from imedsam_deploy.backends import open_backend
    from imedsam_deploy.manifest import load_artifact

    art = load_artifact(path)
    if tta:
        check_tta(art)
    be, how = open_backend(backend_name, art, precision, options, threads=threads)
    try:
        return Segmenter(be, art, tta=tta, **kw), how
    except BaseException:
        be.close()
        raise


class Segmenter:
    """Segment boxes on images with an exported artifact through one backend. tta: every box also decoded on
    the image mirrored left to right and the logits averaged (``mirrored_average``): one encoder call of two
    images and twice the decoding, a frame."""

    def __init__(self, backend: Backend, artifact: Artifact, query: QueryMode = "full",
                 margin: float = DEFAULT_MARGIN, chunk: int = DEFAULT_CHUNK, tta: bool = False) -> None:
        if query not in QUERY_MODES:
            raise ValueError(f"query mode {query!r}")
        if tta and backend.max_batch < 2:  # the two handles must be valid together: one call of two images
            raise ValueError(f"--tta encodes two images a call; the artifact takes {backend.max_batch} "
                             "(export it with --batch 2 or more)")
        self.tta = tta
        self.sparse_cfg = SparseConfig()
        self.backend, self.artifact = backend, artifact
        self.query, self.margin = query, margin
        self.chunk = max(1, min(chunk, backend.max_points))
        self.s = artifact.input_size
        self.fraction = artifact.refine_fraction
        self.pre = Preprocessing(artifact.resize, self.s)
        self._pixels: np.ndarray | None = None

    # --- encoder ---
    def pixels(self, images: list[np.ndarray]) -> np.ndarray:
        """At most max_batch RGB uint8 images resized into one reused (B, S, S, 3) uint8 batch, valid until
        the next call (backends consume it within ``encode_pixels``). Reused, not allocated per frame: a
        fresh array of this size is page-faulted in on every frame (0.2 ms of a GPU frame's host time)."""
        if len(images) > self.backend.max_batch:
            raise ValueError(f"embed: {len(images)} images > max_batch {self.backend.max_batch} (embed and "
                             "decode them in groups: a handle is valid until the next embed)")
        if self._pixels is None or len(self._pixels) < len(images):  # grown to the largest batch seen
            self._pixels = np.empty((len(images), self.s, self.s, 3), np.uint8)
        for im, dst in zip(images, self._pixels, strict=False):
            if im.dtype != np.uint8 or im.ndim != 3 or im.shape[2] != 3:
                raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {im.dtype} {im.shape}")
            self.pre.resize_into(im, dst)
        return self._pixels[: len(images)]

    def encode_pixels(self, pixels: np.ndarray, image_hws: list[tuple[int, int]]) -> list[Embedding]:
        """``pixels`` (B, S, S, 3) uint8 from ``pixels`` of images of sizes ``image_hws`` -> embedding handles.
        stretch: the backend finishes preprocessing (on its device where it can); letterbox: the min-max per
        image runs here and the backend gets float32."""
        if self.pre.letterbox:
            return list(self.backend.encode(self.pre.to_model(pixels, image_hws)))
        return list(self.backend.encode_pixels(pixels))

    def embed(self, images: list[np.ndarray]) -> tuple[list[Embedding], float]:
        """At most max_batch RGB uint8 images -> one embedding handle each, and the time in ms. The handles
        are valid until the next ``embed`` (a backend may keep one output buffer): decode them first."""
        t = time.perf_counter()
        out = self.encode_pixels(self.pixels(images), [(int(im.shape[0]), int(im.shape[1])) for im in images])
        return out, (time.perf_counter() - t) * 1e3

    @property
    def per_image(self) -> int:
        """Encoder inputs an image: with tta 2, the image and its mirror."""
        return 2 if self.tta else 1

    @property
    def images_per_call(self) -> int:
        """Images one encoder call takes, with their mirrors (tta)."""
        return self.backend.max_batch // self.per_image

    def frame_images(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """What the encoder takes for ``images``: with tta each followed by its mirror (left to right); their
        handles, ``per_image`` a frame, go to ``decode_frame_box`` together."""
        if not self.tta:
            return list(images)
        return [v for im in images for v in (im, np.ascontiguousarray(im[:, ::-1]))]

    def embed_frame(self, rgb: np.ndarray) -> tuple[list[Embedding], float]:
        """One image's embedding handle and, with tta, its mirror's (one call: valid together until the next
        embed), and the time in ms."""
        return self.embed(self.frame_images([rgb]))

    # --- decoder ---
    def region_for(self, box: np.ndarray, image_hw: tuple[int, int], out_hw: tuple[int, int]) -> Region:
        if self.query == "full":
            return Region(0, 0, out_hw[0], out_hw[1])
        return box_region(box, image_hw, out_hw, self.margin)

    def _decode_points(self, embedding: Embedding, mbox: np.ndarray, coords: np.ndarray,
                       image_hw: tuple[int, int]) -> tuple[np.ndarray, ...]:
        """coords (N, 2) on the output grid -> coarse, fine, uncertainty, each (K, N), through the decoder in
        chunks."""
        n = coords.shape[0]
        coords = self.pre.coords(coords, image_hw)
        out = [np.empty((self.artifact.num_classes, n), np.float32) for _ in range(3)]
        for s in range(0, n, self.chunk):
            e = min(n, s + self.chunk)
            for o, r in zip(out, self.backend.decode(embedding, mbox, coords[None, s:e]), strict=True):
                o[:, s:e] = r[0]
        return tuple(out)

    def decode_box(self, embedding: Embedding, box: np.ndarray, image_hw: tuple[int, int],
                   out_hw: tuple[int, int]) -> ObjectMask:
        region = self.region_for(box, image_hw, out_hw)
        if self.query == "sparse":
            mbox_s = self.pre.box(np.asarray(box)[None], image_hw)
            rows_cols = (region.r0, region.r1, region.c0, region.c1)
            on_device = self.backend.sparse_region(embedding, mbox_s, rows_cols, out_hw, self.fraction,
                                                   self.sparse_cfg)
            if on_device is not None:  # the same planner, run by the backend (torch-cuda: one CUDA graph)
                return ObjectMask(np.asarray(box, np.float64), out_hw, region, on_device[0], on_device[1])
            res = sparse_decode(lambda c: self._decode_points(embedding, mbox_s, c, image_hw),  # type: ignore[arg-type,return-value]
                                out_hw, self.fraction, rows_cols, self.sparse_cfg)
            logits = res.logits if res.logits is not None else np.zeros(
                (self.artifact.num_classes, *region.shape), np.float32)
            return ObjectMask(np.asarray(box, np.float64), out_hw, region, logits, res.queried)
        n = region.size
        k_cls = self.artifact.num_classes
        mbox = self.pre.box(np.asarray(box)[None], image_hw)
        # The refine count is the full output grid's in both modes (see the module docstring).
        k = refine_count(out_hw[0] * out_hw[1], self.fraction)
        # torch-cuda: coordinates built, decoded and merged on the GPU
        merged = self.backend.decode_merged(embedding, mbox, region, out_hw, self.chunk, k)
        if merged is None:
            coarse, fine, unc = (np.empty((k_cls, n), np.float32) for _ in range(3))
            for s in range(0, n, self.chunk):
                e = min(n, s + self.chunk)
                # built per chunk: bounded memory
                coords = self.pre.coords(region_chunk_coords(region, out_hw[0], out_hw[1], s, e), image_hw)
                c, f, u = self.backend.decode(embedding, mbox, coords[None])
                coarse[:, s:e], fine[:, s:e], unc[:, s:e] = c[0], f[0], u[0]
            merged = ugs_merge(coarse, fine, unc, k)
        rh, rw = region.shape
        return ObjectMask(np.asarray(box, np.float64), out_hw, region, merged.reshape(k_cls, rh, rw), n)

    def decode_frame_box(self, embeddings: list[Embedding], box: np.ndarray, image_hw: tuple[int, int],
                         out_hw: tuple[int, int]) -> ObjectMask:
        """One box on an ``embed_frame`` result: with tta, averaged with the mirrored image's decoding."""
        om = self.decode_box(embeddings[0], box, image_hw, out_hw)
        if len(embeddings) == 1:
            return om
        box_m = np.asarray(mirror_box(box, image_hw[1]), np.float64)
        return mirrored_average(om, self.decode_box(embeddings[1], box_m, image_hw, out_hw))

    def segment_embedded(self, embeddings: list[Embedding], image_hw: tuple[int, int], boxes: np.ndarray,
                         out_hw: tuple[int, int] | None = None) -> tuple[list[ObjectMask], float]:
        """Every box on one image's ``embed_frame`` handles (or its one ``embed`` handle, in a list), and the time
        in ms."""
        t = time.perf_counter()
        out_hw = out_hw or image_hw
        objs = [self.decode_frame_box(embeddings, b, image_hw, out_hw)
                for b in np.asarray(boxes, np.float64).reshape(-1, 4)]
        return objs, (time.perf_counter() - t) * 1e3

    def segment(self, rgb: np.ndarray, boxes: np.ndarray, out_hw: tuple[int, int] | None = None) -> FrameResult:
        """Segment every box on one RGB image: the embedding is computed once and reused for every box."""
        embs, enc_ms = self.embed_frame(rgb)
        hw = (int(rgb.shape[0]), int(rgb.shape[1]))
        objs, dec_ms = self.segment_embedded(embs, hw, boxes, out_hw)
        return FrameResult(objs, hw, out_hw or hw, enc_ms, dec_ms)
