"""``imedsam-export``: Export a checkpoint to ONNX / TensorRT artifacts."""

from __future__ import annotations

import typer

from imedsam_deploy.cli_common import fail, run_app

app = typer.Typer(add_completion=False, help="Export a checkpoint to ONNX / TensorRT artifacts.")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def _not_built() -> None:
    """Not built yet."""
    fail("imedsam-export is not built yet (issue #4)")


def main() -> None:
    run_app(app)
