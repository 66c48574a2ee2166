"""What each worker process serves, published as a small JSON file per worker beside the endpoint state, so the
management API (answered by any one worker) can say whether a change has taken effect everywhere."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from serving.control.private_files import replace_private

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
    worker: str
    pid: int
    revision: int
    heartbeat: float
    memory_bytes: int | None = Field(None, description="the worker process's resident memory (every deployment it "
                                                       "serves, Python and the backends' CPU memory)")
    gpu_memory: list[GpuMemory] = Field(default_factory=list, description="each GPU its deployments run on")
    deployments: dict[str, InstanceStatus]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StatusBoard:
    """`workers/<worker>.json` under the endpoint's folder: written by each worker, read by the management API."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "workers"
        self.folder.mkdir(parents=True, exist_ok=True)

    def publish(self, status: WorkerStatus) -> None:
        path = self.folder / f"{status.worker}.json"
        temporary = path.with_suffix(f".{threading.get_ident()}.tmp")  # threads may publish at once
        replace_private(path, status.model_dump_json(), temporary)

    def withdraw(self, worker: str) -> None:
        (self.folder / f"{worker}.json").unlink(missing_ok=True)

    def live(self) -> list[WorkerStatus]:
        """Workers that published within STALE_S and whose process is still there (files of dead ones are removed)."""
        found = []
        now = time.time()
        for path in sorted(self.folder.glob("*.json")):
            try:
                status = WorkerStatus.model_validate_json(path.read_text())
            except (OSError, ValidationError, json.JSONDecodeError):
                continue
            if not _alive(status.pid):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            if now - status.heartbeat <= STALE_S:
                found.append(status)
        return found
