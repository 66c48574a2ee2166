"""The prediction backends: GPU batch-size buckets, padded batches answering exactly as unpadded ones, and a CPU
detector's lanes answering a list as one session does, in order."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from registry.onnx_export import export_onnx
from registry.small_cnn import SmallCNN
from serving.runtime.predictors import (
    CpuLanes,
    DetectorPredictor,
    OnnxPredictor,
    TorchPredictor,
    padded_size,
    shape_buckets,
    submit_rows,
)


@pytest.mark.parametrize(("device", "backend", "max_batch_size", "expected"), [
    ("cuda", "onnxruntime", 32, (1, 2, 4, 8, 16, 32)),
    ("cuda:1", "onnxruntime", 24, (1, 2, 4, 8, 16, 24)),
    ("cuda", "onnxruntime", 2, (1, 2)),
    ("cuda", "onnxruntime", 1, (1,)),
    ("cuda", "torch", 32, None),
    ("cpu", "onnxruntime", 32, None),
])
def test_only_onnx_runtime_on_a_gpu_runs_batch_size_buckets(device: str, backend: str, max_batch_size: int,
                                                             expected: tuple[int, ...] | None) -> None:
    assert shape_buckets(torch.device(device), backend, max_batch_size) == expected


def test_a_batch_is_padded_to_the_smallest_bucket_that_holds_it() -> None:
    buckets = (1, 2, 4, 8, 12)
    assert [padded_size(buckets, n) for n in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]
    assert padded_size(buckets, 20) == 20  # more than the largest bucket (not from the dispatcher): as it is
    assert padded_size(None, 7) == 7


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> tuple[SmallCNN, Path]:
    torch.manual_seed(0)
    model = SmallCNN(4).eval()
    return model, export_onnx(model, 32, tmp_path_factory.mktemp("onnx") / "model.onnx")


def test_padded_batches_answer_like_unpadded_ones(onnx_path: tuple[SmallCNN, Path]) -> None:
    """The buckets are used on a GPU only, but padding is the same code on the CPU: rows keep their own logits."""
    model, path = onnx_path
    rows = [np.random.default_rng(i).standard_normal((3, 32, 32)).astype(np.float32) for i in range(5)]
    padded = OnnxPredictor(path, torch.device("cpu"), threads=1, buckets=(1, 2, 4, 8))
    plain = OnnxPredictor(path, torch.device("cpu"), threads=1)
    logits = submit_rows(padded, rows).result()
    assert logits.shape == (5, 4)
    np.testing.assert_allclose(logits, submit_rows(plain, rows).result(), atol=1e-5)
    for row, expected in zip(rows, logits):
        np.testing.assert_allclose(submit_rows(plain, [row]).result()[0], expected, atol=1e-5)
    with torch.inference_mode():
        np.testing.assert_allclose(logits, model(torch.from_numpy(np.stack(rows))).numpy(), atol=1e-4)
    assert TorchPredictor(model, torch.device("cpu")).buckets is None


def test_each_bucket_runs_in_a_session_of_its_own_with_its_batch_size_fixed(onnx_path: tuple[SmallCNN, Path]) -> None:
    """ONNX Runtime's CUDA provider rebuilds its convolution plans whenever a session's input shape changes, so each
    bucket gets its own session (the same code on the CPU, where it is tested), which only ever sees one shape; any
    batch is padded up to a bucket, or split when larger than the largest."""
    model, path = onnx_path
    predictor = OnnxPredictor(path, torch.device("cpu"), threads=1, buckets=(4, 1, 2))
    assert predictor.buckets == (1, 2, 4) and sorted(predictor.sessions) == [1, 2, 4]
    for size, session in predictor.sessions.items():
        assert session.get_inputs()[0].shape[0] == size
    plain = OnnxPredictor(path, torch.device("cpu"), threads=1)
    assert list(plain.sessions) == [None] and plain.sessions[None].get_inputs()[0].shape[0] == "batch"
    batch = np.random.default_rng(0).standard_normal((11, 3, 32, 32)).astype(np.float32)
    for count in (1, 3, 4, 11):  # padded to 1, 4, 4; 11 runs as 4 + 4 + 3 (padded to 4)
        np.testing.assert_allclose(predictor(batch[:count]), plain(batch[:count]), atol=1e-5)


def test_running_out_of_device_memory_is_a_503_to_retry_not_the_inputs_fault() -> None:
    """torch's OutOfMemoryError, and ONNX Runtime's arena or cudaMalloc failures (RuntimeExceptions in its words),
    answer 503 `out_of_memory` with Retry-After; any other failure stays the input's 424."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, RuntimeException

    from serving.http.errors import api_error
    from serving.runtime.errors import model_failure

    arena = RuntimeException("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
                             "Conv node. Status Message: bfc_arena.cc:376 onnxruntime::BFCArena::AllocateRawInternal "
                             "Failed to allocate memory for requested buffer of size 285081600")
    for error in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), arena,
                  Fail("CUDA failure 2: out of memory ; GPU=0"), RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"),
                  RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported")):
        answer = api_error(model_failure("blue", error))
        assert (answer.status, answer.code, answer.headers) == (503, "out_of_memory", {"Retry-After": "1"}), error
        assert "blue ran out of device memory" in answer.message
    for error in (RuntimeError("out of memory"),  # neither CUDA's nor ONNX Runtime's: no telling what it means
                  RuntimeException("Non-zero status code returned while running Reshape node: invalid shape")):
        answer = api_error(model_failure("blue", error))
        assert (answer.status, answer.code) == (424, "model_error")
        assert str(error) in answer.message


def test_a_predictor_runs_every_batch_on_one_thread_of_its_own(onnx_path: tuple[SmallCNN, Path]) -> None:
    """Batches come from whichever server thread is free; the backend sees one thread (CUDA handles are per thread:
    a new one cost each new pool thread ~300 ms on a GPU). Answers stay each caller's own."""
    from concurrent.futures import ThreadPoolExecutor

    model, path = onnx_path
    threads: set[int] = set()
    model.register_forward_hook(lambda *_: threads.add(threading.get_ident()))
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((1 + i % 3, 3, 32, 32)).astype(np.float32) for i in range(24)]
    with torch.inference_mode():
        expected = [model(torch.from_numpy(b)).numpy() for b in batches]
    threads.clear()
    for predictor in (TorchPredictor(model, torch.device("cpu")), OnnxPredictor(path, torch.device("cpu"))):
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(predictor, batches))
        for answer, want in zip(answers, expected):
            np.testing.assert_allclose(answer, want, atol=1e-4)
    assert len(threads) == 1 and threading.get_ident() not in threads  # the torch module's own thread


def test_the_serving_package_caps_openmp_spinning_before_torch_loads() -> None:
    """torch's OpenMP threads spinning after preprocessing took the cores ONNX Runtime runs on; the cap must be in the
    environment before torch is imported, and a value the user set wins."""
    probe = "import os, sys, serving; print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)"
    env = {key: value for key, value in os.environ.items() if key != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["10000", "False"]
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={**env, "GOMP_SPINCOUNT": "500"}, check=True)
    assert out.stdout.split() == ["500", "False"]


def test_device_key_spells_each_device_one_way() -> None:
    """Deployments on one device share one batch slot (the dispatchers' semaphore), however their YAML names it."""
    from registry.devices import device_key

    if torch.cuda.is_available():
        assert device_key("auto") == device_key("cuda") == device_key("cuda:0") == "cuda:0"
        assert device_key("cpu") == "cpu"
    else:
        assert device_key("auto") == device_key("cpu") == "cpu"
        assert device_key("cuda") == "cuda" and device_key("cuda:1") == "cuda:1"  # not here: they fail to load
    assert device_key("gpu") == "gpu"  # not a device: the config refuses it before this


def test_a_cpu_detectors_lanes_answer_a_list_as_one_run_does(tmp_path: Path) -> None:
    """Images of several sizes shared out among lanes (ONNX Runtime sessions, or the torch module on a thread each)
    come back in their order, each answered as a run of its own answers it (an untrained detector at a score
    threshold of 0.01 finds many boxes, different per image)."""
    from registry.detection_inference import torch_detections
    from registry.detector_onnx import export_detector_onnx, onnx_detector
    from registry.detectors import DETECTORS, apply_detection_settings
    from registry.settings import build_settings

    torch.manual_seed(0)
    settings = build_settings("object_detection", {"min_size": 64, "max_size": 96, "box_score_thresh": 0.01})
    model = apply_detection_settings(DETECTORS["small_detector"].build(3), settings).eval()
    path = export_detector_onnx(model, 64, tmp_path / "detector.onnx")
    generator = torch.Generator().manual_seed(1)
    images = [(torch.rand(3, height, width, generator=generator) * 255).to(torch.uint8)
              for height, width in ((64, 64), (80, 64), (64, 96), (72, 72), (64, 80))]
    reference = onnx_detector(path, "cpu", 1)
    expected = [reference(image.float() / 255) for image in images]
    assert all(len(found.scores) for found in expected)
    assert len({found.boxes[:5].round(1).tobytes() for found in expected}) == len(images)  # each its own answer
    # torch pads a list's images into one batch, which changes the answers of images of other sizes: one size here
    squares = [(torch.rand(3, 64, 64, generator=generator) * 255).to(torch.uint8) for _ in range(5)]
    alone = [torch_detections(model, [image.float() / 255])[0] for image in squares]

    for lanes, inputs, wanted in ((CpuLanes.onnx(path, cores=2), images, expected),
                                  (CpuLanes.torch(model, cores=2), squares, alone)):
        assert len(lanes.lanes) == 2 and "2 lanes of 1 thread(s), a lone image on 2" in lanes.description
        for answered in (lanes.run(inputs), lanes.run(inputs[:3]), lanes.run(inputs[2:3])):  # a lone one, too
            offset = 2 if len(answered) == 1 else 0
            for found, one in zip(answered, wanted[offset:]):
                np.testing.assert_allclose(found.boxes, one.boxes, atol=1e-3)
                np.testing.assert_array_equal(found.classes, one.classes)
    assert len(CpuLanes.onnx(path, cores=16).lanes) == 4 and CpuLanes.torch(model, cores=1).pool is None

    before = set(threading.enumerate())
    predictor = DetectorPredictor.onnx(path, torch.device("cpu"), threads=2)  # its lanes end with its thread
    assert len(predictor([image.numpy() for image in images])) == len(images)
    lane_threads = [thread for thread in threading.enumerate()
                    if thread not in before and thread.name.startswith("detector-lane")]
    assert len(lane_threads) == 2
    predictor.thread.close()
    assert not any(thread.is_alive() for thread in lane_threads)
