"""ONNX export with dynamic batch and spatial axes, the ONNX Runtime session, and the ONNX-vs-torch parity check."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from registry.errors import ParityError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17


def export_onnx(model: nn.Module, image_size: int, path: str | Path) -> Path:
    """Export `model` (eval mode, CPU) to ONNX at `path`, with dynamic batch, height and width.

    Uses torch's TorchScript-based exporter: for these CNNs it gives the same graph quality as the dynamo exporter
    in about a twentieth of the time (1 s instead of 15-30 s for mobilenet/efficientnet/resnet50)."""
    model = model.eval().cpu()
    example = torch.randn(2, 3, image_size, image_size)
    quiet = io.StringIO()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch"}},
        )
    return Path(path)


def onnx_providers(device: str = "auto") -> list[str]:
    """Execution providers for `device`: CUDA first when asked for (or `auto` and available), then CPU."""
    available = ort.get_available_providers()
    wants_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if wants_cuda and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(path: str | Path, device: str = "auto", threads: int | None = None,
                 batch_size: int | None = None) -> ort.InferenceSession:
    """An ONNX Runtime session tuned for throughput on `device` (`auto`, `cpu`, `cuda` or `cuda:N`); `batch_size`
    fixes the model's batch dimension (one session per batch size, see serving/runtime/predictors.py).

    Intra-op threads do not spin while they wait for work. On the CUDA provider they have next to no work, and spinning
    only burns the cores that decode and preprocess the images; on the CPU, with torch's OpenMP threads not spinning
    either (serving/__init__.py), a served model takes less CPU per request at the same throughput (bench/README.md)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or max(1, os.cpu_count() or 1)
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if batch_size is not None:
        options.add_free_dimension_override_by_name("batch", batch_size)
    providers: list = onnx_providers(device)
    if providers[0] == "CUDAExecutionProvider" and ":" in device:
        providers[0] = ("CUDAExecutionProvider", {"device_id": int(device.split(":", 1)[1])})
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def parity_max_abs_diff(model: nn.Module, onnx_path: str | Path, image_size: int, batch: int = 4, seed: int = 0) -> float:
    """Largest absolute difference between torch's and ONNX Runtime's logits on random inputs (CPU)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 3, image_size, image_size, generator=generator)
    with torch.inference_mode():
        expected = model.eval().cpu()(inputs).numpy()
    session = make_session(onnx_path, device="cpu")
    actual = session.run([OUTPUT_NAME], {INPUT_NAME: inputs.numpy()})[0]
    return float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64))))


def check_parity(max_abs_diff: float, tolerance: float) -> None:
    """Refuse an export whose outputs differ from torch's by more than `tolerance`."""
    if not np.isfinite(max_abs_diff) or max_abs_diff > tolerance:
        raise ParityError(
            f"ONNX Runtime output differs from torch by {max_abs_diff:.3g} (max abs difference of logits), "
            f"above the tolerance {tolerance:.3g}; the model was not registered"
        )
