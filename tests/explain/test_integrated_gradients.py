"""Integrated gradients and its parameters: validation, equality with captum, path batches within the memory budget
(halved on out-of-memory), completeness, SmoothGrad."""

from __future__ import annotations

import pytest
import torch
from captum.attr import IntegratedGradients
from torch import nn

from explain.attribute import attribute
from explain.integrated import PATH_MEMORY_BUDGET, activation_bytes, path_batch_size
from explain.params import ExplainError, parse_params
from registry.small_cnn import SmallCNN
from registry.spec import IMAGENET, IMAGENET_MEAN, IMAGENET_STD
from support.tensors import image_tensor, relative_difference


def test_parameters_are_validated_with_clear_messages() -> None:
    assert parse_params("integrated_gradients").model_dump() == {
        "smoothgrad_samples": 0, "smoothgrad_stdev": 0.2, "n_steps": 50, "approximation_method": "riemann_middle",
        "internal_batch_size": None}
    cases = [
        ("integrated_gradients", {"n_steps": 1}, "n_steps: Input should be greater than or equal to 2"),
        ("integrated_gradients", {"approximation_method": "simpson"}, "'riemann_middle' or 'gausslegendre'"),
        ("integrated_gradients", {"nsteps": 10}, "nsteps: not a parameter of integrated_gradients (accepted: "),
        ("guided_backprop", {"n_steps": 10}, "n_steps: not a parameter of guided_backprop"),
        ("integrated_gradients", {"smoothgrad_samples": -1}, "smoothgrad_samples"),
        ("guided_backprop", {"smoothgrad_stdev": float("nan")}, "smoothgrad_stdev: Input should be a finite number"),
        ("integrated_gradients", {"smoothgrad_stdev": "inf"}, "smoothgrad_stdev: Input should be a finite number"),
        ("xrai", {"n_steps": 0}, "n_steps: Input should be greater than or equal to 2"),
        ("xrai", {"xrai_fast": "sometimes"}, "xrai_fast: Input should be a valid boolean"),
        ("xrai", {"approximation_method": "gausslegendre"}, "approximation_method: not a parameter of xrai"),
        ("saliency_magic", {}, "unknown explanation method 'saliency_magic'; accepted: xrai, integrated_gradients, "
                               "guided_gradcam, guided_backprop"),
    ]
    for method, values, message in cases:
        with pytest.raises(ExplainError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_params(method, values)


def test_integrated_gradients_equals_captum_and_is_batch_invariant(cnn: SmallCNN) -> None:
    x = image_tensor()
    ours = attribute(cnn, x, "integrated_gradients", {"n_steps": 24, "internal_batch_size": 7}, **IMAGENET)
    black = ((torch.zeros(3) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    reference = IntegratedGradients(cnn).attribute(x[None], baselines=black.expand(1, 3, 32, 32), target=ours.targets,
                                                   n_steps=24, method="riemann_middle")
    assert torch.allclose(ours.attributions, reference, rtol=1e-5, atol=1e-7)
    unbatched = attribute(cnn, x, "integrated_gradients", {"n_steps": 24}, **IMAGENET)
    assert torch.allclose(unbatched.attributions, ours.attributions, rtol=1e-5, atol=1e-7)
    assert ours.fidelity.internal_batch_size == 7 and unbatched.fidelity.internal_batch_size >= 24
    assert ours.targets == [int(cnn(x[None]).argmax())]
    assert ours.attributions.shape == (1, 3, 32, 32)


class MemoryLimited(nn.Module):
    """A model on a device that holds at most `most` inputs a pass: a larger batch raises torch.OutOfMemoryError, as
    CUDA's caching allocator does when a GPU is shared by other deployments and explanations."""

    def __init__(self, model: nn.Module, most: int) -> None:
        super().__init__()
        self.model, self.most, self.batches = model, most, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        if x.shape[0] > self.most:
            raise torch.OutOfMemoryError(f"CUDA out of memory (simulated: {x.shape[0]} inputs, room for {self.most})")
        return self.model(x)


@pytest.mark.parametrize(("method", "params"), [("integrated_gradients", {"n_steps": 24}),
                                                ("integrated_gradients", {"n_steps": 8, "smoothgrad_samples": 2}),
                                                ("xrai", {"n_steps": 12})])
def test_out_of_memory_halves_the_path_batch_and_remembers_it(cnn: SmallCNN, method: str, params: dict) -> None:
    """Out of device memory, the gradient passes are retried with half as many path points until they fit; the result
    equals the unconstrained one, the report gives the size that fitted, and the next explanation starts there."""
    x = image_tensor(3)
    torch.manual_seed(0)  # SmoothGrad's noise
    expected = attribute(cnn, x, method, params, **IMAGENET)
    limited = MemoryLimited(cnn, most=5)
    torch.manual_seed(0)
    explained = attribute(limited, x, method, params, **IMAGENET)  # a retry adds the same SmoothGrad noise as the failed pass
    assert torch.allclose(explained.attributions, expected.attributions, rtol=1e-5, atol=1e-7)
    assert max(limited.batches) > 5 and explained.fidelity.internal_batch_size <= 5  # it did run out, then fitted
    limited.batches.clear()
    torch.manual_seed(0)
    again = attribute(limited, x, method, params, **IMAGENET)
    assert max(limited.batches) <= 5 and again.fidelity.internal_batch_size == explained.fidelity.internal_batch_size
    assert torch.allclose(again.attributions, expected.attributions, rtol=1e-5, atol=1e-7)
    with pytest.raises(torch.OutOfMemoryError):  # a size the caller chose is kept, out of memory or not
        attribute(MemoryLimited(cnn, most=5), x, method, {**params, "internal_batch_size": 8}, **IMAGENET)
    with pytest.raises(torch.OutOfMemoryError):  # one step of every row a pass does not fit: nothing left to halve
        attribute(MemoryLimited(cnn, most=0), x, method, params, **IMAGENET)


@pytest.mark.parametrize(("points_in_budget", "rows", "steps", "expected"), [
    (12, 1, 50, 10),  # 5 passes of 10, not 4 of 12 and one of 2
    (8, 1, 50, 8),  # 7 passes: 6 of 8, one of 2 is the fewest passes
    (12, 2, 50, 12),  # 6 steps of both rows a pass
    (100, 1, 50, 50),  # everything in one pass
    (3, 5, 20, 5),  # the budget is smaller than the rows: one step of every row a pass
])
def test_path_batches_fit_the_memory_budget_in_passes_of_equal_size(
        cnn: SmallCNN, monkeypatch: pytest.MonkeyPatch, points_in_budget: int, rows: int, steps: int,
        expected: int) -> None:
    sample = image_tensor()[None]
    budget = 2 * activation_bytes(cnn, sample) * points_in_budget
    monkeypatch.setitem(PATH_MEMORY_BUDGET, "cpu", budget)
    batch = path_batch_size(cnn, sample, rows, steps)
    assert batch == expected
    assert batch % rows == 0


def test_activation_bytes_count_only_the_measuring_pass() -> None:
    """Measured with hooks on the module's layers, which see every forward pass through it while they are there: on a
    served model that may be another thread's (an explanation at the same time, another deployment's warm-up), whose
    activations counted too and shrank the path batches for good."""
    import threading

    sample = image_tensor()[None]
    alone = activation_bytes(SmallCNN(3).eval(), sample)
    model = SmallCNN(3).eval()
    other_pass = []

    def another_thread_passes_meanwhile(_module: nn.Module, _inputs: tuple) -> None:
        if not other_pass:
            other_pass.append(True)
            thread = threading.Thread(target=lambda: model(sample))  # while the measuring pass is under way
            thread.start()
            thread.join()

    model.features.register_forward_pre_hook(another_thread_passes_meanwhile)
    assert activation_bytes(model, sample) == alone and other_pass


def test_completeness_is_measured_and_shrinks_with_more_steps(cnn: SmallCNN) -> None:
    x = image_tensor(1)
    black = ((torch.zeros(3) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    errors = []
    for steps in (20, 50, 200):
        explanation = attribute(cnn, x, "integrated_gradients", {"n_steps": steps,
                                                                 "approximation_method": "gausslegendre"}, **IMAGENET)
        report = explanation.fidelity
        with torch.no_grad():
            gap = report.target_scores[0] - float(cnn(black.expand(1, 3, 32, 32))[0, report.targets[0]])
        assert report.completeness_error[0] == pytest.approx(
            abs(float(explanation.attributions.sum()) - gap) / abs(gap), rel=1e-3, abs=1e-6)
        errors.append(report.completeness_error[0])
    assert errors[0] > errors[1] > errors[2] > 0


def test_smoothgrad_averages_noisy_copies(cnn: SmallCNN) -> None:
    x = image_tensor(3)
    plain = attribute(cnn, x, "integrated_gradients", {"n_steps": 8}, **IMAGENET)
    torch.manual_seed(0)
    smooth = attribute(cnn, x, "integrated_gradients", {"n_steps": 8, "smoothgrad_samples": 3}, **IMAGENET)
    assert smooth.attributions.shape == plain.attributions.shape
    assert relative_difference(smooth.attributions, plain.attributions) > 1e-3
