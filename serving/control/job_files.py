"""Large explanation-job results in the registry's artifact store: an image's explanations (PNGs and attributions)
over `limits.job_inline_result_bytes` are kept as files under the `lantern` experiment's artifact location
(`explanation-jobs/<endpoint>/<job>/<image>/<rank>.png|.npy`), and the state database only names them. Beside the
embedded SQLite registry that is local disk; with an MLflow server it is its proxied artifact store, which every host
reaches through it, so any replica answers for any job."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from serving.control.errors import StateUnavailable

if TYPE_CHECKING:  # MLflow is imported when a job first keeps or reads files
    from mlflow.store.artifact.artifact_repo import ArtifactRepository

FOLDER = "explanation-jobs"
T = TypeVar("T")


class JobFiles:
    """The artifact folder of one endpoint's job results."""

    def __init__(self, endpoint: str, tracking_uri: str | None = None) -> None:
        self.endpoint = endpoint
        self.tracking_uri = tracking_uri
        self._root: str | None = None  # the artifact folder, found on first use
        self._registry: str | None = None
        self._lock = threading.Lock()

    def _repository(self) -> ArtifactRepository:
        from mlflow.exceptions import MlflowException
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        from registry.store import experiment_id, open_client

        with self._lock:
            if self._root is None:
                try:
                    client = open_client(self.tracking_uri)
                    location = client.get_experiment(experiment_id(client)).artifact_location
                except (MlflowException, OSError) as error:
                    raise StateUnavailable(f"the registry does not answer ({error})") from None
                self._root = f"{location.rstrip('/')}/{FOLDER}/{self.endpoint}"
                self._registry = client.tracking_uri
        return get_artifact_repository(self._root, tracking_uri=self._registry)

    @staticmethod
    def location(job_id: str, position: int) -> str:
        return f"{job_id}/{position}"

    def put(self, job_id: str, position: int, files: dict[str, bytes]) -> str:
        """Keep one image's files (name -> bytes); answers where they are."""
        where = self.location(job_id, position)
        with tempfile.TemporaryDirectory(prefix="lantern-job-") as folder:
            for name, data in files.items():
                (Path(folder) / name).write_bytes(data)
            self._call(lambda repository: repository.log_artifacts(folder, where))
        return where

    def get(self, location: str) -> dict[str, bytes]:
        """One image's files, as `put` kept them."""
        with tempfile.TemporaryDirectory(prefix="lantern-job-") as folder:
            root = Path(self._call(lambda repository: repository.download_artifacts(location, folder)))
            return {path.name: path.read_bytes() for path in root.iterdir() if path.is_file()}

    def delete(self, job_id: str) -> None:
        """Every file of a job (nothing happens when it has none)."""
        self._call(lambda repository: repository.delete_artifacts(job_id), missing_ok=True)

    def _call(self, action: Callable[[ArtifactRepository], T], missing_ok: bool = False) -> T | None:
        from mlflow.exceptions import MlflowException

        try:
            return action(self._repository())
        except (MlflowException, OSError) as error:  # (requests' errors are OSErrors)
            if missing_ok and ("404" in str(error) or "not found" in str(error).lower()):
                return None
            said = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
            raise StateUnavailable(f"the artifact store of endpoint {self.endpoint}'s explanation-job results does "
                                   f"not answer ({said})") from None
