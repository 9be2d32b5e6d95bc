"""Training the ``lite`` model (I-MedSAM on LiteMedSAM), cheap enough for two CPU cores.

Phase 1 (``decoder_epochs``): the encoder is LiteMedSAM's, untouched (LoRA B and the frequency adapters' last
layers are still zero), so its output per preprocessed image is computed once and cached on disk (fp16,
atomic writes, keyed by the sha256 of the model input, the base file's sha256 and the preprocessing); the
decoder (prompt encoder, upscaling, base mask head, INR) trains on the cached embeddings with jittered boxes.
Phase 2 (``epochs``): everything trainable, LoRA and adapters included, end to end, the encoder run live.
Phase 2 augments the images when the run asks (``TrainConfig.augment``; photometric and geometric, as the other
builders, applied to the letterboxed image's valid region); phase 1 cannot (a cached embedding is of the
augmentation-free image).

Selection: the untrained model (= zero-shot LiteMedSAM), or the ``--init-from`` model (another lite run's, e.g.
trained on Kvasir-SEG first), is validated first and saved as best.pt; an epoch replaces it only if its val
Dice is higher. Reproducibility as in ``train``: every draw is seeded from (seed,
epoch, index) and the torch RNG is reseeded per epoch, so a resumed run replays the next epoch exactly.

Several GPUs: ``torchrun --nproc_per_node N -m imedsam_train.cli kvasir --model lite ...``, as ``train``: each
rank takes every N-th item of the epoch's shuffled order, DDP averages the gradients, rank 0 validates and
writes the checkpoints. The embedding cache is filled in shards (rank r encodes every N-th input), and each rank
reads the others' entries from the shared cache folder as it needs them.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imedsam_core.atomic import atomic_path
from imedsam_core.errors import UserError
from imedsam_core.paths import (
    FINISHED_NAME,
    cache_dir,
)
from imedsam_train.build import build, safe_torch_load
from imedsam_train.checkpoint import model_payload
from imedsam_train.config import PreprocessConfig
from imedsam_train.data.augment import apply_seeded, train_transforms
from imedsam_train.data.boxes import jitter_box, mask_box, stable_seed
from imedsam_train.data.records import Dataset
from imedsam_train.data.training_set import boundary_band
from imedsam_train.evaluate import cases_from_dataset, mean_dice, run_cases
from imedsam_train.losses import imedsam_loss
from imedsam_train.model.lite import HeadInterleavedLoRAQKV, LiteIMedSAM, StageFrequency
from imedsam_train.preprocess import input_boxes, letterbox_shape, prepare_image, prepare_mask, to_input
from imedsam_train.train import (
    EpochRecord,
    EpochTally,
    Reporter,
    TrainConfig,
    _init_model,
    _make_dir,
    _resume_model,
    _Step,
    barrier,
    init_distributed,
    lr_lambda_factory,
    optimizer_step,
    param_groups,
    pick_device,
    rank_share,
    run_paths,
)

EMBEDDING_CACHE = "lite-embeddings"  # under cache_dir(): content-addressed, shared by runs


def encoder_is_base(model: LiteIMedSAM) -> bool:
    """Whether the encoder still computes LiteMedSAM's function (LoRA B and adapter outputs all zero)."""
    for m in model.image_encoder.modules():
        if isinstance(m, HeadInterleavedLoRAQKV) and not m.merged and (m.lora_b_q.any() or m.lora_b_v.any()):
            return False
        if isinstance(m, StageFrequency):
            for a in m.adapters:
                if any(bool(p.any()) for p in a.up.parameters()):  # type: ignore[union-attr]
                    return False
    return True


class EmbeddingCache:
    """Frozen-encoder embeddings, fp16, in memory and on disk (one file per input, written atomically)."""

    def __init__(self, model: LiteIMedSAM, base_sha256: str, folder: Path) -> None:
        self.model, self.folder = model, folder
        self.tag = json.dumps({"format": 2, "base": base_sha256, "preprocess": asdict(model.cfg.preprocess),
                               "size": model.cfg.input_size}, sort_keys=True).encode()
        self.memo: dict[str, torch.Tensor] = {}
        self.computed = 0

    def key(self, x: torch.Tensor) -> str:
        return hashlib.sha256(self.tag + b"\0" + x.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()

    def one(self, x: torch.Tensor) -> torch.Tensor:
        """(3, S, S) model input -> (C, g, g) float16 on the CPU."""
        k = self.key(x)
        hit = self.memo.get(k)
        if hit is not None:
            return hit
        path = self.folder / k[:2] / f"{k}.pt"
        emb: torch.Tensor | None = None
        if path.is_file():
            try:
                v = safe_torch_load(path)
                emb = v if isinstance(v, torch.Tensor) else None
            except UserError:
                emb = None  # unreadable: computed again, replaced atomically
        if emb is None:
            if not encoder_is_base(self.model):
                raise RuntimeError("the embedding cache holds LiteMedSAM's encoder outputs: the encoder has changed")
            dev = next(self.model.parameters()).device
            enc = self.model.image_encoder
            was = enc.training
            enc.eval()  # frozen BatchNorm statistics, whatever mode the model is in
            with torch.no_grad():
                emb = enc(x[None].to(dev))[0].half().cpu()
            enc.train(was)
            if was:
                self.model.train()  # re-freezes the BatchNorm layers
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                torch.save(emb, tmp)
            self.computed += 1
        self.memo[k] = emb
        return emb

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``model.encode`` from the cache: (B, 3, S, S) -> (B, C, g, g) float32 on x's device."""
        return torch.stack([self.one(row) for row in x]).float().to(x.device)


@dataclass
class LiteItem:
    stem: str
    cls: int
    image: torch.Tensor  # (3, S, S) uint8, letterboxed
    valid: tuple[int, int]
    mask: torch.Tensor  # (S, S) bool, model frame
    tight: np.ndarray  # tight box, original-image pixels (pixel edges)
    orig_size: tuple[int, int]


def lite_items(ds: Dataset, pre: PreprocessConfig, size: int) -> tuple[list[LiteItem], int]:
    """One item per non-empty (image, class) mask; returns the items and the number of empty masks."""
    items, empty = [], 0
    for rec in ds.records:
        s = rec.load()
        img, valid = prepare_image(s.image, pre, size)
        for cls, m in s.masks:
            tight = mask_box(m)
            mm = prepare_mask(m, pre, size)
            if tight is None or not mm.any():
                empty += 1
                continue
            items.append(LiteItem(s.stem, cls, img, valid, mm, tight, (m.shape[0], m.shape[1])))
    return items, empty


def sample_valid_points(mask: torch.Tensor, valid: tuple[int, int], box: torch.Tensor, n: int, size: int,
                        g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n query points inside the valid region: 1/2 in the mask's boundary band, 1/4 in the box, 1/4 anywhere.
    Returns coords (n, 2) in [-1, 1] (model frame) and their labels (n,)."""
    h, w = valid
    m = mask[:h, :w]
    n_band, n_box = n // 2, n // 4
    band = boundary_band(m, 3).flatten().nonzero()[:, 0]
    if band.numel() == 0:
        band = torch.arange(h * w)
    pb = band[torch.randint(band.numel(), (n_band,), generator=g)]
    x0, y0, x1, y1 = box.tolist()  # SAM's convention: x1/y1 the last covered column/row
    bx = (x0 + torch.rand(n_box, generator=g) * max(x1 + 1 - x0, 1.0)).long().clamp(0, w - 1)
    by = (y0 + torch.rand(n_box, generator=g) * max(y1 + 1 - y0, 1.0)).long().clamp(0, h - 1)
    pa = torch.randint(h * w, (n - n_band - n_box,), generator=g)
    idx = torch.cat([pb, by * w + bx, pa])
    i, j = idx // w, idx % w
    coords = torch.stack([(2 * j + 1) / size - 1, (2 * i + 1) / size - 1], dim=-1).float()
    return coords, m[i, j].float()


def augmented(it: LiteItem, tf: Any, seed: int, size: int) -> LiteItem:
    """``it`` with ``tf`` (data/augment.py) applied to its image and mask inside the valid region (the padding
    stays zero); the tight box is the augmented mask's, in original-image pixels. The item itself if every
    draw pushed the object out of the frame."""
    h, w = it.valid
    box = torch.from_numpy(mask_box(it.mask[:h, :w].numpy())).float()  # type: ignore[arg-type]
    drawn = apply_seeded(tf, it.image[:, :h, :w], it.mask[:h, :w], box, seed)
    if drawn is None:
        return it
    img_a, m_a = drawn
    image = torch.zeros_like(it.image)
    image[:, :h, :w] = (img_a * 255).round().clamp(0, 255).to(torch.uint8)
    mask = torch.zeros_like(it.mask)
    mask[:h, :w] = m_a
    scale = letterbox_shape(it.orig_size[0], it.orig_size[1], size)[0]
    tight = mask_box(m_a.numpy())
    assert tight is not None
    return replace(it, image=image, mask=mask, tight=tight / scale)


def item_draw(it: LiteItem, pre: PreprocessConfig, size: int, seed: int, epoch: int, index: int, points: int,
              jitter: float, tf: Any = None) -> dict[str, torch.Tensor]:
    s = stable_seed(seed, epoch, index)
    if tf is not None:
        it = augmented(it, tf, s, size)
    box = jitter_box(it.tight, jitter, it.orig_size[1], it.orig_size[0], np.random.default_rng(s))
    box_in = input_boxes(box[None], pre, it.orig_size, size)[0]
    coords, labels = sample_valid_points(it.mask, it.valid, box_in, points, size, torch.Generator().manual_seed(s))
    return {"input": to_input(it.image, pre, it.valid), "box": box_in, "coords": coords, "labels": labels,
            "cls": torch.tensor(it.cls)}


def train_lite(
    cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset, root: Path | None = None, resume: bool = False,
    device: str = "auto", reporter: Reporter | None = None, stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """The two-phase run (see the module docstring); returns ``train``'s summary."""
    from imedsam_train.pretrained import base_file

    rep = reporter or Reporter()
    if cfg.pretrain_epochs:
        raise UserError("--model lite: --pretrain-epochs is not supported (train on the pretraining data first, "
                        "then start from its best.pt with --init-from)")
    if cfg.points <= 0:
        raise UserError("--model lite: --points must be > 0")
    d = init_distributed(device)
    dev = pick_device(device, d)
    amp = cfg.amp and dev.type == "cuda"
    out, last_path, best_path = run_paths(cfg, root, resume, train_ds, val_ds)
    base_path = base_file(cfg.sam_checkpoint)

    torch.manual_seed(cfg.seed)
    ck: dict[str, Any] = {}
    try:
        if resume:
            model, ck, base_sha = _resume_model(last_path, cfg, list(train_ds.class_names))
        elif cfg.init_from:
            model, base_sha = _init_model(Path(cfg.init_from), cfg, len(train_ds.class_names), "adapters")
        else:
            model, base_sha = build("lite", cfg.input_size, len(train_ds.class_names), base_path)
    except ValueError as e:
        raise UserError(str(e)) from None
    if not isinstance(model, LiteIMedSAM) or base_sha is None:
        raise UserError(f"{cfg.init_from}: --init-from needs a lite checkpoint")
    if cfg.init_from and cfg.decoder_epochs and not encoder_is_base(model):
        # phase 1 trains on cached embeddings of LiteMedSAM's own encoder: wrong for a trained one
        raise UserError(f"{cfg.init_from}: its encoder was trained end to end, so --decoder-epochs (cached "
                        "embeddings of the untrained encoder) cannot follow it; use --epochs only")
    model.to(dev)
    pre, size = model.cfg.preprocess, model.cfg.input_size

    t0 = time.time()
    items, empty = lite_items(train_ds, pre, size)
    if not items:
        raise UserError(f"{train_ds.source}: no training image has a non-empty mask")
    val_skip: dict[str, int] = {}
    val_cases = list(cases_from_dataset(val_ds, size, size, cfg.val_jitter, cfg.seed, val_skip, pre=pre)) \
        if d.main else []  # rank 0 validates
    skipped = {"empty_mask_train": empty + train_ds.skipped.get("empty_mask", 0),
               "empty_mask_val": val_skip.get("empty_mask", 0)}
    if d.main:
        rep.echo(f"data: train {len(items)} items, val {len(val_cases)}; skipped {skipped}; "
                 f"loaded in {time.time() - t0:.0f}s")
        _make_dir(last_path.parent)
        (out / FINISHED_NAME).unlink(missing_ok=True)

    total = cfg.decoder_epochs + cfg.epochs
    cache = EmbeddingCache(model, base_sha, cache_dir() / EMBEDDING_CACHE)
    jit = cfg.jitter_px if cfg.jitter_px is not None else cfg.val_jitter  # original-image px, as val and test
    tf = train_transforms() if cfg.resolved_augment() else None

    def phase(epoch: int) -> str:
        return "decoder" if epoch < cfg.decoder_epochs else "end-to-end"

    steps_per_epoch = math.ceil(len(items) / (cfg.batch_size * d.world))
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.resolved_lr_rest()), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_factory(total * steps_per_epoch, cfg.warmup_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    rec = EpochRecord(cfg, out, best_path, last_path, opt, sched, scaler, rep, total)

    def payload() -> dict[str, Any]:
        return model_payload(model, base_sha, base_path.name, train_ds.class_names)

    def validate(epoch_phase: str) -> float:
        enc = cache.encode if epoch_phase == "decoder" and encoder_is_base(model) else None
        return mean_dice(run_cases(model, val_cases, size, encode=enc))

    start_epoch = rec.resume(ck, d.main) if resume else 0
    if cfg.decoder_epochs > start_epoch:
        from imedsam_core.cli_common import Progress

        t_c = time.time()
        # every rank its share of the training inputs; rank 0 (the one that validates) the val inputs too
        mine = [to_input(it.image, pre, it.valid) for it in items[d.rank :: d.world]] + [
            to_input(c.image, pre, c.valid or (size, size)) for c in val_cases]
        # the frozen encoder on every input: minutes on a CPU, so it shows its progress
        with Progress("embedding cache", len(mine), "inputs", "inputs/s", echo=rep.echo,
                      enabled=rep.progress and d.main) as bar:
            for i, x in enumerate(mine):
                cache.one(x)
                bar.update(i + 1)
        if d.main:
            rep.echo(f"embedding cache: {len(cache.memo)} inputs, {cache.computed} computed in "
                     f"{time.time() - t_c:.0f}s ({cache.folder})")
        barrier(d)  # every shard is on disk before any rank reads another's
    if not resume and d.main:  # the base itself is the first candidate: training is selected only if it beats it
        vd = validate(phase(0))
        rec.start_from(vd, payload())
        start = f"the --init-from model {cfg.init_from}" if cfg.init_from else "untrained: LiteMedSAM"
        rep.echo(f"epoch 0 ({start}) val Dice {vd:.2f}")

    step_mod: nn.Module = _Step(model)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # phase 1 leaves the encoder's parameters unused
        step_mod = DDP(step_mod, device_ids=[d.local] if dev.type == "cuda" else None, find_unused_parameters=True)
    steps_done = 0
    for epoch in range(start_epoch, total):
        ph = phase(epoch)
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(stable_seed(cfg.seed, "order", epoch)))
        mine_i = rank_share(order.tolist(), d)
        batches = [mine_i[i : i + cfg.batch_size] for i in range(0, len(mine_i), cfg.batch_size)]
        torch.manual_seed(stable_seed(cfg.seed, "torch", epoch, d.rank))
        model.train()
        tally = EpochTally(rep, d.main, f"epoch {epoch + 1}/{total} [{ph}]", len(batches))
        for batch in batches:
            draws = [item_draw(items[i], pre, size, cfg.seed, epoch, i, cfg.points, jit,
                               tf if ph == "end-to-end" else None) for i in batch]
            x = torch.stack([r["input"] for r in draws])
            boxes = torch.stack([r["box"] for r in draws]).to(dev)
            coords = torch.stack([r["coords"] for r in draws]).to(dev)
            embedded = ph == "decoder"
            with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
                coarse, fine = step_mod(cache.encode(x).to(dev) if embedded else x.to(dev), boxes, coords, embedded)
            labels = torch.stack([r["labels"] for r in draws]).to(dev)
            cls = torch.stack([r["cls"] for r in draws]).to(dev)
            loss, lc, lf = imedsam_loss(coarse, fine, labels, cls, epoch)
            optimizer_step(loss, opt, scaler, sched)
            tally.add(loss, lc, lf, len(batch))
            steps_done += 1
            if stop_after_steps is not None and steps_done >= stop_after_steps:
                tally.close()
                return {"stopped": True, "run": str(out)}
        tally.finish(d, dev)
        if not d.main:
            barrier(d)
            continue
        t_val = time.time()
        vd = validate(ph)
        rec.close(epoch, ph, tally, vd, t_val, payload())
        barrier(d)
    return rec.finish(skipped, d.main)
