"""Terminal output shared by the CLI groups: a rich console, step progress, and error reporting."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import click
from rich.console import Console

console = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)


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
        from mlflow.exceptions import MlflowException

        from registry.errors import LanternError

        try:
            return func(*args, **kwargs)
        except (LanternError, MlflowException) as error:
            console.print(f"[red]Error:[/red] {error}")
            raise click.exceptions.Exit(2) from None

    return wrapper
