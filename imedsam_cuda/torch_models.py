"""The PyTorch side of imedsam-bench: the reference runners (the released code's compute; for the lite model,
zero-shot LiteMedSAM's own eager pipeline) and random-weight / checkpoint models.

Lives in imedsam_cuda because it imports torch (and imedsam_train / imedsam_export): the runtime imports this
module, by name (``imedsam_deploy.backends.torch_part``), only when ``--reference`` or ``--model`` is asked for.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imedsam_core.errors import UserError
from imedsam_core.paths import cache_dir
from imedsam_cuda.reference import ReferenceIMedSAM
from imedsam_deploy.bench import RANDOM_SEED, Inputs
from imedsam_deploy.manifest import Artifact
from imedsam_deploy.preprocess import box_to_model, to_model_input


class ReferenceRunner:
    """The released code's compute on the same inputs (eager fp32 on ``device``)."""

    def __init__(self, model: Any, device: str) -> None:
        self.torch = torch
        self.device = torch.device(device)
        self.ref = ReferenceIMedSAM(model.to(self.device).eval())
        self.s = model.cfg.input_size

    def run(self, inputs: Inputs, out_hw: tuple[int, int], times: list[float] | None) -> list[np.ndarray]:
        torch = self.torch
        t0 = time.perf_counter()
        x = torch.from_numpy(np.stack([to_model_input(im, self.s) for im in inputs.images])).to(self.device)
        boxes = np.concatenate([box_to_model(np.asarray(b)[None], im.shape[:2], self.s)
                                for b, im in zip(inputs.boxes, inputs.images, strict=True)])
        logits = self.ref(x, torch.from_numpy(boxes).to(self.device), out_hw)
        masks = (logits > 0).reshape(logits.shape[0], logits.shape[1], *out_hw).cpu().numpy()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if times is not None:
            times.append((time.perf_counter() - t0) * 1e3)
        return list(masks)


class LiteMedSAMRunner:
    """Zero-shot LiteMedSAM's eager PyTorch pipeline as a user runs it (``imedsam_train.pretrained``: its letterbox
    and min-max, encoder, mask decoder, crop and bilinear resize) on the same images and boxes; with ``tta`` its
    logits averaged with the mirrored image's (``--baseline litemedsam-tta`` in imedsam-eval). The reference a
    lite artifact is timed against (issue's 4x target)."""

    def __init__(self, base_checkpoint: Path | None, device: str, tta: bool) -> None:
        from imedsam_train.pretrained import LiteMedSAMBaseline, lite_medsam

        self.torch = torch
        self.device = torch.device(device)
        self.base = LiteMedSAMBaseline(lite_medsam(base_checkpoint), self.device, tta=tta)

    def run(self, inputs: Inputs, out_hw: tuple[int, int], times: list[float] | None) -> list[np.ndarray]:
        t0 = time.perf_counter()
        masks = []
        for im, box in zip(inputs.images, inputs.boxes, strict=True):
            self.base.forget()  # the bench repeats one image: every frame pays its encoder pass, as a new frame does
            masks.append((self.base.logits(im, np.asarray(box, np.float64)[None], out_hw) > 0).numpy())
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if times is not None:
            times.append((time.perf_counter() - t0) * 1e3)
        return masks


def litemedsam_runner(base_checkpoint: Path | None, threads: int | None, tta: bool) -> LiteMedSAMRunner:
    """LiteMedSAM's pipeline on CUDA when available, else on the CPU with ``threads`` torch threads."""
    if threads:
        torch.set_num_threads(threads)
    return LiteMedSAMRunner(base_checkpoint, "cuda" if torch.cuda.is_available() else "cpu", tta)


# Bumped whenever the exported graphs change for the same weights (a stale cached export would be timed).
# 2: windowed attention without the padding tokens' qkv/proj, relative-position bias folded into the logits'
#    matmul, fusable GELU, int8 encoder. 3: decoder samples the 256-wide positional map, one first-layer matmul.
# 4: the decoder also split per box / per point. 5: relative-position einsums as batched matmuls.
EXPORT_REVISION = 5


def random_model(name: str, input_size: int) -> Any:
    """The named architecture with deterministic random weights (seed RANDOM_SEED), eval mode."""
    from imedsam_train.build import build

    torch.manual_seed(RANDOM_SEED)
    model, _ = build(name, input_size=input_size)
    return model.eval()


def _fingerprint(model: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().flatten()[:64].cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def random_artifact(name: str, input_size: int, log: Callable[[str], None]) -> tuple[Path, Any]:
    """Export (once; cached under $IMEDSAM_CACHE or ~/.cache/imedsam) the random-weight ``name`` model."""
    model = random_model(name, input_size)
    fp = _fingerprint(model)
    out = cache_dir() / "bench" / f"{name}-{input_size}-{fp}-r{EXPORT_REVISION}"
    if (out / "manifest.json").is_file():
        log(f"random-weight {name} artifact (cached): {out}")
        return out, model
    try:
        from imedsam_export.api import export_artifact
    except ImportError as e:
        raise UserError(f"--model {name} needs the exporter (pip install 'imedsam[train]'): {e}") from None
    log(f"exporting random-weight {name} at {input_size} to {out} (once) ...")
    out.parent.mkdir(parents=True, exist_ok=True)
    export_artifact(None, out, model=model, int8=True, force=True)
    return out, model


def model_artifact(model: Any, max_batch: int, max_points: int = 65536) -> Artifact:
    """An artifact that only describes an in-process model (no files): what the runtime and the torch
    backends read of an artifact, from the model's config."""
    cfg = model.cfg
    return Artifact(path=Path(f"in-process-{cfg.name}-{cfg.input_size}"), manifest={"model": cfg.to_dict()},
                    input_size=cfg.input_size, embedding_shape=(cfg.encoder.out_chans, cfg.grid_size, cfg.grid_size),
                    num_classes=cfg.num_classes, refine_fraction=cfg.decoder.refine_fraction,
                    max_points=max_points, max_batch=max_batch, graphs={})


def in_process_artifact(name: str, input_size: int, max_batch: int) -> tuple[Artifact, Any]:
    """The random-weight ``name`` model and its ``model_artifact``: benchmarking torch backends alone then
    skips the ONNX export (minutes for vit_b) that ``random_artifact`` would run first."""
    model = random_model(name, input_size)
    return model_artifact(model, max_batch), model


def torch_model_for(artifact: Artifact, checkpoint: Path | None = None) -> Any:
    """The PyTorch model behind an artifact (for the reference): ``checkpoint`` (``--backend-option
    checkpoint=PATH``), else its source checkpoint."""
    from imedsam_cuda.torch_cuda import source_checkpoint

    ck = source_checkpoint(artifact, checkpoint)
    if ck is None or not ck.is_file():
        raise UserError(f"{artifact.path}: --reference needs the PyTorch checkpoint the artifact was exported "
                        "from (manifest source.checkpoint, or --backend-option checkpoint=PATH); or use --model")
    from imedsam_train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(ck)
    return model.eval()


def reference_runner(model: Any, threads: int | None) -> ReferenceRunner:
    """The reference on CUDA when available, else on the CPU with ``threads`` torch threads."""
    if threads:
        torch.set_num_threads(threads)
    return ReferenceRunner(model, "cuda" if torch.cuda.is_available() else "cpu")
