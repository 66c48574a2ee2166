"""What each worker process of each host serves, published as one row per worker in the state database beside the
endpoint state, so the management API (answered by any one worker of any host) can say whether a change has taken
effect everywhere."""

from __future__ import annotations

import os
import socket
import time

from pydantic import BaseModel, Field, ValidationError
from sqlalchemy import Engine, delete, insert, select, update
from sqlalchemy.exc import SQLAlchemyError

from serving.control.counters import DeploymentCounters
from serving.control.database import worker_statuses
from serving.control.errors import StateUnavailable
from serving.environment import HOST_ENV

HEARTBEAT_S = 1.0
STALE_S = 5.0


class InstanceStatus(BaseModel):
    """One deployment as a worker serves it: the serving instance, and the next one while it is being readied."""

    generation: int
    state: str
    reason: str | None = None
    model_version: str | None = None
    backend: str | None = Field(None, description="what runs predictions once loaded, e.g. 'onnxruntime "
                                                  "(CUDAExecutionProvider)': the provider ONNX Runtime really chose")
    explain_device: str | None = Field(None, description="the torch device explanations run on")
    shares_model_with: list[str] = Field(default_factory=list, description="the other deployments this worker "
                                         "serves with the same loaded model (one module and session in memory)")
    next_generation: int | None = None
    next_state: str | None = None
    next_reason: str | None = None


class GpuMemory(BaseModel):
    """A GPU that a worker's deployments run on."""

    device: str
    used_bytes: int = Field(description="in use on the whole GPU, by every process on it (each worker's ONNX Runtime "
                                        "sessions and torch, and whatever else runs there)")
    total_bytes: int
    torch_reserved_bytes: int = Field(description="held by this worker's torch allocator (explanations, the torch "
                                                  "backend)")


class WorkerStatus(BaseModel):
    worker: str = Field(description="HOST/PID")
    host: str = Field("", description="the host (one `lantern serve`) the worker belongs to")
    pid: int
    revision: int
    heartbeat: float
    memory_bytes: int | None = Field(None, description="the worker process's resident memory (every deployment it "
                                                       "serves, Python and the backends' CPU memory)")
    gpu_memory: list[GpuMemory] = Field(default_factory=list, description="each GPU its deployments run on")
    deployments: dict[str, InstanceStatus]
    host_counters: dict[str, DeploymentCounters] = Field(
        default_factory=dict, description="its host's counters per deployment (every worker of that host), as this "
                                          "worker read them when it published: other hosts add them up")


def host_id() -> str:
    """This host's name in the shared state: `$LANTERN_HOST_ID` (set by `lantern serve` for its workers), else the
    machine's name."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StatusBoard:
    """The workers' rows of one endpoint: written by each worker every second, read by the management API."""

    def __init__(self, engine: Engine, endpoint: str) -> None:
        self.engine = engine
        self.endpoint = endpoint

    def _where(self, worker: str) -> tuple:
        return worker_statuses.c.endpoint == self.endpoint, worker_statuses.c.worker == worker

    def publish(self, status: WorkerStatus) -> None:
        values = {"host": status.host, "heartbeat": status.heartbeat, "document": status.model_dump_json()}
        try:
            with self.engine.begin() as connection:
                if not connection.execute(update(worker_statuses).where(*self._where(status.worker))
                                          .values(**values)).rowcount:
                    connection.execute(insert(worker_statuses).values(endpoint=self.endpoint,
                                                                      worker=status.worker, **values))
        except SQLAlchemyError as error:
            raise StateUnavailable(f"the worker status could not be published ({type(error).__name__})") from None

    def withdraw(self, worker: str) -> None:
        try:
            with self.engine.begin() as connection:
                connection.execute(delete(worker_statuses).where(*self._where(worker)))
        except SQLAlchemyError:
            pass  # a worker that ends while the database is down: its row goes stale and is left out

    def live(self) -> list[WorkerStatus]:
        """Workers that published within STALE_S (rows of this host's ended processes, and rows stale for a minute,
        are removed)."""
        now, here = time.time(), host_id()
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(select(worker_statuses.c.worker, worker_statuses.c.document)
                                          .where(worker_statuses.c.endpoint == self.endpoint)
                                          .order_by(worker_statuses.c.worker)).all()
        except SQLAlchemyError as error:
            raise StateUnavailable(f"the workers' statuses could not be read ({type(error).__name__})") from None
        found, gone = [], []
        for worker, document in rows:
            try:
                status = WorkerStatus.model_validate_json(document)
            except ValidationError:
                continue
            if (status.host == here and not _alive(status.pid)) or now - status.heartbeat > 60:
                gone.append(worker)
            elif now - status.heartbeat <= STALE_S:
                found.append(status)
        for worker in gone:
            self.withdraw(worker)
        return found
