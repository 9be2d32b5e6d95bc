"""``imedsam-serve``: serve an exported artifact with NVIDIA Triton Inference Server (PyTriton), torch-free."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from imedsam_core.cli_common import check_threads, guarded, require, run_app, say_line
from imedsam_core.contract import PRECISIONS
from imedsam_core.errors import UserError
from imedsam_core.paths import Choice, artifact_choice
from imedsam_deploy.backends.options import HELP as BACKEND_OPTION_HELP
from imedsam_deploy.backends.options import split as split_options
from imedsam_deploy.runtime import DEFAULT_QUERY, QUERY_MODES

if TYPE_CHECKING:
    from imedsam_deploy.serve import ServerConfig

app = typer.Typer(add_completion=False, help="Serve box-prompted segmentation over HTTP and gRPC (Triton).")


def _port(value: int, name: str) -> int:
    if not 0 < value < 65536:
        raise UserError(f"{name} {value}: expected a port between 1 and 65535")
    return value


@app.command()
@guarded
def serve(
    artifact: Path | None = typer.Argument(None, help="Artifact folder (default: imedsam-infer's for colour images: the newest export of a finished run or of the shipped lite model under runs/, else of zero-shot LiteMedSAM, else the bundled tiny model's)."),
    backend: str = typer.Option("auto", "--backend", help="auto|ov-cpu|ort-cpu|ort-cuda|ort-trt|tensorrt|torch-cuda."),
    precision: str | None = typer.Option(None, "--precision", help="fp32|fp16|bf16|int8 (default: the backend's)."),
    backend_option: list[str] | None = typer.Option(None, "--backend-option", help=BACKEND_OPTION_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (HTTP, gRPC and metrics)."),
    http_port: int = typer.Option(8000, "--http-port"),
    grpc_port: int = typer.Option(8001, "--grpc-port"),
    metrics_port: int = typer.Option(8002, "--metrics-port"),
    max_batch: int | None = typer.Option(None, "--max-batch", help="Most images one encode batch merges (default: the artifact's batch)."),
    queue_delay_us: int = typer.Option(2000, "--queue-delay-us", help="How long an encode waits for others to batch with."),
    query: str = typer.Option(DEFAULT_QUERY, "--query", help="full|box|sparse, as in imedsam-infer."),
    tta: bool = typer.Option(False, "--tta", help="As imedsam-infer --tta: every box also decoded on the image mirrored left to right, the logits averaged (an encode keeps both embeddings; twice the work)."),
    max_boxes: int = typer.Option(16, "--max-boxes", help="Most boxes a request may carry."),
    cache_size: int = typer.Option(64, "--cache-size", help="Embeddings kept for decode (least recently used dropped first)."),
    ttl: float = typer.Option(600.0, "--ttl", help="Seconds an unused embedding is kept."),
    workspace: Path | None = typer.Option(None, "--workspace", help="PyTriton's working folder (default: a temporary one)."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for ov-cpu and ort-cpu (default: the runtimes' own, one per core)."),
) -> None:
    """Serve `segment`, `encode` and `decode` (see imedsam_deploy.serve) until Ctrl-C or SIGTERM (exit 0), or
    until tritonserver or one of its models dies (exit 1)."""
    from rich.console import Console

    from imedsam_deploy import backends as bk

    if backend not in bk.CHOICES:
        raise UserError(f"--backend {backend!r}: choose one of {', '.join(bk.CHOICES)}")
    if precision is not None and precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if query not in QUERY_MODES:
        raise UserError(f"--query {query!r}: choose one of {', '.join(QUERY_MODES)}")
    options = split_options(backend_option)
    bk.parse_options(backend, options)
    ports = [_port(http_port, "--http-port"), _port(grpc_port, "--grpc-port"), _port(metrics_port, "--metrics-port")]
    if len(set(ports)) != 3:
        raise UserError(f"--http-port, --grpc-port and --metrics-port must differ (got {', '.join(map(str, ports))})")
    if max_batch is not None and max_batch < 1:
        raise UserError(f"--max-batch {max_batch}: must be positive")
    if max_boxes < 1 or cache_size < 1 or ttl <= 0 or queue_delay_us < 0:
        raise UserError("--max-boxes, --cache-size and --ttl must be positive, --queue-delay-us not negative")
    check_threads(threads)
    require("pytriton", "serve")
    from imedsam_deploy.serve import ServerConfig, check_config

    cfg = ServerConfig(host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                       max_batch=max_batch, queue_delay_us=queue_delay_us, workspace=workspace)
    check_config(cfg)  # before the model loads; Server.start checks again, as something may take a port meanwhile
    console = Console(stderr=True)
    if not serve_artifact(artifact, backend, precision, cfg, query, max_boxes, cache_size, ttl, console, options, tta,
                          threads):
        raise typer.Exit(1)  # a supervisor restarts a server that died, not one that was stopped


def choose_artifact(artifact_dir: Path | None) -> Choice:
    """The given folder, else ``imedsam-infer``'s default for colour images (``paths.default_artifact``): a finished
    run's export, never one exported mid-training; serving cannot tell a request's modality in advance."""
    return artifact_choice(artifact_dir, "pass ARTIFACT")


def serve_artifact(artifact_dir: Path | None, backend_name: str, precision: str | None, cfg: ServerConfig,
                   query: str, max_boxes: int, cache_size: int, ttl: float, console: object,
                   options: dict[str, str] | None = None, tta: bool = False, threads: int | None = None) -> bool:
    """Serve until stopped (True) or until tritonserver or one of its models dies (False)."""
    from imedsam_deploy.runtime import open_segmenter
    from imedsam_deploy.serve import ServeLimits, Server, Service

    choice = choose_artifact(artifact_dir)
    seg, how = open_segmenter(choice.path, backend_name, precision, options, threads, tta, query=query)
    be, art = seg.backend, seg.artifact
    say_line(console, choice.line())  # once it opened: a refused artifact gets its one error line only
    say_line(console, how)
    svc = Service(seg, ServeLimits(max_boxes=max_boxes, cache_size=cache_size, ttl_s=ttl))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("pytriton", "pytriton.client"):  # its own per-request tracebacks; ours are one line
        logging.getLogger(name).setLevel(logging.CRITICAL)
    say_line(console, f"serving {art.path} on {cfg.host}: HTTP {cfg.http_port}, gRPC {cfg.grpc_port}, "
             f"metrics {cfg.metrics_port} "
             "(models segment, encode, decode; Ctrl-C stops)")
    with be:
        try:
            asked = Server(svc, cfg).serve()
        finally:
            say_line(console, f"stopped; {svc.stats.summary()}")
    return asked


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
