"""ONNX export: dynamic batch axis, parity with torch for each architecture family, and the parity refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from registry.errors import ParityError
from registry.onnx_export import INPUT_NAME, check_parity, export_onnx, make_session, parity_max_abs_diff
from registry.small_cnn import SmallCNN
from registry.spec import build_module, make_spec


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18", "mobilenet_v3_small", "efficientnet_b0"])
def test_export_matches_torch_with_dynamic_batch(tmp_path, arch):
    torch.manual_seed(0)
    model = build_module(make_spec(arch, 3, "multiclass"))
    path = export_onnx(model, 64, tmp_path / "model.onnx")
    assert parity_max_abs_diff(model, path, 64) < 1e-3
    session = make_session(path, device="cpu")
    for batch in (1, 5):
        x = torch.randn(batch, 3, 64, 64)
        with torch.inference_mode():
            expected = model(x).numpy()
        np.testing.assert_allclose(session.run(None, {INPUT_NAME: x.numpy()})[0], expected, atol=1e-3)


def test_parity_check_refuses_a_model_that_differs(tmp_path):
    torch.manual_seed(0)
    exported, other = SmallCNN(3).eval(), SmallCNN(3).eval()
    path = export_onnx(exported, 32, tmp_path / "a.onnx")
    diff = parity_max_abs_diff(other, path, 32)  # ONNX of one model against torch of another
    assert diff > 1e-3
    with pytest.raises(ParityError, match="above the tolerance"):
        check_parity(diff, 1e-3)
    check_parity(parity_max_abs_diff(exported, path, 32), 1e-3)
    with pytest.raises(ParityError):
        check_parity(float("nan"), 1e-3)


def test_onnx_runtime_on_the_cpu_does_not_spin_its_threads(tmp_path):
    """Spinning intra-op threads burnt the cores the server decodes, preprocesses and answers HTTP on, for no gain
    (make_session's docstring); on CUDA too (tests/test_gpu.py)."""
    path = export_onnx(SmallCNN(3).eval(), 32, tmp_path / "model.onnx")
    options = make_session(path, device="cpu").get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
