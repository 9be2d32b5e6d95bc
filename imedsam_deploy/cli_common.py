"""Shared CLI plumbing: one-line errors and non-zero exits instead of tracebacks."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer

from imedsam_deploy.errors import UserError

EXIT_USER_ERROR = 2


def say_line(console: Any, msg: str) -> None:
    """One plain log line on a rich ``Console`` (so it shares the terminal with rich's progress bars): no markup
    (messages carry pip extras like 'imedsam[tensorrt]'), no highlighting, one line however narrow the terminal
    (rich wraps at 80 columns when piped)."""
    console.print(msg, markup=False, highlight=False, soft_wrap=True)


def fail(message: str) -> None:
    """Print ``error: message`` on one line to stderr and exit with EXIT_USER_ERROR."""
    typer.echo(f"error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


def run_app(app: typer.Typer, argv: list[str] | None = None) -> Any:
    """Console-script entry: run a Typer app, turning UserError (and Ctrl-C) into one line + exit code."""
    try:
        return app(args=argv, standalone_mode=True)
    except UserError as e:
        typer.echo(f"error: {' '.join(str(e).split())}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for Typer commands: UserError -> one-line error + exit 2, Ctrl-C -> "interrupted" + exit 130
    (also under CliRunner). Typer turns a KeyboardInterrupt that leaves a command into a silent exit 130, so the
    line is printed here, inside the command."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            fail(str(e))
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


def require(module: str, extra: str) -> Any:
    """Import an optional dependency or fail with the pip command that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{module} is not installed: pip install 'imedsam[{extra}]'") from None
