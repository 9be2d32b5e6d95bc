"""The training loop: seeded, resumable, atomic checkpoints every epoch, DDP through ``torchrun``.

Reproducibility. Every random draw is derived from (seed, epoch, ...): the data order, each item's
augmentation / box jitter / query points (``TrainSet``), and the global torch RNG (dropout) reseeded at
the start of each epoch. A run resumed from ``last.pt`` (end of epoch e) therefore replays epoch e+1
exactly: on CPU the final weights equal an uninterrupted run's. RNG states are saved too (as tensors and
lists, loadable with ``weights_only=True``) and restored on resume.

Several GPUs: ``torchrun --nproc_per_node 8 -m imedsam_train.cli kvasir ...``; each rank takes every
world_size-th item of the epoch order (batch size is per GPU), rank 0 validates, logs and saves.
Plain ``python``/``imedsam-train`` (world size 1, CPU or one GPU) runs the same code without a process group.
"""

from __future__ import annotations

import csv
import io
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imedsam_core.atomic import atomic_write_text, check_writable_parent
from imedsam_core.cli_common import Progress
from imedsam_core.errors import UserError
from imedsam_core.paths import BEST_CHECKPOINT, CHECKPOINT_DIR, FINISHED_NAME, LAST_CHECKPOINT, run_dir
from imedsam_train.build import build, sha256_file
from imedsam_train.checkpoint import model_payload, save_checkpoint
from imedsam_train.data.boxes import stable_seed
from imedsam_train.data.records import Dataset
from imedsam_train.data.training_set import TrainSet, cache_dataset
from imedsam_train.evaluate import Case, cases_from_dataset, mean_dice, run_cases
from imedsam_train.losses import imedsam_loss
from imedsam_train.model import IMedSAM

LOG_NAME = "log.csv"
CURVE_NAME = "curve.png"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run (stored in the checkpoint; a resume must not change it)."""

    name: str = "run"
    model: str = "tiny"
    input_size: int = 384
    epochs: int = 100
    batch_size: int = 1  # per process (per GPU under torchrun)
    lr: float = 1e-3  # INR
    lr_rest: float | None = None  # everything else; None: 5e-5 with a SAM checkpoint, = lr from scratch
    weight_decay: float = 0.01
    warmup_steps: int = 50
    seed: int = 0
    points: int = 4096  # query points per item (0 = every pixel); half near the mask boundary
    jitter_px: float | None = None  # train box jitter, model-input px; None: 20 px at 384 scaled to S
    val_jitter: float = 20.0  # validation box jitter, original-image px (selection metric)
    pretrain_epochs: int = 0  # the first N epochs draw from the pretraining data
    # lite: the first N epochs train the decoder on cached embeddings of the frozen encoder, then ``epochs``
    # more train end to end (LoRA and the frequency adapter too); jitter_px is then in original-image px
    decoder_epochs: int = 0
    workers: int = 1
    amp: bool = True  # used on CUDA only
    sam_checkpoint: str | None = None
    init_from: str | None = None  # start from this imedsam checkpoint's weights (a fresh schedule)
    # photometric and geometric augmentation (data/augment.py); None: the builder's default (run_defaults).
    # lite augments in its end-to-end epochs only: a cached embedding is of the augmentation-free image
    augment: bool | None = None

    def resolved_lr_rest(self) -> float:
        if self.lr_rest is not None:
            return self.lr_rest
        return 5e-5 if self.sam_checkpoint or self.model == "lite" else self.lr

    def resolved_augment(self) -> bool:
        return bool(run_defaults(self.model)["augment"]) if self.augment is None else self.augment

    def resolved_jitter(self) -> float:
        return self.jitter_px if self.jitter_px is not None else 20.0 * self.input_size / 384


# What a command-line run gets for the options it leaves out. lite (config.DEFAULT_BUILDER) starts from LiteMedSAM's
# weights and needs only minutes: the shipped model's second stage (MODEL_CARD.md); the others train long, from
# scratch or from SAM's encoder, with TrainConfig's own defaults.
LITE_RUN_DEFAULTS: dict[str, Any] = {"epochs": 2, "decoder_epochs": 2, "batch_size": 8, "points": 2048, "lr_rest": 1e-4,
                                     "augment": False}


def run_defaults(model: str) -> dict[str, Any]:
    """The defaults of epochs, decoder_epochs, batch_size, points, lr_rest and augment for a run of this builder."""
    base = {f.name: f.default for f in fields(TrainConfig) if f.name in LITE_RUN_DEFAULTS}
    base["augment"] = True  # the released code's recipe augments
    return {**base, **LITE_RUN_DEFAULTS} if model == "lite" else base


# --- RNG state as weights_only-loadable values ---

def rng_state() -> dict[str, Any]:
    _, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    version, pstate, gauss = random.getstate()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": int(version), "state": torch.tensor(pstate, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = st["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


# --- distributed ---

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist()
    import torch.distributed as dist

    use_cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    d = Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    if use_cuda:
        torch.cuda.set_device(d.local)
    return d


def run_paths(cfg: TrainConfig, root: Path | None, resume: bool, train_ds: Dataset,
              val_ds: Dataset) -> tuple[Path, Path, Path]:
    """(run folder, last.pt, best.pt) of a run about to start or resume, refused in one line before any work
    when it cannot: a new run over an old one, a resume with nothing to resume, mismatched classes, or an
    output that cannot be written (e.g. ./runs a regular file)."""
    out = run_dir(cfg.name, root)
    ck_dir = out / CHECKPOINT_DIR
    last_path, best_path = ck_dir / LAST_CHECKPOINT, ck_dir / BEST_CHECKPOINT
    if last_path.exists() and not resume:
        raise UserError(f"{out}: run already exists; pass --resume to continue it or choose another --name")
    if resume and not last_path.exists():
        raise UserError(f"{last_path}: nothing to resume (no checkpoint yet)")
    if train_ds.class_names != val_ds.class_names:
        raise UserError(f"{val_ds.source}: classes {val_ds.class_names} differ from training {train_ds.class_names}")
    check_writable_parent(last_path)
    return out, last_path, best_path


def restore_training_state(ck: dict[str, Any], opt: Any, sched: Any, scaler: Any) -> tuple[int, list[Any], dict[str, Any]]:
    """Optimizer, scheduler, scaler and RNG state of a resumed checkpoint, as saved; returns (the epoch to
    start at, the history so far, the best so far)."""
    tr = ck["train"]
    opt.load_state_dict(tr["optimizer"])
    sched.load_state_dict(tr["scheduler"])
    scaler.load_state_dict(tr["scaler"])
    set_rng_state(tr["rng"])
    return tr["epoch"] + 1, list(tr["history"]), dict(tr["best"])


def pick_device(device: str, d: Dist) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is available")
        return torch.device("cuda", d.local)
    return torch.device(device)


class _Step(nn.Module):
    """Tuple-returning wrapper so DDP can trace which outputs carry gradients. embedded: ``x`` is the encoder's
    output (lite's phase 1, on cached embeddings; the encoder's parameters then go unused), else the image."""

    def __init__(self, model: IMedSAM) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, boxes: torch.Tensor, coords: torch.Tensor,
                embedded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.model.decode(x, boxes, coords) if embedded else self.model(x, boxes, coords)
        return p.coarse, p.fine


def barrier(d: Dist) -> None:
    """Every rank waits here (nothing to wait for in one process)."""
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def mean_over_ranks(sums: np.ndarray, d: Dist, dev: torch.device) -> np.ndarray:
    """The epoch's loss sums averaged over the ranks (as they are in one process)."""
    if d.world == 1:
        return sums
    import torch.distributed as dist

    t = torch.tensor(sums, device=dev)
    dist.all_reduce(t)
    return t.cpu().numpy() / d.world


# --- schedule ---

def rank_share(order: list[int], d: Dist) -> list[int]:
    """This rank's items of an epoch's order: every world-th, the order first padded with its own head to a
    multiple of the world size (as DistributedSampler does), so every rank runs the same number of steps:
    DDP's gradient all-reduce would wait forever for a rank that has finished."""
    pad = -len(order) % d.world
    return (order + order[:pad])[d.rank :: d.world]


def lr_lambda_factory(total_steps: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t))  # cosine to 2% of the peak

    return f


def param_groups(model: IMedSAM, lr_inr: float, lr_rest: float) -> list[dict[str, Any]]:
    inr = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("inr.")]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("inr.")]
    return [{"params": inr, "lr": lr_inr, "name": "inr"}, {"params": rest, "lr": lr_rest, "name": "rest"}]


def write_log(path: Path, history: list[dict[str, Any]]) -> None:
    if not history:
        return
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(history[0]))
    w.writeheader()
    w.writerows(history)
    atomic_write_text(path, buf.getvalue())


def _collate_threads(_: int) -> None:
    torch.set_num_threads(1)  # workers share the few cores with the main process


@dataclass
class Reporter:
    """Where progress goes: ``echo`` takes the lines (the CLI passes typer.echo; quiet tests a no-op) and
    ``progress`` turns the progress bars (the epoch's, lite's embedding cache), or their plain lines when piped,
    on or off."""

    echo: Callable[[str], None] = print
    progress: bool = True


def optimizer_step(loss: torch.Tensor, opt: Any, scaler: Any, sched: Any) -> None:
    """One step of either trainer: the gradients through the AMP scaler (a pass-through where AMP is off), the
    optimizer, the schedule."""
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()


@dataclass
class EpochRecord:
    """Rank 0's record of a run (the history, the best epoch so far) and what the end of every epoch writes, in
    either trainer: the log row, the best and last checkpoints, log.csv, the curve and one line."""

    cfg: TrainConfig
    out: Path
    best_path: Path
    last_path: Path
    opt: Any
    sched: Any
    scaler: Any
    rep: Reporter
    total: int  # epochs in the run, for the line
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"epoch": -1, "val_dice": -1.0})

    def _meta(self, epoch: int, val_dice: float) -> dict[str, Any]:
        return {"epoch": epoch, "val_dice": val_dice, "config": asdict(self.cfg), "best": dict(self.best)}

    def start_from(self, val_dice: float, payload: dict[str, Any]) -> None:
        """The model before any training as the first candidate (the lite trainer's base): the best at epoch 0,
        written as the best checkpoint only (no training state yet: a resume starts from scratch)."""
        self.best = {"epoch": 0, "val_dice": val_dice}
        save_checkpoint(self.best_path, {**payload, "train_meta": self._meta(-1, val_dice)})

    def resume(self, ck: dict[str, Any], main: bool) -> int:
        """Optimizer, scheduler, scaler, RNG, history and best from the last checkpoint ``ck``; returns the epoch
        to start at."""
        start, self.history, self.best = restore_training_state(ck, self.opt, self.sched, self.scaler)
        if main:
            self.rep.echo(f"resumed {self.last_path} at epoch {start}")
        return start

    def finish(self, skipped: dict[str, int], main: bool) -> dict[str, Any]:
        """The run marked finished (rank 0) and its summary, which the CLIs print (skipped: counts by reason)."""
        if main:
            _mark_finished(self.out, self.total, self.best, [self.best_path, self.last_path])
        return {"run": str(self.out), "best_epoch": self.best["epoch"], "best_val_dice": self.best["val_dice"],
                "skipped": skipped, "epochs": self.total, "checkpoint": str(self.best_path)}

    def close(self, epoch: int, stage: str, tally: EpochTally, val_dice: float, t_val: float,
              payload: dict[str, Any]) -> None:
        """tally: the epoch's figures after ``finish`` (over all ranks); t_val: when validation began (the rate
        leaves it out)."""
        losses, images, t_epoch = tally.losses, tally.all_images, tally.t0
        # plain floats: numpy scalars would make the checkpoint unloadable with weights_only=True
        row = {"epoch": epoch + 1, "stage": stage, "loss": float(losses[0]), "loss_coarse": float(losses[1]),
               "loss_fine": float(losses[2]), "val_dice": float(val_dice),
               "lr_inr": float(self.opt.param_groups[0]["lr"]), "lr_rest": float(self.opt.param_groups[1]["lr"]),
               "images_per_s": float(images / max(t_val - t_epoch, 1e-9)), "seconds": float(time.time() - t_epoch)}
        self.history.append(row)
        improved = val_dice > self.best["val_dice"]
        if improved:
            self.best = {"epoch": epoch + 1, "val_dice": val_dice}
        meta = self._meta(epoch, val_dice)
        if improved:  # best first: a kill between the two writes replays this epoch from the previous last
            save_checkpoint(self.best_path, {**payload, "train_meta": meta})
        save_checkpoint(self.last_path, {**payload, "train": {
            **meta, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(), "rng": rng_state(), "history": self.history}})
        write_log(self.out / LOG_NAME, self.history)
        _curve(self.out / CURVE_NAME, self.history)
        self.rep.echo(f"epoch {epoch + 1}/{self.total} [{stage}] loss {row['loss']:.4f} val Dice {val_dice:.2f} "
                      f"best {self.best['val_dice']:.2f}@{self.best['epoch']} "
                      f"{row['images_per_s']:.1f} img/s {row['seconds']:.0f}s")


def train(
    cfg: TrainConfig, train_ds: Dataset, val_ds: Dataset, pretrain_ds: Dataset | None = None,
    root: Path | None = None, resume: bool = False, device: str = "auto", reporter: Reporter | None = None,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Train; returns a summary (run dir, best epoch and val Dice, skipped counts)."""
    if cfg.model == "lite":
        from imedsam_train.train_lite import train_lite

        return train_lite(cfg, train_ds, val_ds, root, resume, device, reporter, stop_after_steps)
    if cfg.decoder_epochs:
        raise UserError("--decoder-epochs is an option of --model lite")
    rep = reporter or Reporter()
    d = init_distributed(device)
    dev = pick_device(device, d)
    amp = cfg.amp and dev.type == "cuda"
    if cfg.pretrain_epochs and pretrain_ds is None:
        raise UserError("--pretrain-epochs needs --pretrain-data")
    out, last_path, best_path = run_paths(cfg, root, resume, train_ds, val_ds)

    torch.manual_seed(cfg.seed)
    trainable = "adapters" if cfg.sam_checkpoint else "all"
    ck: dict[str, Any] = {}
    try:
        # Resume and --init-from rebuild the architecture the checkpoint stores (presets may have changed since).
        if resume:
            model, ck, base_sha = _resume_model(last_path, cfg, list(train_ds.class_names))
        elif cfg.init_from:
            model, base_sha = _init_model(Path(cfg.init_from), cfg, len(train_ds.class_names), trainable)
        else:
            model, base_sha = build(cfg.model, cfg.input_size, len(train_ds.class_names), cfg.sam_checkpoint,
                                    trainable=trainable)
    except ValueError as e:
        raise UserError(str(e)) from None
    model.to(dev)

    # Data: cached at the model's input size once; empty masks are skipped and counted.
    t0 = time.time()
    train_cache, empty_train = cache_dataset(train_ds, cfg.input_size)
    pre_cache, empty_pre = (cache_dataset(pretrain_ds, cfg.input_size) if pretrain_ds is not None else ([], 0))
    if not train_cache:
        raise UserError(f"{train_ds.source}: no training image has a non-empty mask")
    skipped = {"empty_mask_train": empty_train + train_ds.skipped.get("empty_mask", 0),
               "empty_mask_pretrain": empty_pre}
    val_skip: dict[str, int] = {}
    val_cases: list[Case] = []
    if d.main:
        val_cases = list(cases_from_dataset(val_ds, cfg.input_size, cfg.input_size, cfg.val_jitter, cfg.seed, val_skip))
    skipped["empty_mask_val"] = val_skip.get("empty_mask", 0)
    jit = cfg.resolved_jitter()
    aug = cfg.resolved_augment()
    sets = {"train": TrainSet(train_cache, cfg.input_size, cfg.seed, cfg.points, jit, augment=aug)}
    if pre_cache:
        sets["pretrain"] = TrainSet(pre_cache, cfg.input_size, cfg.seed, cfg.points, jit, augment=aug)
    if d.main:
        rep.echo(f"data: train {len(sets['train'])} items, pretrain {len(sets.get('pretrain', []))}, "
                 f"val {len(val_cases)}; skipped {skipped}; loaded in {time.time() - t0:.0f}s")
        _make_dir(last_path.parent)  # after the data checks: a refused dataset leaves no run folder behind
        # a resumed run (perhaps with more --epochs) is unfinished until its loop completes again
        (out / FINISHED_NAME).unlink(missing_ok=True)

    def stage(epoch: int) -> str:
        return "pretrain" if epoch < cfg.pretrain_epochs else "train"

    per_step = cfg.batch_size * d.world
    steps_of = [math.ceil(len(sets[stage(e)]) / per_step) for e in range(cfg.epochs)]
    opt = torch.optim.AdamW(param_groups(model, cfg.lr, cfg.resolved_lr_rest()), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_factory(sum(steps_of), cfg.warmup_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    rec = EpochRecord(cfg, out, best_path, last_path, opt, sched, scaler, rep, cfg.epochs)
    start_epoch = rec.resume(ck, d.main) if resume else 0

    step_mod: nn.Module = _Step(model)
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        step_mod = DDP(step_mod, device_ids=[d.local] if dev.type == "cuda" else None, find_unused_parameters=True)

    steps_done = 0
    for epoch in range(start_epoch, cfg.epochs):
        st = stage(epoch)
        ds = sets[st]
        ds.set_epoch(epoch)
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(stable_seed(cfg.seed, "order", epoch)))
        mine = rank_share(order.tolist(), d)
        batches = [mine[i : i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=cfg.workers,
                                             worker_init_fn=_collate_threads if cfg.workers else None)
        torch.manual_seed(stable_seed(cfg.seed, "torch", epoch, d.rank))  # dropout draws of this epoch
        model.train()
        tally = EpochTally(rep, d.main, f"epoch {epoch + 1}/{cfg.epochs} [{st}]", len(batches))
        for batch in loader:
            image = batch["image"].to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.float16, enabled=amp):
                coarse, fine = step_mod(image, batch["box"].to(dev), batch["coords"].to(dev))
            loss, lc, lf = imedsam_loss(coarse, fine, batch["labels"].to(dev), batch["cls"].to(dev), epoch)
            optimizer_step(loss, opt, scaler, sched)
            tally.add(loss, lc, lf, image.shape[0])
            steps_done += 1
            if stop_after_steps is not None and steps_done >= stop_after_steps:
                tally.close()
                return {"stopped": True, "run": str(out)}
        tally.finish(d, dev)
        if d.main:
            t_val = time.time()
            # Validated: every epoch on the target data and the last pretraining one (pretraining epochs
            # are long; their val scores are not candidates worth the time).
            validate = st == "train" or epoch == cfg.pretrain_epochs - 1
            vd = mean_dice(run_cases(model, val_cases, cfg.input_size)) if validate else math.nan
            payload = model_payload(model, base_sha, Path(cfg.sam_checkpoint).name if cfg.sam_checkpoint else None,
                                    train_ds.class_names)
            rec.close(epoch, st, tally, vd, t_val, payload)
        barrier(d)
    return rec.finish(skipped, d.main)


def _mark_finished(out: Path, epochs: int, best: dict[str, Any], checkpoints: list[Path]) -> None:
    """Written last and atomically: the commands' defaults take only finished runs, and their exports (matched
    by these sha256s)."""
    import json

    info = {"finished": True, "epochs": epochs, "best": best,
            "sha256": {p.name: sha256_file(p) for p in checkpoints if p.is_file()},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(out / FINISHED_NAME, json.dumps(info, indent=1) + "\n")


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{path}: cannot create the run folder ({e.strerror or type(e).__name__})") from None


def _check_same_model(path: Path, flag: str, model: IMedSAM, cfg: TrainConfig, num_classes: int) -> None:
    mc = model.cfg
    if (mc.name, mc.input_size, mc.num_classes) != (cfg.model, cfg.input_size, num_classes):
        raise UserError(f"{path}: {flag} holds a {mc.name} model at {mc.input_size} px with "
                        f"{mc.num_classes} classes; this run asks for {cfg.model} at {cfg.input_size} px "
                        f"with {num_classes}")


def _resume_model(path: Path, cfg: TrainConfig, classes: list[str]) -> tuple[IMedSAM, dict[str, Any], str | None]:
    """The run's model rebuilt from ``last.pt``'s stored config and weights (never today's preset), after
    checking the run is resumed with its original settings and classes."""
    from imedsam_train.checkpoint import load_checkpoint

    model, ck = load_checkpoint(path, cfg.sam_checkpoint)
    tr = ck.get("train")
    if not isinstance(tr, dict) or "optimizer" not in tr or not isinstance(tr.get("config"), dict):
        raise UserError(f"{path}: not a resumable training checkpoint")
    now, defaults = asdict(cfg), asdict(TrainConfig())
    was = {k: tr["config"].get(k, defaults[k]) for k in now}  # a setting added since: its default
    if was != now or set(tr["config"]) - set(now):
        diff = sorted(k for k in now if was[k] != now[k])
        raise UserError(f"{path}: --resume with different settings ({', '.join(diff)}); use the original ones")
    _check_same_model(path, "--resume", model, cfg, len(classes))
    stored = ck.get("classes")
    if stored is not None and list(stored) != classes:
        raise UserError(f"{path}: the run was trained on classes {list(stored)}, the data now has {classes}")
    base = ck.get("base")
    return model, ck, base["sha256"] if base else None


def _init_model(path: Path, cfg: TrainConfig, num_classes: int, trainable: str) -> tuple[IMedSAM, str | None]:
    """Rebuild another run's model from its own checkpoint, to start this run from its weights."""
    from imedsam_train.checkpoint import load_checkpoint

    model, ck = load_checkpoint(path, cfg.sam_checkpoint)
    _check_same_model(path, "--init-from", model, cfg, num_classes)
    model.cfg = model.cfg.replace(trainable=trainable)  # type: ignore[misc]
    model.apply_freeze_policy()
    base = ck.get("base")
    return model, base["sha256"] if base else None


def _curve(path: Path, history: list[dict[str, Any]]) -> None:
    from imedsam_train.plots import training_curve

    training_curve(history, path)


class EpochTally:
    """One epoch's running figures in either trainer: the sums of (loss, coarse, fine) over its steps, the images
    seen, the progress bar, the start time."""

    def __init__(self, rep: Reporter, enabled: bool, desc: str, total: int) -> None:
        from rich.console import Console

        # the bar on stdout beside the epoch lines; piped, Progress's plain lines (steps, rate, time left)
        self.prog = Progress(desc, total, "steps", "steps/s", console=Console(), echo=rep.echo,
                             enabled=enabled and rep.progress)
        self.t0 = time.time()
        self.sums = np.zeros(3)
        self.images = 0
        self.losses = np.full(3, math.nan)  # set by finish: the mean per step over all ranks
        self.all_images = 0  # set by finish: the images over all ranks

    def add(self, loss: torch.Tensor, coarse: torch.Tensor, fine: torch.Tensor, images: int) -> None:
        # one copy to the host per step for all three (an .item() each, and again for the bar, synced four times)
        vals = torch.stack([t.detach().float() for t in (loss, coarse, fine)]).cpu().numpy()
        self.sums += vals
        self.images += images
        speed = self.images / max(time.time() - self.t0, 1e-9)
        self.prog.update(self.prog.done + 1, note=f"loss {vals[0]:.4f}  {speed:.1f} img/s")

    def close(self) -> None:
        self.prog.close(line=False)  # the epoch line follows: no closing line of Progress's own

    def finish(self, d: Dist, dev: torch.device) -> None:
        """The end of the epoch's steps: closes the bar and makes the figures rank-wide (a collective under DDP:
        every rank calls it)."""
        self.close()
        self.losses = mean_over_ranks(self.sums, d, dev) / max(self.prog.done, 1)  # the steps added
        self.all_images = self.images * d.world
