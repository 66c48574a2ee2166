"""Where the MLflow registry lives: tracking URI, the Lantern home folder, the client, the experiment."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

if TYPE_CHECKING:  # MLflow is imported where a client is made: finding the home folder or the URI needs none
    from mlflow.tracking import MlflowClient

EXPERIMENT_NAME = "lantern"
LOCK_TIMEOUT_S = 300
_LOCKS: dict[str, FileLock] = {}


def lantern_home() -> Path:
    """The folder for Lantern's local state: `$LANTERN_HOME`, else `.lantern` in the current directory."""
    return Path(os.environ.get("LANTERN_HOME") or Path.cwd() / ".lantern").resolve()


def tracking_uri(explicit: str | None = None) -> str:
    """`explicit`, else `$MLFLOW_TRACKING_URI`, else a SQLite database in the Lantern home folder."""
    uri = explicit or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = lantern_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def artifact_root(uri: str) -> str | None:
    """Where new experiments keep artifacts: `$LANTERN_ARTIFACT_ROOT`, else the tracking server's own choice (for an
    http(s) store: its proxied artifacts, `mlflow-artifacts:/`, that every host reaches through it), else beside a
    SQLite database, else home."""
    if os.environ.get("LANTERN_ARTIFACT_ROOT"):
        return os.environ["LANTERN_ARTIFACT_ROOT"]
    if uri.startswith(("http://", "https://")):
        return None
    db = sqlite_path(uri)
    base = db.parent if db else lantern_home()
    return (base / "artifacts").as_uri()


def sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///` URI, else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def write_lock(uri: str) -> Iterator[None]:
    """Serialise writers across processes on a SQLite store (SQLite allows one writer); a no-op elsewhere."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    path = str(db) + ".lock"
    lock = _LOCKS.setdefault(path, FileLock(path, timeout=LOCK_TIMEOUT_S))  # one object per path: re-entrant
    with lock:
        yield


def open_client(explicit_uri: str | None = None) -> MlflowClient:
    """A client for the tracking and registry store, which is created (and migrated) once, under the lock."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(explicit_uri)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with write_lock(uri):  # the client creates and migrates a new database: one process at a time
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    return client


def experiment_id(client: MlflowClient) -> str:
    """The id of the `lantern` experiment, created with its artifact root on first use."""
    from mlflow.exceptions import MlflowException

    uri = client.tracking_uri
    existing = client.get_experiment_by_name(EXPERIMENT_NAME)
    if existing is not None:
        return existing.experiment_id
    with write_lock(uri):
        existing = client.get_experiment_by_name(EXPERIMENT_NAME)
        if existing is not None:
            return existing.experiment_id
        try:
            return client.create_experiment(EXPERIMENT_NAME, artifact_location=artifact_root(uri))
        except MlflowException:
            found = client.get_experiment_by_name(EXPERIMENT_NAME)
            if found is None:
                raise
            return found.experiment_id
