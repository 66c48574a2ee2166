"""The small model the tests register (its labels and settings), the project's folders, the installed `lantern`
command, and the environment with its own store or without one."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
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


_empty_store: Path | None = None


def new_mlflow_store(home: Path) -> str:
    """An empty SQLite MLflow store at `home`/mlflow.db, and its tracking URI: a copy of one this process made once
    (MLflow creates and migrates each new store for seconds; the copy is the same database, every table at MLflow's
    head revision). A test about making a store deletes the file first."""
    global _empty_store
    if _empty_store is None:
        from mlflow.tracking import MlflowClient

        made = Path(tempfile.mkdtemp(prefix="lantern-empty-store-")) / "mlflow.db"
        uri = f"sqlite:///{made}"
        MlflowClient(tracking_uri=uri, registry_uri=uri).search_experiments(max_results=1)  # made and migrated
        atexit.register(shutil.rmtree, made.parent, True)
        _empty_store = made
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_empty_store, home / "mlflow.db")
    return f"sqlite:///{home / 'mlflow.db'}"


@contextlib.contextmanager
def own_store(folder: Path) -> Iterator[str]:
    """A fresh SQLite MLflow store and Lantern home under `folder` while the block runs; yields the tracking URI."""
    home = folder / "lantern-home"
    uri = new_mlflow_store(home)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LANTERN_HOME", str(home))
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        yield uri
