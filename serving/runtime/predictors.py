"""The prediction backends of a deployment: an ONNX Runtime session, or the torch module itself; for a detector,
either of them run on lists of images of any size."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from explain.cpu_threads import limit_this_thread
from registry.detection_answers import RawDetections
from registry.detection_inference import Detector, torch_detections
from registry.detector_onnx import onnx_detector
from registry.errors import LanternError
from registry.onnx_export import INPUT_NAME, OUTPUT_NAME, make_session
from serving.config import WORKERS_ENV


class Predictor(Protocol):
    """Logits [N, classes] for a normalised float32 batch [N, 3, H, W]; `buckets`: the batch sizes it runs (a batch
    is padded up to the next one), or None for any size. A detector's answers one RawDetections per image of a list
    of uint8 [3, H, W] images."""

    device: str
    description: str
    buckets: tuple[int, ...] | None
    thread: OwnThread

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        """The logits of a float32 batch, run on the calling thread: only the predictor's own thread calls it."""
        ...

    def submit(self, rows: Sequence[np.ndarray]) -> Future:
        """The answers for `rows` (one per image), computed on the predictor's own thread."""
        ...


def shape_buckets(device: torch.device, backend: str, max_batch_size: int) -> tuple[int, ...] | None:
    """The batch sizes an ONNX Runtime deployment on a GPU runs, each in a session of its own: the powers of two below
    `max_batch_size`, and `max_batch_size`. None elsewhere (the CPU, and torch, whose cuDNN benchmark mode is off,
    take any size at the same speed).

    The CUDA provider prepares every convolution for the input shape it last saw: when the shape changes, it builds
    cuDNN's execution plans again (with the default exhaustive search, timing the candidates), and it keeps no plans
    for earlier shapes. Adaptive batches change size from one call to the next, so each call could pay that. Padded
    to a few sizes, with one session per size, each session only ever sees one shape: the warm-up builds every plan
    before the deployment is ready, and a live call never builds one. The price is the weights once per session in
    GPU memory (resnet50: about 100 MB each, 6 sessions for max_batch_size 32)."""
    if device.type != "cuda" or backend != "onnxruntime":
        return None
    sizes = [1]
    while sizes[-1] * 2 < max_batch_size:
        sizes.append(sizes[-1] * 2)
    return tuple(sorted({*sizes, max_batch_size}))


def padded_size(buckets: tuple[int, ...] | None, count: int) -> int:
    """The batch size `count` images run as: the smallest bucket that holds them (or `count` itself)."""
    return next((size for size in buckets or () if size >= count), count)


def stacked(rows: Sequence[np.ndarray] | np.ndarray, size: int) -> np.ndarray:
    """`rows` ([3, H, W] each) as one float32 batch of `size` images, padded with zero images, in one copy."""
    batch = np.zeros((size, *rows[0].shape), dtype=np.float32)
    np.stack(rows, out=batch[:len(rows)])
    return batch


def submit_rows(predictor: Predictor, rows: Sequence[np.ndarray]) -> Future[np.ndarray]:
    """The logits of `rows` ([3, H, W] each), stacked into one batch padded up to the predictor's bucket, on the
    predictor's own thread: one hop from the event loop, and the stacking off it (a batch of 32 images at 224 px
    copies 19 MB)."""
    size = padded_size(predictor.buckets, len(rows))
    return predictor.thread.submit(lambda: predictor.run_batch(stacked(rows, size))[:len(rows)])


T = TypeVar("T")
MAX_CPU_LANES = 4  # lanes a CPU detector runs a list on at once (an ONNX session each holds the weights: memory)


class OwnThread:
    """One thread of a predictor's own, that runs all its work: the warm-up, every batch and the probes.

    ONNX Runtime's CUDA provider creates a cuBLAS and a cuDNN handle for every thread that runs a session (torch's CUDA
    handles are per thread too): with one thread, the handles the warm-up created serve every batch, rather than each
    thread of the server's pool making its own. Served batches come here straight from the event loop
    (`submit_rows`), with no pool thread in between."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"predict-{name}")
        self.last_answer = 0.0  # time.monotonic() when a call last returned (probes: busy is not stuck)
        self.helpers: list[ThreadPoolExecutor] = []  # threads its work fans out to (a CPU detector's lanes)

    def submit(self, work: Callable[..., T], *args: object) -> Future[T]:
        return self._executor.submit(self._answered, work, *args)

    def run(self, work: Callable[..., T], *args: object) -> T:
        return self.submit(work, *args).result()

    def close(self) -> None:
        """Finish the call under way and end the thread (and its helpers'); it takes no more work."""
        self._executor.shutdown(wait=True)
        for helper in self.helpers:
            helper.shutdown(wait=True)

    def _answered(self, work: Callable[..., T], *args: object) -> T:
        result = work(*args)
        self.last_answer = time.monotonic()
        return result


class OnnxPredictor:
    """ONNX Runtime with the CUDA provider first when the deployment's device is a GPU, tuned for throughput; with
    `buckets`, one session per batch size, each with its batch dimension fixed (see `shape_buckets`)."""

    def __init__(self, onnx_path: Path, device: torch.device, threads: int | None = None,
                 buckets: tuple[int, ...] | None = None) -> None:
        self.buckets = tuple(sorted(buckets)) if buckets else None
        name = "cuda" if device.type == "cuda" and device.index is None else str(device)
        threads = threads or _cpu_threads()
        self.sessions: dict[int | None, ort.InferenceSession] = {
            size: make_session(onnx_path, device=name, threads=threads, batch_size=size)
            for size in self.buckets or (None,)}
        self.providers = next(iter(self.sessions.values())).get_providers()
        if device.type == "cuda" and self.providers[0] != "CUDAExecutionProvider":  # ORT falls back without a word
            raise LanternError(f"ONNX Runtime could not run on {device}: its CUDAExecutionProvider did not load "
                               f"(it offers {', '.join(ort.get_available_providers())}); serve this deployment with "
                               f"device: cpu, or backend: torch")
        self.device = "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"
        self.description = f"onnxruntime ({self.providers[0]})"
        self.thread = OwnThread(f"onnx-{self.device}")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.thread.run(self.run_batch, np.ascontiguousarray(batch, dtype=np.float32))

    def submit(self, rows: Sequence[np.ndarray]) -> Future[np.ndarray]:
        return submit_rows(self, rows)

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        if self.buckets is None:
            return self.sessions[None].run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        largest = self.buckets[-1]
        if len(batch) > largest:  # not from the dispatcher (it never batches more than the largest bucket)
            return np.concatenate([self.run_batch(batch[start:start + largest])
                                   for start in range(0, len(batch), largest)])
        size = padded_size(self.buckets, len(batch))  # submit_rows has padded already: only direct calls pad here
        padded = batch if size == len(batch) else stacked(batch, size)
        return self.sessions[size].run([OUTPUT_NAME], {INPUT_NAME: padded})[0][:len(batch)]


class TorchPredictor:
    """The registered nn.Module itself; a private copy, so explanations' hooks on the shared module never touch it."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module = copy.deepcopy(module).to(device).eval()
        self.torch_device = device
        self.device = str(device)
        self.description = f"torch ({device})"
        self.buckets: tuple[int, ...] | None = None
        self.thread = OwnThread(f"torch-{self.device}")

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.thread.run(self.run_batch, np.ascontiguousarray(batch, dtype=np.float32))

    def submit(self, rows: Sequence[np.ndarray]) -> Future[np.ndarray]:
        return submit_rows(self, rows)

    def run_batch(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(batch).to(self.torch_device))
        return logits.float().cpu().numpy()


class DetectorPredictor:
    """A detector with the deployment's settings, on lists of uint8 [3, H, W] images of any size: torch's module
    takes a list in one call (it resizes and pads the images into one batch itself), the ONNX export one image a run;
    on the CPU a list is shared out among lanes (CpuLanes), whose threads end with the predictor's own."""

    buckets: tuple[int, ...] | None = None

    def __init__(self, run: Callable[[list[torch.Tensor]], list[RawDetections]], device: str,
                 description: str) -> None:
        self.run = run  # uint8 images -> their detections
        self.device = device
        self.description = description
        self.thread = OwnThread(f"detector-{device}")

    @classmethod
    def _in_lanes(cls, lanes: CpuLanes) -> "DetectorPredictor":
        predictor = cls(lanes.run, "cpu", lanes.description)
        if lanes.pool is not None:
            predictor.thread.helpers.append(lanes.pool)
        return predictor

    @classmethod
    def torch(cls, module: nn.Module, device: torch.device, threads: int | None = None) -> "DetectorPredictor":
        """The module on a list in one call (it resizes and pads the images into one batch itself): on a GPU; on
        the CPU in lanes (see CpuLanes)."""
        model = module.eval().to(device)
        if device.type != "cuda":
            return cls._in_lanes(CpuLanes.torch(model, threads or _cpu_threads()))

        def run(images: list[torch.Tensor]) -> list[RawDetections]:  # made float on the device: a quarter the copy
            return torch_detections(model, [image.to(device).float().div_(255.0) for image in images], device)

        return cls(run, str(device), f"torch ({device})")

    @classmethod
    def onnx(cls, path: Path, device: torch.device, threads: int | None = None) -> "DetectorPredictor":
        """The export run one image a run: on a GPU by one session; on the CPU a lone image by a session on every
        core, and a list by up to MAX_CPU_LANES sessions at once, each on its share of the cores (see CpuLanes)."""
        if device.type == "cuda":
            name = "cuda" if device.index is None else str(device)
            detector = onnx_detector(path, name)
            return cls(lambda images: [detector(image.float().div_(255.0)) for image in images], "cuda",
                       "onnxruntime (CUDAExecutionProvider)")
        return cls._in_lanes(CpuLanes.onnx(path, threads or _cpu_threads()))

    def __call__(self, images: Sequence[np.ndarray]) -> list[RawDetections]:
        return self.thread.run(self.run_batch, images)

    def submit(self, rows: Sequence[np.ndarray]) -> Future[list[RawDetections]]:
        return self.thread.submit(self.run_batch, list(rows))

    def run_batch(self, images: Sequence[np.ndarray]) -> list[RawDetections]:
        return self.run([torch.from_numpy(image) for image in images])


ListRun = Callable[[list[torch.Tensor]], list[RawDetections]]  # float [3, H, W] images in [0, 1] -> detections


class CpuLanes:
    """A detector on the CPU, where one image is many small operators whose threads wait on each other at every
    one of them: a list of images is shared out among up to MAX_CPU_LANES lanes that run at once, each on its share
    of the cores; a lone image runs on every core (the lowest latency). A 128 px detector on 2 cores, images/s:
    ONNX Runtime, one session of 2 threads 95, of 1 thread 69, two of 1 at once 137; torch, a list of 8 on 2 threads
    110, two lists of 4 on 1 thread each at once 149."""

    def __init__(self, lone: ListRun, lanes: list[ListRun], cores: int, backend: str) -> None:
        self.lone = lone
        self.lanes = lanes
        threads = self.threads(cores, len(lanes))
        self.pool = ThreadPoolExecutor(len(lanes), thread_name_prefix="detector-lane", initializer=limit_this_thread,
                                       initargs=(threads,)) if len(lanes) > 1 else None
        self.description = (f"{backend}; {len(lanes)} lanes of {threads} thread(s), a lone image on {cores}"
                            if self.pool else backend)

    @staticmethod
    def count(cores: int) -> int:
        return max(1, min(cores, MAX_CPU_LANES))

    @staticmethod
    def threads(cores: int, lanes: int) -> int:
        """Each lane's share of the cores."""
        return max(1, cores // lanes)

    @classmethod
    def onnx(cls, path: Path, cores: int) -> CpuLanes:
        """The export (its graph takes one image) in a session per lane, and one of every core for a lone image."""
        lanes = cls.count(cores)
        sessions = [onnx_detector(path, "cpu", cls.threads(cores, lanes)) for _ in range(lanes)] if lanes > 1 else []
        lone = onnx_detector(path, "cpu", cores)

        def each(detector: Detector) -> ListRun:
            return lambda images: [detector(image) for image in images]

        return cls(each(lone), [each(session) for session in sessions] or [each(lone)], cores,
                   "onnxruntime (CPUExecutionProvider)")

    @classmethod
    def torch(cls, model: nn.Module, cores: int) -> CpuLanes:
        """The module (shared: inference keeps no state in it) on a list a lane, one call each."""
        def run(images: list[torch.Tensor]) -> list[RawDetections]:
            return torch_detections(model, images, "cpu")

        return cls(run, [run] * cls.count(cores), cores, "torch (cpu)")

    def run(self, images: Sequence[torch.Tensor]) -> list[RawDetections]:
        """Each uint8 [3, H, W] image's detections, in order."""
        floats = [image.float().div_(255.0) for image in images]
        if len(floats) == 1 or self.pool is None:
            return self.lone(floats)
        count = len(self.lanes)
        parts = list(self.pool.map(lambda number: self.lanes[number](floats[number::count]),
                                   range(min(count, len(floats)))))
        return [parts[index % count][index // count] for index in range(len(floats))]


def _cpu_threads() -> int:
    """ONNX Runtime threads on the CPU: the cores this process may use, shared out among the service's workers."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, int(os.environ.get(WORKERS_ENV, "1")))
    return max(1, cores // workers)
