"""``imedsam-bench``: Benchmark the exported model per stage and backend."""

from __future__ import annotations

import typer

from imedsam_deploy.cli_common import fail, run_app

app = typer.Typer(add_completion=False, help="Benchmark the exported model per stage and backend.")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def _not_built() -> None:
    """Not built yet."""
    fail("imedsam-bench is not built yet (issue #6)")


def main() -> None:
    run_app(app)
