"""``imedsam-eval``: Evaluate a checkpoint (Dice, IoU, HD95) beside box baselines."""

from __future__ import annotations

import typer

from imedsam_deploy.cli_common import fail, run_app

app = typer.Typer(add_completion=False, help="Evaluate a checkpoint (Dice, IoU, HD95) beside box baselines.")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def _not_built() -> None:
    """Not built yet."""
    fail("imedsam-eval is not built yet (issue #3)")


def main() -> None:
    run_app(app)
