"""Guided backprop and guided Grad-CAM with captum, made correct for real torchvision models.

Captum guides only `nn.ReLU` modules. Here, while an explanation runs:
- in-place activations are switched to out-of-place (and restored afterwards), as the reference does;
- every functional `relu` call (`F.relu`, `torch.relu`, `Tensor.relu`, in-place or not) is guided through a torch
  function mode, so models that call relu functionally are not silently explained with plain gradients;
- the other feature activations (Hardswish, SiLU, GELU, ...) get captum's rule too: the gradient leaving the
  activation is clamped at zero. Gates (Sigmoid, Hardsigmoid, as in squeeze-excitation blocks) are left alone.
Reused modules need nothing special: captum's hook is stateless, so every call is guided.
The result says which activations were guided and how many times.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:  # captum is imported where an explanation is made: a serving worker starts without it
    from captum.attr import GuidedBackprop, GuidedGradCam

RELU_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_}
GUIDED_ACTIVATIONS = (nn.Hardswish, nn.SiLU, nn.GELU, nn.Mish, nn.ELU, nn.SELU, nn.CELU, nn.LeakyReLU, nn.ReLU6,
                      nn.Softplus)
GATES = (nn.Sigmoid, nn.Hardsigmoid, nn.Tanh)

# captum warns on every call that it made the input require gradients and hooked the ReLUs: both are what these
# methods do, so users saw two warnings per explanation. Filtered once here (warnings.catch_warnings is not
# thread-safe, and the server explains on several threads).
for _expected in ("Input Tensor 0 did not already require gradients", "Setting backward hooks on ReLU activations"):
    warnings.filterwarnings("ignore", message=_expected, category=UserWarning, module=r"captum\.")


class _GuidedReLU(torch.autograd.Function):
    """relu whose backward passes only positive gradients at positive inputs."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0)


class GuidedReLUMode(TorchFunctionMode):
    """Routes every relu call made under it through `_GuidedReLU`, counting them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        if func in RELU_FUNCTIONS:
            self.calls += 1
            return _GuidedReLU.apply(args[0])
        return func(*args, **(kwargs or {}))


def _clamp_grad_input(module: nn.Module, grad_input: tuple, grad_output: tuple) -> tuple:
    return tuple(F.relu(g) if g is not None else None for g in grad_input)


@contextlib.contextmanager
def guided(model: nn.Module) -> Iterator[dict[str, dict[str, int]]]:
    """Make `model`'s activations guided for the duration; yields the census filled in when the block ends:
    {"guided": {activation: count}, "not_guided": {gate: count}}."""
    census: dict[str, dict[str, int]] = {"guided": {}, "not_guided": {}}
    inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    hooks = []
    modules = Counter()
    gates = Counter()
    for module in model.modules():
        if isinstance(module, nn.ReLU):
            modules["ReLU"] += 1
        elif isinstance(module, GUIDED_ACTIVATIONS):
            modules[type(module).__name__] += 1
            hooks.append(module.register_full_backward_hook(_clamp_grad_input))
        elif isinstance(module, GATES):
            gates[type(module).__name__] += 1
    for module in inplace:
        module.inplace = False
    mode = GuidedReLUMode()
    try:
        with mode:
            yield census
    finally:
        for hook in hooks:
            hook.remove()
        for module in inplace:
            module.inplace = True
        census["guided"].update({f"{name} modules": count for name, count in modules.items()})
        census["guided"]["relu calls"] = mode.calls  # over every forward pass the method makes
        census["not_guided"].update(dict(gates))


def _attribute(method: GuidedBackprop | GuidedGradCam, inputs: Tensor, targets: list[int], smoothgrad_samples: int,
               smoothgrad_stdev: float) -> Tensor:
    if smoothgrad_samples:
        from captum.attr import NoiseTunnel

        return NoiseTunnel(method).attribute(inputs, nt_type="smoothgrad", nt_samples=smoothgrad_samples,
                                             stdevs=smoothgrad_stdev, target=targets)
    return method.attribute(inputs, target=targets)


def guided_backprop(model: nn.Module, inputs: Tensor, targets: list[int], smoothgrad_samples: int = 0,
                    smoothgrad_stdev: float = 0.2) -> tuple[Tensor, dict]:
    """Captum GuidedBackprop per (input, target) row (optionally SmoothGrad-averaged); returns the attributions and
    the activation census."""
    from captum.attr import GuidedBackprop

    with guided(model) as census:
        attributions = _attribute(GuidedBackprop(model), inputs, targets, smoothgrad_samples, smoothgrad_stdev)
    return attributions, census


def guided_gradcam(model: nn.Module, layer: nn.Module, inputs: Tensor, targets: list[int], smoothgrad_samples: int = 0,
                   smoothgrad_stdev: float = 0.2) -> tuple[Tensor, dict]:
    """Captum GuidedGradCam (Grad-CAM with ReLU, nearest interpolation, times guided backprop)."""
    from captum.attr import GuidedGradCam

    with guided(model) as census:
        attributions = _attribute(GuidedGradCam(model, layer), inputs, targets, smoothgrad_samples, smoothgrad_stdev)
    return attributions, census
