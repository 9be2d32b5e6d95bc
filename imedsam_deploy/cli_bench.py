"""``imedsam-bench``: latency and throughput per stage and per backend, optionally against the reference."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from imedsam_core.atomic import check_writable_parent
from imedsam_core.cli_common import check_threads, guarded, run_app, say_line
from imedsam_core.contract import PRECISIONS
from imedsam_core.errors import UserError
from imedsam_deploy.backends.options import split as split_options
from imedsam_deploy.manifest import Artifact
from imedsam_deploy.sparse import SparseConfig

app = typer.Typer(add_completion=False, help="Benchmark the exported model per stage and backend.")
MODELS = ("vit_b", "vit_l", "vit_h", "tiny")


def _parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        v = tuple(float(x) for x in text.split(","))
    except ValueError:
        v = ()
    if len(v) != 4:
        raise UserError(f"--box {text!r}: expected x0,y0,x1,y1")
    return v  # type: ignore[return-value]


@app.command()
@guarded
def bench(
    artifact: Path | None = typer.Argument(None, help="Artifact folder (default: the newest export of a finished run or of the shipped lite model under runs/, else the bundled tiny model's)."),
    backend: list[str] | None = typer.Option(None, "--backend", "-b",
                                             help="Backend(s) (repeatable; default: every one available here)."),
    precision: str | None = typer.Option(None, help="fp32 | fp16 | bf16 | int8 (default: each backend's own, ov-cpu's bf16 where it pays (AMX, or an AMD CPU's AVX-512 BF16); ort-cpu also runs int8 when exported; ov-cpu's int8 only when asked for)."),
    backend_option: list[str] | None = typer.Option(None, "--backend-option", help="KEY=VALUE (repeatable), to "
                                                    "every backend timed that takes KEY: torch-cuda takes compile=1, "
                                                    "triton=1, tuned=0 and checkpoint=PATH (with --reference the "
                                                    "reference runs that checkpoint too), torch-cpu compile and tuned; "
                                                    "refused if none of them takes it."),
    batch: list[int] | None = typer.Option(None, "--batch", help="Images per frame (repeatable). [1]"),
    out_size: list[int] | None = typer.Option(None, "--out-size", help="Output side in pixels (repeatable). [the input size, 1/3 and 7/3 of it; with --reference the input size]"),
    points: int | None = typer.Option(None, "--points", help="Decoder points per call (chunk size)."),
    query: list[str] | None = typer.Option(None, "--query", help="full | box | sparse (repeatable). [sparse, box]"),
    reference: bool = typer.Option(False, "--reference", help="Also time the reference, interleaved, on the same images and boxes: for a SAM-ViT artifact the released code's compute (PyTorch, same weights); for a lite artifact zero-shot LiteMedSAM's own eager pipeline (its file from imedsam[train])."),
    tta: bool = typer.Option(False, "--tta", help="Time imedsam-infer --tta: every box also decoded on the image mirrored left to right (two images an encoder call); with --reference on a lite artifact, LiteMedSAM with the same average."),
    model: str | None = typer.Option(None, "--model", help="Benchmark this architecture (random weights, exported "
                                     "on the fly and cached; with torch backends alone, run in process and not "
                                     "exported) when no artifact of that size exists."),
    input_size: int = typer.Option(384, help="Input size for --model."),
    image: Path | None = typer.Option(None, help="Benchmark on this image (default: a synthetic one)."),
    box: str | None = typer.Option(None, help="Box x0,y0,x1,y1 on --image (default: its central 37%)."),
    warmup: int = typer.Option(1, min=0),
    repeat: int = typer.Option(10, min=1),
    threads: int | None = typer.Option(None, help="CPU threads (ONNX Runtime and the PyTorch reference)."),
    margin: float | None = typer.Option(None, help="Box margin (fraction of the box) for box/sparse queries."),
    sparse_stride: int = typer.Option(8, help="Initial lattice stride of the sparse planner."),
    out: Path = typer.Option(Path("runs/bench"), help="Folder for bench.json / bench.csv / bench.png."),
    json_path: Path | None = typer.Option(None, "--json", help="JSON report path (default OUT/bench.json)."),
    tune: bool = typer.Option(False, "--tune", help="First time the torch backends' switchable options on the first "
                              "query, batch and output size, keep the fastest whose masks agree, and save them to the "
                              "cache, where torch-cuda finds them when it next opens on this machine."),
) -> None:
    """Warm up, time repeated frames, print a table; write JSON, CSV and a PNG plot."""
    from imedsam_deploy import bench as B
    from imedsam_deploy.runtime import DEFAULT_MARGIN

    console = Console(stderr=True)

    def log(msg: str) -> None:
        say_line(console, msg)

    if model is not None and model not in MODELS:
        raise UserError(f"--model {model!r}: choose one of {', '.join(MODELS)}")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if tta and reference and model is not None:  # a random-weight --model is a SAM-ViT one: refused before its export
        from imedsam_deploy.bench.reference import NO_TTA

        raise UserError(NO_TTA)
    if image is not None and not image.is_file():
        raise UserError(f"{image}: no such image")
    check_threads(threads)
    options = split_options(backend_option)
    B.share_options(list(backend) if backend else None, options, reference)  # refused now, not after the export
    # refuse an output that cannot be written now, not after the whole benchmark
    check_writable_parent(out / "bench.csv")
    if json_path is not None:
        check_writable_parent(json_path)
    in_process = None
    target: Path | Artifact
    if artifact is not None:
        if not artifact.is_dir():
            raise UserError(f"{artifact}: not an artifact folder")
        log(f"using {artifact} (given)")
        target = artifact
    elif (latest := B.latest_artifact_of(model)) is not None:
        log(latest.line())
        target = latest.path
    elif model is None:
        raise UserError("no artifact of a finished run under runs/ and no shipped artifact in this install: run "
                        "imedsam-export first, or pass ARTIFACT or --model vit_b")
    elif backend and all(b in ("torch-cuda", "torch-cpu") for b in backend):
        from imedsam_deploy.backends import torch_part

        in_process_artifact = torch_part("in_process_artifact")
        # torch backends run the model itself: no ONNX export (minutes for vit_b) to wait for
        target, in_process = in_process_artifact(model, input_size, max_batch=max(8, *(batch or (1,))))
        log(f"random-weight {model} at {input_size}, in process (torch backends only: nothing exported)")
    else:
        target, in_process = B.random_artifact(model, input_size, log)
    opts = B.BenchOptions(
        backends=list(backend) if backend else None, precision=precision,
        batches=tuple(batch or (1,)), out_sizes=tuple(out_size) if out_size else None,
        queries=tuple(query or ("sparse", "box")), chunk=points, warmup=warmup, repeat=repeat,
        margin=margin if margin is not None else DEFAULT_MARGIN,
        sparse=SparseConfig(stride=sparse_stride), reference=reference, tta=tta, threads=threads, tune=tune,
        backend_options=options,
    )
    if any(b < 1 for b in opts.batches) or any(o < 1 for o in opts.out_sizes or ()):
        raise UserError("--batch must be >= 1 and --out-size >= 1")
    inputs_for = None
    if image is not None:
        the_box = _parse_box(box)
        inputs_for = lambda size, n: B.file_inputs(image, the_box, n)  # noqa: E731
    from imedsam_core.cli_common import Progress

    with Progress("benchmark", None, "rounds", "rounds/s", console=console) as bar:
        report = B.run_bench(target, opts, model=in_process, inputs_for=inputs_for, log=log, progress=bar)
    if image is not None:
        report["settings"]["image"] = str(image)
    jpath = json_path or out / "bench.json"
    out.mkdir(parents=True, exist_ok=True)
    B.write_outputs(report, jpath, out / "bench.csv", out / "bench.png")
    rows = B.table(report)
    t = Table(title=f"imedsam-bench: {report['model']} at {report['input_size']}, {report['artifact']}")
    for h in rows[0]:
        t.add_column(h, justify="right" if h not in ("backend", "query") else "left")
    for r in rows[1:]:
        t.add_row(*r)
    Console(width=max(Console().width, 170)).print(t)  # wide enough for every column when piped
    for name, why in report["skipped"].items():
        typer.echo(f"skipped {name}: {why}")
    typer.echo(f"wrote {jpath}, {out / 'bench.csv'}, {out / 'bench.png'}")


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
