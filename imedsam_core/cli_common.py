"""Shared CLI plumbing: one-line errors and non-zero exits instead of tracebacks."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import typer

from imedsam_core.errors import UserError

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


def check_threads(threads: int | None) -> None:
    """``--threads`` of the deploy CLIs: None (the runtimes' own count, one per core) or at least 1 (ONNX Runtime
    reads 0 as "its own count" and torch refuses it, so 0 would mean different things to different backends)."""
    if threads is not None and threads < 1:
        raise UserError(f"--threads {threads}: must be at least 1")


def run_app(app: typer.Typer, argv: list[str] | None = None, eager_torch: bool = False) -> Any:
    """Console-script entry: run a Typer app, turning UserError (and Ctrl-C) into one line + exit code.
    ``eager_torch``: the command runs PyTorch on the CPU, so malloc keeps freed memory (``imedsam_core.malloc``)."""
    try:
        if eager_torch:
            from imedsam_core.malloc import keep_freed_memory

            keep_freed_memory()
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


PROGRESS_ENV = "IMEDSAM_PROGRESS_SECONDS"  # seconds between plain progress lines when not on a terminal


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


class Progress:
    """Items done, rate and time left for a long command: a rich bar on a terminal; when piped (a log file, CI),
    one plain line every ~5 s ($IMEDSAM_PROGRESS_SECONDS) or 10 % of the total, and a last one at the end.

    ``echo`` prints a plain line (default: ``say_line`` on ``console``); ``enabled=False`` (--quiet) prints nothing.
    """

    def __init__(self, desc: str, total: int | None, unit: str = "frames", rate_unit: str = "fps",
                 console: Any = None, echo: Callable[[str], None] | None = None, enabled: bool = True) -> None:
        import os
        import time

        from rich.console import Console

        self.desc, self.total, self.unit, self.rate_unit = desc, total, unit, rate_unit
        self.console = console if console is not None else Console(stderr=True)
        self.echo = echo or (lambda msg: say_line(self.console, msg))
        self.enabled = enabled
        try:
            self.every = float(os.environ.get(PROGRESS_ENV, "5"))
        except ValueError:
            self.every = 5.0
        self._clock = time.perf_counter
        self.t0 = self._clock()
        self.done = 0
        self._last_line = self.t0
        self._last_decile = 0
        self._bar: Any = None
        if enabled and self.console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                     console=self.console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(desc, total=total, rate="")

    def set_total(self, total: int | None) -> None:
        """For a command that knows its total only once started."""
        self.total = total
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def rate(self) -> float:
        dt = self._clock() - self.t0
        return self.done / dt if dt > 0 else 0.0

    def status(self) -> str:
        """e.g. ``clip.mp4: 120/884 frames (14%), 11.3 fps, 1m 08s left``."""
        r = self.rate()
        if self.total:
            left = (self.total - self.done) / r if r > 0 else None
            return (f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                    f"{r:.1f} {self.rate_unit}, " + (f"{_duration(left)} left" if left is not None else "time left unknown"))
        return f"{self.desc}: {self.done} {self.unit}, {r:.1f} {self.rate_unit}, {_duration(self._clock() - self.t0)} so far"

    def update(self, done: int, note: str = "") -> None:
        """``note``: shown after the rate on the terminal bar only (e.g. training's loss), not in plain lines."""
        self.done = done
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=done,
                             rate=f"{self.rate():.1f} {self.rate_unit}" + (f"  {note}" if note else ""))
            return
        now = self._clock()
        decile = 10 * done // self.total if self.total else 0
        if now - self._last_line >= self.every or decile > self._last_decile:
            self._last_line, self._last_decile = now, decile
            if not (self.total and done >= self.total):  # the end has its own line
                self.echo(self.status())

    def close(self, line: bool = True) -> None:
        """Stop the bar; when piped, the final line (unless nothing was done, or ``line`` is False: the caller
        prints its own, e.g. training's epoch line)."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        elif line and self.enabled and self.done > 1:  # one image: the command's own closing line says it
            self.echo(f"{self.desc}: {self.done} {self.unit} done, {self.rate():.1f} {self.rate_unit}, "
                      f"{_duration(self._clock() - self.t0)} in all")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
