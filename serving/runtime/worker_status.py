"""What one worker reports on the workers' status board: each deployment's state in it (and its next generation's),
the backend and device it runs on, the models it shares, the worker's memory and its GPUs' memory."""

from __future__ import annotations

import logging
import os
import time

import psutil
import torch

from registry.devices import cuda_memory
from serving.control.counters import deployment_counters
from serving.control.workers import GpuMemory, InstanceStatus, WorkerStatus
from serving.runtime.instance import DeploymentInstance

logger = logging.getLogger("lantern.serving")


class StatusReporter:
    """Takes a worker's status; remembers that reading the GPUs' memory failed, to log it once."""

    def __init__(self, worker: str, host: str, publishes_counters: bool) -> None:
        self.worker = worker
        self.host = host
        # its host's counters, for the other hosts' views: only where other hosts share the state (reading every
        # worker's metric files each second is not free, and one host's views read its own counters directly)
        self.publishes_counters = publishes_counters
        self._process = psutil.Process()
        self._gpu_memory_failed = False

    def status(self, revision: int, instances: dict[str, DeploymentInstance],
               next_instances: dict[str, DeploymentInstance]) -> WorkerStatus:
        """The status of a worker serving `instances` (readying `next_instances`) at state `revision`."""
        deployments = {}
        users: dict[int, list[str]] = {}  # a loaded model -> the serving deployments that share it
        for name, instance in instances.items():
            if instance.deployment.core is not None:
                users.setdefault(id(instance.deployment.core), []).append(name)
        for name, instance in instances.items():
            upcoming = next_instances.get(name)
            deployment = instance.deployment
            model = deployment.model
            deployments[name] = InstanceStatus(
                generation=instance.generation, state=deployment.state, reason=deployment.reason,
                model_version=deployment.model_version,
                backend=model.predictor.description if model else None,
                explain_device=str(model.explain_device) if model else None,
                shares_model_with=[other for other in users.get(id(deployment.core), []) if other != name],
                next_generation=upcoming.generation if upcoming else None,
                next_state=upcoming.deployment.state if upcoming else None,
                next_reason=upcoming.deployment.reason if upcoming else None)
        return WorkerStatus(worker=self.worker, host=self.host, pid=os.getpid(), revision=revision,
                            heartbeat=time.time(), memory_bytes=self._process.memory_info().rss,
                            gpu_memory=self.gpu_memory([*instances.values(), *next_instances.values()]),
                            deployments=deployments,
                            host_counters=deployment_counters() if self.publishes_counters else {})

    def gpu_memory(self, instances: list[DeploymentInstance]) -> list[GpuMemory]:
        """Each GPU a loaded instance runs on, and how full it is."""
        devices = set()
        for instance in instances:
            model = instance.deployment.model  # read once: an unload may clear it meanwhile
            device = model.explain_device if model is not None else None
            if device is not None and device.type == "cuda":
                devices.add(device.index if device.index is not None else torch.cuda.current_device())
        gpus = []
        try:
            for index in sorted(devices):
                used, total, torch_reserved = cuda_memory(torch.device("cuda", index))
                gpus.append(GpuMemory(device=f"cuda:{index}", used_bytes=used, total_bytes=total,
                                      torch_reserved_bytes=torch_reserved))
            return gpus
        except Exception:  # noqa: BLE001 - the status (the heartbeat) is published without it
            if not self._gpu_memory_failed:
                logger.exception("reading the GPU's memory failed; the worker's status goes on without it")
                self._gpu_memory_failed = True
            return []
