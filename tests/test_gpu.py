"""The CUDA paths: explanations computed on the GPU agree with the CPU, and ONNX Runtime really runs on its CUDA
provider. Skipped where torch sees no GPU (CI has none); run them on a GPU machine with `pytest tests/test_gpu.py`.
The end-to-end suites cover the served GPU path there too: deployments default to `device: auto`, and
test_rollout checks which provider every worker's deployment runs on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from explain.attribute import attribute
from registry.architectures import last_conv_layer
from registry.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx, make_session
from registry.small_cnn import SmallCNN
from registry.spec import IMAGENET, IMAGENET_MEAN, IMAGENET_STD
from training.shapes import ShapesConfig, make_sample

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


@pytest.fixture(scope="module")
def model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(3).eval()


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    return np.asarray(make_sample(ShapesConfig(image_size=64, seed=2), 1).image.convert("RGB"))


def normalised(picture: np.ndarray) -> torch.Tensor:
    return (torch.from_numpy(picture).permute(2, 0, 1).float() / 255 - MEAN) / STD


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


@pytest.mark.parametrize(("method", "params"), [
    ("integrated_gradients", {"n_steps": 32, "approximation_method": "gausslegendre"}),
    ("guided_backprop", {}),
    ("guided_gradcam", {}),
])
def test_gradient_methods_on_the_gpu_match_the_cpu(model: SmallCNN, picture: np.ndarray, method: str,
                                                   params: dict) -> None:
    """In full float32 the GPU computes the CPU's maps; with torch's default TF32 convolutions (what serving uses) they
    differ a little: measured on an H100, 0.14 % for integrated gradients and 2 % for the guided methods, whose
    zeroed negative gradients turn small rounding differences into sign flips."""
    x = normalised(picture)
    cpu = attribute(model, x, method, params, gradcam_layer=last_conv_layer(model), image=picture, **IMAGENET)
    gpu_model = SmallCNN(3).eval().cuda()
    gpu_model.load_state_dict(model.state_dict())
    tf32 = attribute(gpu_model, x.cuda(), method, params, gradcam_layer=last_conv_layer(model), image=picture, **IMAGENET)
    assert relative_difference(tf32.attributions, cpu.attributions) < 0.05
    assert tf32.targets == cpu.targets
    default = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        gpu = attribute(gpu_model, x.cuda(), method, params, gradcam_layer=last_conv_layer(model), image=picture, **IMAGENET)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = default
    assert gpu.fidelity.device.startswith("cuda") and cpu.fidelity.device == "cpu"
    assert gpu.targets == cpu.targets
    assert relative_difference(gpu.attributions, cpu.attributions) < 1e-3
    if method == "integrated_gradients":  # the same path integral, so the same completeness error
        assert gpu.fidelity.completeness_error[0] == pytest.approx(cpu.fidelity.completeness_error[0], abs=1e-3)


@pytest.mark.parametrize("fast", [False, True])
def test_xrai_on_the_gpu_matches_the_cpu(model: SmallCNN, picture: np.ndarray, fast: bool) -> None:
    x = normalised(picture)
    params = {"n_steps": 20, "xrai_fast": fast}
    cpu = attribute(model, x, "xrai", params, image=picture, **IMAGENET)
    gpu_model = SmallCNN(3).eval().cuda()
    gpu_model.load_state_dict(model.state_dict())
    gpu = attribute(gpu_model, x.cuda(), "xrai", params, image=picture, **IMAGENET)
    assert gpu.fidelity.device.startswith("cuda")
    assert gpu.fidelity.segments == cpu.fidelity.segments
    correlation = spearmanr(gpu.attributions[0, 0].numpy().ravel(), cpu.attributions[0, 0].numpy().ravel())[0]
    assert correlation >= 0.99


def test_onnx_runtime_runs_on_its_cuda_provider(model: SmallCNN, tmp_path: Path) -> None:
    path = export_onnx(model, 32, tmp_path / "model.onnx")
    session = make_session(path, device="cuda")
    assert session.get_providers()[0] == "CUDAExecutionProvider"
    inputs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(inputs).numpy()
    actual = session.run([OUTPUT_NAME], {INPUT_NAME: inputs.numpy()})[0]
    assert np.allclose(actual, expected, rtol=1e-3, atol=1e-4)


def test_onnx_runtime_on_cuda_does_not_spin_its_cpu_threads(model: SmallCNN, tmp_path: Path) -> None:
    """Spinning threads would burn the cores that decode and preprocess images for the GPU."""
    path = export_onnx(model, 32, tmp_path / "model.onnx")
    options = make_session(path, device="cuda").get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_a_gpu_deployment_pads_batches_to_buckets_it_warmed_up(model: SmallCNN, tmp_path: Path) -> None:
    """ONNX Runtime's CUDA provider builds cuDNN plans per input shape, again whenever the shape changes: each bucket
    has a CUDA session of its own, which only ever sees its batch size."""
    from serving.runtime.predictors import OnnxPredictor, shape_buckets, submit_rows

    path = export_onnx(model, 32, tmp_path / "model.onnx")
    buckets = shape_buckets(torch.device("cuda"), "onnxruntime", 8)
    predictor = OnnxPredictor(path, torch.device("cuda"), buckets=buckets)
    assert predictor.buckets == (1, 2, 4, 8) and predictor.device == "cuda"
    assert sorted(predictor.sessions) == [1, 2, 4, 8]
    assert all(session.get_providers()[0] == "CUDAExecutionProvider" for session in predictor.sessions.values())
    rows = [np.random.default_rng(i).standard_normal((3, 32, 32)).astype(np.float32) for i in range(3)]
    with torch.inference_mode():
        expected = model(torch.from_numpy(np.stack(rows))).numpy()
    assert np.allclose(submit_rows(predictor, rows).result(), expected, rtol=1e-3, atol=1e-4)
