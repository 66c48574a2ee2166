"""One entry point for every method: `attribute(model, x, method, params)` -> `Explanation`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from explain.encoding import AttributionEncoding, encode_attributions
from explain.guided import guided_backprop, guided_gradcam
from explain.integrated import integrated_gradients
from explain.params import ExplainError, IntegratedGradientsParams, XRAIParams, parse_params
from explain.visualize import pixel_scores, png_base64, png_bytes, render_grid
from explain.xrai import xrai

SANITY_NOTE = ("guided backprop and guided Grad-CAM fail the model-randomisation sanity check (Adebayo et al. 2018): "
               "their maps change little when the weights are randomised, so they show edges as much as evidence")


class FidelityReport(BaseModel):
    """How an explanation was computed and how far to trust it."""

    model_config = ConfigDict(extra="forbid")

    method: str
    params: dict[str, Any]
    device: str
    seconds: float
    targets: list[int]
    target_scores: list[float]  # the model's output (logit) for each target
    completeness_error: list[float] | None = None  # IG: |sum(attr) - (f(x) - f(baseline))| / |f(x) - f(baseline)|
    convergence_delta: list[float] | None = None  # IG: sum(attr) - (f(x) - f(baseline))
    internal_batch_size: int | None = None
    baseline_completeness_error: list[list[float]] | None = None  # XRAI: per target, black then white baseline
    stage_seconds: dict[str, float] | None = None  # XRAI: gradients vs segmentation + region selection
    segments: int | None = None  # XRAI: candidate regions (dilated Felzenszwalb segments at 6 scales)
    guided_activations: dict[str, dict[str, int]] | None = None
    notes: list[str] = []


@dataclass
class Explanation:
    """Attributions [T, 3, H, W] (one per target) on the cropped input, with the report and the input image."""

    method: str
    targets: list[int]
    attributions: Tensor
    image: np.ndarray  # [H, W, 3] uint8: the cropped input the maps are drawn on
    fidelity: FidelityReport

    def scores(self, index: int = 0) -> np.ndarray:
        """[H, W] pixel importance in [0, 1] for target `index`."""
        return pixel_scores(self.attributions[index].numpy(), signed_regions=self.method == "xrai")

    def visualization_png(self, index: int = 0) -> bytes:
        return png_bytes(render_grid(self.image, self.scores(index)))

    def visualization_base64(self, index: int = 0) -> str:
        return png_base64(self.visualization_png(index))

    def encoded_attributions(self, index: int = 0, encoding: AttributionEncoding = "float32") -> list | str:
        return encode_attributions(self.attributions[index].numpy(), encoding)


def denormalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The [H, W, 3] uint8 image a normalised [3, H, W] tensor came from."""
    m = torch.tensor(mean, device=x.device).view(3, 1, 1)
    s = torch.tensor(std, device=x.device).view(3, 1, 1)
    pixels = ((x * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.permute(1, 2, 0).cpu().numpy()


def attribute(
    model: nn.Module,
    x: Tensor,
    method: str,
    params: dict[str, Any] | BaseModel | None = None,
    *,
    targets: Sequence[int] | Callable[[np.ndarray], Sequence[int]] | None = None,
    gradcam_layer: str | None = None,
    mean: Sequence[float],
    std: Sequence[float],
    image: np.ndarray | None = None,
) -> Explanation:
    """Explain `model`'s output on one normalised image `x` [3, H, W] (or [1, 3, H, W]) with `method`.

    `targets`: the classes to explain, or a function choosing them from the logits (the caller's prediction rule:
    every label over its threshold for a multi-label model); by default the top class. A target given twice is
    explained once, in the order first given. `mean`/`std`: the normalisation `x` was made with (the model spec's,
    registry/spec.py: the black baseline of integrated gradients is made from them). `image` is the cropped uint8
    input for the visualisation (default: `x` de-normalised with `mean`/`std`)."""
    typed = parse_params(method, params)
    x = x.unsqueeze(0) if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        raise ExplainError(f"expected one image as a [3, H, W] or [1, 3, H, W] tensor, got {tuple(x.shape)}")
    model.eval()
    start = time.perf_counter()
    black = black_image(x, mean, std)
    with torch.no_grad():  # integrated gradients also needs the black image's scores: one pass for both
        both = model(torch.cat([x, black])) if method == "integrated_gradients" else model(x)
    logits = both[0]
    if targets is None:
        chosen = [int(logits.argmax())]
    else:
        picked = targets(logits.detach().float().cpu().numpy()) if callable(targets) else targets
        chosen = list(dict.fromkeys(int(t) for t in picked))  # a label named twice is explained once
        bad = [t for t in chosen if not 0 <= t < logits.numel()]
        if bad:
            raise ExplainError(f"target class {bad[0]} does not exist; the model has classes 0..{logits.numel() - 1}")
    report: dict[str, Any] = {"method": method, "params": typed.model_dump(), "device": str(x.device),
                              "targets": chosen, "target_scores": [float(logits[t]) for t in chosen], "notes": []}
    picture = image if image is not None else denormalize(x[0], mean, std)
    if not chosen:
        attributions = torch.zeros(0, *x.shape[1:])
        report["notes"].append("no target was chosen (no label over a multi-label model's threshold); nothing to "
                               "explain")
    elif method == "xrai":
        assert isinstance(typed, XRAIParams)
        result = xrai(model, x[0], chosen, typed.n_steps, typed.xrai_fast, mean, std, picture,
                      typed.internal_batch_size)
        attributions = result.gains.float()[:, None].expand(-1, 3, -1, -1)
        report.update(completeness_error=[max(errors) for errors in result.completeness_error],
                      baseline_completeness_error=result.completeness_error, segments=result.segments,
                      internal_batch_size=result.internal_batch_size,
                      stage_seconds={"gradients": result.gradient_seconds, "regions": result.region_seconds})
    else:
        inputs = x.expand(len(chosen), -1, -1, -1).contiguous()
        attributions = _run(model, inputs, chosen, method, typed, gradcam_layer, black, report, both[:, chosen])
    report["seconds"] = time.perf_counter() - start
    return Explanation(method, chosen, attributions.detach().float().cpu(), picture, FidelityReport(**report))


def black_image(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """The black image [1, 3, H, W] shaped like `x`, in the normalised space (zeros there are the mean colour)."""
    black = (torch.zeros(3, device=x.device, dtype=x.dtype) - torch.tensor(mean, device=x.device, dtype=x.dtype)) \
        / torch.tensor(std, device=x.device, dtype=x.dtype)
    return black.view(1, 3, 1, 1).expand(1, 3, *x.shape[2:])


def _run(model: nn.Module, inputs: Tensor, targets: list[int], method: str, params: BaseModel,
         gradcam_layer: str | None, black: Tensor, report: dict[str, Any], scores: Tensor) -> Tensor:
    """`scores` [1 or 2, targets]: the targets' scores of the input (and of the black image for integrated gradients)."""
    if method == "integrated_gradients":
        assert isinstance(params, IntegratedGradientsParams)
        result = integrated_gradients(model, inputs, targets, params, baselines=black.expand_as(inputs).contiguous(),
                                      input_scores=scores[0], baseline_scores=scores[1])
        gap = result.gap.abs().clamp_min(1e-12)
        report.update(completeness_error=(result.delta.abs() / gap).tolist(),
                      convergence_delta=result.delta.tolist(), internal_batch_size=result.internal_batch_size)
        return result.attributions
    if method == "guided_backprop":
        attributions, census = guided_backprop(model, inputs, targets, **params.model_dump())
    else:
        if gradcam_layer is None:
            raise ExplainError("guided_gradcam needs the model's Grad-CAM layer name (the model spec's gradcam_layer)")
        try:
            layer = model.get_submodule(gradcam_layer)
        except AttributeError:
            raise ExplainError(f"the model has no layer {gradcam_layer!r} for Grad-CAM") from None
        attributions, census = guided_gradcam(model, layer, inputs, targets, **params.model_dump())
    report.update(guided_activations=census)
    report["notes"].append(SANITY_NOTE)
    return attributions
