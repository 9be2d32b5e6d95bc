"""``imedsam-infer``: Segment images, videos and CT volumes with an exported artifact."""

from __future__ import annotations

import typer

from imedsam_deploy.cli_common import fail, run_app

app = typer.Typer(add_completion=False, help="Segment images, videos and CT volumes with an exported artifact.")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def _not_built() -> None:
    """Not built yet."""
    fail("imedsam-infer is not built yet (issue #5)")


def main() -> None:
    run_app(app)
