"""Device names as users write them (`auto`, `cpu`, `cuda`, `cuda:N`) turned into torch devices.

torch is imported where a device is made, not with the module: configuration checks (the endpoint file's `device`
fields, in every process `lantern serve` starts) need only the pattern."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from registry.errors import LanternError

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = re.compile(r"(auto|cpu|cuda(:[0-9]+)?)")


def torch_device(name: str = "auto") -> torch.device:
    """`auto` is the first GPU when CUDA is available, else the CPU; asking for a missing GPU is an error."""
    import torch

    if not DEVICE_PATTERN.fullmatch(name):
        raise LanternError(f"unknown device {name!r}; accepted: auto, cpu, cuda, cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LanternError(f"device {name!r} asked for, but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LanternError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def device_key(name: str) -> str:
    """The device `name` runs on, spelled one way (on a GPU machine `auto`, `cuda` and `cuda:0` are all `cuda:0`), so
    deployments on one device share its batch slot; a device this machine lacks keeps its name (it fails to load)."""
    import torch

    try:
        device = torch_device(name)
    except LanternError:
        return name
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def cuda_memory(device: torch.device) -> tuple[int, int, int]:
    """On the GPU `device`: the bytes in use by every process on it, its total bytes, and the bytes this process's torch
    allocator holds (ONNX Runtime's arenas are outside it, and outside any per-process figure torch has)."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return total - free, total, torch.cuda.memory_reserved(device)
