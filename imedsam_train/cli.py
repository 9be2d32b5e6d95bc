"""``imedsam-train``: model information and training commands (thin Typer layer)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imedsam_deploy.cli_common import guarded, run_app

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
    model: Annotated[str, typer.Argument(help="vit_b, vit_l, vit_h or tiny")],
    input_size: Annotated[int, typer.Option(help="model input size")] = 384,
    num_classes: Annotated[int, typer.Option(help="number of classes (INR heads)")] = 1,
    sam_checkpoint: Annotated[Path | None, typer.Option(help="official SAM/MedSAM checkpoint to load")] = None,
) -> None:
    """Print the parameter report (total / trainable per part), ending with ``trainable: N``."""
    from imedsam_deploy.errors import UserError
    from imedsam_train.build import build

    try:
        m, digest = build(model, input_size=input_size, num_classes=num_classes, sam_checkpoint=sam_checkpoint)
    except ValueError as e:
        raise UserError(str(e)) from None
    typer.echo(f"model: {model}  input: {input_size}  classes: {num_classes}  grid: {m.cfg.grid_size}")
    if digest:
        typer.echo(f"base: {sam_checkpoint} (sha256 {digest[:12]}…)")
    typer.echo(format_report(m.parameter_report()))


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
