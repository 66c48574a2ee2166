"""The small model the tests register (its labels and settings), the project's folders, the installed `lantern`
command, and the environment with its own store or without one."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import click.testing
import pytest

LABELS = ["circle", "square", "triangle"]
SMALL_SETTINGS = {"valid_resize_size": 40, "valid_crop_size": 32}
MINUTE_ITERATIONS = 1000  # about a minute of training on a 2-core CPU
TESTS_DIR = Path(__file__).resolve().parents[1]
PROJECT_ROOT = TESTS_DIR.parent


def lantern_executable() -> str:
    """The `lantern` console script installed beside this interpreter."""
    return str(Path(sys.executable).with_name("lantern"))


def lantern_here(*args: str, exit_code: int = 0) -> click.testing.Result:
    """`lantern ARGS` run in this process by click's test runner (stdout and stderr apart): for a test's many short
    commands, each of which would spend seconds importing MLflow in a process of its own. The tests that run the
    installed command in a subprocess cover the process itself (console script, exit status, environment)."""
    from lantern.cli import main

    result = click.testing.CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == exit_code, f"lantern {' '.join(args)}: exit {result.exit_code}\n{result.stderr[-3000:]}"
    return result


def env_without_store() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LANTERN_HOME")}


@contextlib.contextmanager
def own_store(folder: Path) -> Iterator[str]:
    """A fresh SQLite MLflow store and Lantern home under `folder` while the block runs; yields the tracking URI."""
    home = folder / "lantern-home"
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LANTERN_HOME", str(home))
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri
