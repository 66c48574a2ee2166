"""The prediction backends of a deployment: an ONNX Runtime session, or the torch module itself."""

from __future__ import annotations

import copy
import os
import threading
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from registry.errors import LanternError
from registry.onnx_export import INPUT_NAME, OUTPUT_NAME, make_session


class Predictor(Protocol):
    """Logits [N, classes] for a normalised float32 batch [N, 3, H, W]."""

    device: str
    description: str

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class OnnxPredictor:
    """ONNX Runtime with the CUDA provider first when the deployment's device is a GPU, tuned for throughput."""

    def __init__(self, onnx_path: Path, device: torch.device, threads: int | None = None) -> None:
        name = "cuda" if device.type == "cuda" and device.index is None else str(device)
        self.session = make_session(onnx_path, device=name, threads=threads or _cpu_threads())
        self.providers = self.session.get_providers()
        if device.type == "cuda" and self.providers[0] != "CUDAExecutionProvider":  # ORT falls back without a word
            raise LanternError(f"ONNX Runtime could not run on {device}: its CUDAExecutionProvider did not load "
                               f"(it offers {', '.join(ort.get_available_providers())}); serve this deployment with "
                               f"device: cpu, or backend: torch")
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.description = f"onnxruntime ({self.providers[0]})"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)})[0]


class TorchPredictor:
    """The registered nn.Module itself; a private copy, so explanations' hooks on the shared module never touch it."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module = copy.deepcopy(module).to(device).eval()
        self.torch_device = device
        self.device = str(device)
        self.description = f"torch ({device})"
        self._lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self._lock, torch.inference_mode():
            logits = self.module(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.torch_device))
        return logits.float().cpu().numpy()


def _cpu_threads() -> int:
    """ONNX Runtime threads on the CPU: the cores this process may use, shared out among the service's workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, int(os.environ.get("LANTERN_WORKERS", "1")))
    return max(1, cores // workers)
