"""Integrated gradients with captum: black baseline, riemann_middle or gausslegendre, path points evaluated in
batches that fit memory, the convergence delta, and an optional SmoothGrad wrapper."""

from __future__ import annotations

import logging
import math
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn

from explain.params import IntegratedGradientsParams

# Path points per forward/backward pass when the caller does not say: bounded by an activation-memory budget
# estimated from one forward pass (parameters are not counted, they are shared by every point), then evened out so
# every pass is as full as the others (50 steps in passes of 8 leave a last pass of 2). On the CPU the budget is 3 GiB,
# which keeps a pass's working set in the caches (resnet50 at 224 px: 50 steps in 5 passes of 10). On a GPU it is a
# quarter of the memory free when the explanation starts (the rest stays for other deployments and explanations
# sharing it), so large steps counts run in one pass.
PATH_MEMORY_BUDGET = {"cpu": 3 * 1024**3}
CUDA_FREE_MEMORY_SHARE = 0.25
MAX_PATH_BATCH = 256
T = TypeVar("T")
logger = logging.getLogger("lantern.explain")


@dataclass(frozen=True)
class IGResult:
    attributions: Tensor  # [N, 3, H, W]
    delta: Tensor  # [N]: sum(attr) - (f(x) - f(baseline)) per row
    gap: Tensor  # [N]: f(x) - f(baseline) for the target
    internal_batch_size: int


_ACTIVATION_BYTES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()
_FITTING_POINTS: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


def _shape_key(sample: Tensor) -> tuple:
    return tuple(sample.shape[1:]), sample.dtype, sample.device


def activation_bytes(model: nn.Module, sample: Tensor) -> int:
    """Bytes of every module output of one forward pass on `sample` (one image): what autograd keeps per point.
    Measured once per model, input shape, dtype and device (a served model explains many images of one size)."""
    key = _shape_key(sample)
    known = _ACTIVATION_BYTES.setdefault(model, {})
    if key not in known:
        known[key] = _measure_activation_bytes(model, sample)
    return known[key]


def _measure_activation_bytes(model: nn.Module, sample: Tensor) -> int:
    total = 0
    measuring = threading.get_ident()

    def count(_module: nn.Module, _inputs: tuple, output: object) -> None:
        nonlocal total
        if isinstance(output, Tensor) and threading.get_ident() == measuring:  # not another thread's pass meanwhile
            total += output.numel() * output.element_size()

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(sample[:1])
    finally:
        for hook in hooks:
            hook.remove()
    return max(total, 1)


def path_batch_size(model: nn.Module, sample: Tensor, rows: int, steps: int) -> int:
    """How many path points to evaluate at once for `rows` inputs shaped like `sample`, `steps` points each, on its
    device: a whole number of steps for every row (captum splits the path by steps), in passes of equal size."""
    budget = path_memory_budget(sample.device)
    most = int(max(1, min(MAX_PATH_BATCH, budget // (2 * activation_bytes(model, sample)))))
    most = min(most, _FITTING_POINTS.get(model, {}).get(_shape_key(sample), most))
    return _even_passes(most, rows, steps)


def path_memory_budget(device: torch.device) -> int:
    """Bytes of activations one pass of path points may take on `device`."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * CUDA_FREE_MEMORY_SHARE)
    return PATH_MEMORY_BUDGET["cpu"]


def _even_passes(most: int, rows: int, steps: int) -> int:
    passes = math.ceil(steps / max(1, most // rows))
    return math.ceil(steps / passes) * rows


def fitting_path_batch(run: Callable[[int], T], batch: int, model: nn.Module, sample: Tensor, rows: int,
                       steps: int) -> tuple[T, int]:
    """`run(batch)` and the batch it ran with: when the device runs out of memory (a GPU shared with other
    deployments and explanations), retried with half as many path points per pass, down to one step of every row.
    The size that fitted is remembered for this model and input shape, so later explanations start there."""
    while True:
        try:
            return run(batch), batch
        except torch.OutOfMemoryError:
            if batch <= rows:
                raise
        smaller = _even_passes(max(rows, batch // 2), rows, steps)  # outside the handler: its frames are freed
        if sample.device.type == "cuda":
            torch.cuda.empty_cache()
        logger.warning("out of %s memory at %d path points per pass; retrying with %d", sample.device, batch, smaller)
        _FITTING_POINTS.setdefault(model, {})[_shape_key(sample)] = smaller
        batch = smaller


def target_scores(model: nn.Module, inputs: Tensor, targets: list[int]) -> Tensor:
    with torch.no_grad():
        out = model(inputs)
    return out[torch.arange(len(targets), device=out.device), torch.as_tensor(targets, device=out.device)]


def integrated_gradients(model: nn.Module, inputs: Tensor, targets: list[int], params: IntegratedGradientsParams,
                         baselines: Tensor | None = None, input_scores: Tensor | None = None,
                         baseline_scores: Tensor | None = None) -> IGResult:
    """IG of each row of `inputs` [N, 3, H, W] for its target, from `baselines` (same shape; None means zeros).
    `input_scores`, `baseline_scores` [N]: each row's target output for its input and its baseline, when the caller
    has them already (each saves a forward pass).

    Zeros in a normalised input space are the mean colour, not black: callers pass the normalised black image."""
    from captum.attr import IntegratedGradients, NoiseTunnel  # here: a serving worker starts without captum

    baselines = torch.zeros_like(inputs) if baselines is None else baselines
    rows = inputs.shape[0] * (params.smoothgrad_samples or 1)  # NoiseTunnel runs IG on every noisy copy at once
    ig = IntegratedGradients(model)
    noise_seed = int(torch.randint(0, 2**62, ()))  # SmoothGrad's noise: drawn once, the same again on a retry

    def run(batch: int) -> Tensor:
        if params.smoothgrad_samples:
            with torch.random.fork_rng(devices=[inputs.device] if inputs.device.type == "cuda" else []):
                torch.manual_seed(noise_seed)
                return NoiseTunnel(ig).attribute(
                    inputs, nt_type="smoothgrad", nt_samples=params.smoothgrad_samples,
                    stdevs=params.smoothgrad_stdev, baselines=baselines, target=targets, n_steps=params.n_steps,
                    method=params.approximation_method, internal_batch_size=batch,
                )
        return ig.attribute(inputs, baselines=baselines, target=targets, n_steps=params.n_steps,
                            method=params.approximation_method, internal_batch_size=one_pass_or(batch))

    def one_pass_or(batch: int) -> int | None:  # the whole path in one pass skips captum's batching machinery
        return None if batch >= rows * params.n_steps else batch

    if params.internal_batch_size:  # the caller's choice is kept, out of memory or not
        attributions, batch = run(params.internal_batch_size), params.internal_batch_size
    else:
        attributions, batch = fitting_path_batch(run, path_batch_size(model, inputs, rows, params.n_steps), model,
                                                 inputs, rows, params.n_steps)
    if input_scores is None:
        input_scores = target_scores(model, inputs, targets)
    if baseline_scores is None:
        baseline_scores = target_scores(model, baselines, targets)
    gap = input_scores - baseline_scores
    delta = attributions.sum(dim=(1, 2, 3)) - gap
    return IGResult(attributions.detach(), delta.detach(), gap.detach(), batch)
