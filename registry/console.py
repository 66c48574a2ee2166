"""Terminal output shared by every package's CLI group: a rich console, step progress, and error reporting (here, beside
Lantern's errors, where every package may import it)."""

from __future__ import annotations

import contextlib
import functools
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import click
from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)  # log lines stay whole in files
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 200)  # pipes get whole tables


class StepProgress:
    """Shows each slow step with a spinner, then a tick and its duration."""

    @contextlib.contextmanager
    def step(self, description: str) -> Iterator[None]:
        start = time.perf_counter()
        with console.status(f"{description} ..."):
            yield
        console.print(f"[green]✓[/green] {description} [dim]({time.perf_counter() - start:.1f}s)[/dim]")


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Report Lantern's user-facing errors as a clean message and exit status 2, without a traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from registry.errors import LanternError

        try:
            return func(*args, **kwargs)
        except Exception as error:
            mlflow_exceptions = sys.modules.get("mlflow.exceptions")  # only when the command used MLflow
            mlflow_error = mlflow_exceptions is not None and isinstance(error, mlflow_exceptions.MlflowException)
            if not (isinstance(error, LanternError) or mlflow_error):
                raise
            console.print(f"[red]Error:[/red] {error}")
            raise click.exceptions.Exit(2) from None

    return wrapper
