"""Guided backprop and guided Grad-CAM on real architectures (layouts, reused and functional ReLUs), multi-label
targets, the encodings and the 2 x 2 visualisation."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import GuidedBackprop, Saliency
from PIL import Image
from scipy.stats import spearmanr
from torch import nn

from explain.attribute import attribute
from explain.encoding import decode_npy_base64
from explain.guided import guided_backprop
from explain.layout import fastest_layout
from explain.params import ExplainError
from registry.architectures import ARCHITECTURES
from registry.small_cnn import SmallCNN
from registry.spec import IMAGENET
from support.tensors import image_tensor, relative_difference


@pytest.mark.parametrize("arch, expected", [
    ("small_cnn", {"ReLU modules": 4}),
    ("resnet18", {"ReLU modules": 9}),  # torchvision reuses one in-place ReLU per block
    ("mobilenet_v3_small", {"ReLU modules": 14, "Hardswish modules": 19}),
    ("efficientnet_b0", {"SiLU modules": 49}),
])
def test_guided_methods_on_real_architectures(arch: str, expected: dict[str, int]) -> None:
    torch.manual_seed(0)
    model = ARCHITECTURES[arch].build(3).eval()
    x = torch.randn(3, 64, 64)
    inplace_before = {name for name, m in model.named_modules() if getattr(m, "inplace", False)}
    backprop = attribute(model, x, "guided_backprop", targets=[1], **IMAGENET)
    cam = attribute(model, x, "guided_gradcam", targets=[1], gradcam_layer=ARCHITECTURES[arch].gradcam_layer, **IMAGENET)
    guided = backprop.fidelity.guided_activations["guided"]
    assert {k: guided[k] for k in expected} == expected
    assert guided["relu calls"] >= expected.get("ReLU modules", 0)
    plain = Saliency(model).attribute(x[None], target=1, abs=False)
    assert relative_difference(backprop.attributions, plain) > 1e-3, "guided backprop must differ from the gradient"
    assert torch.isfinite(cam.attributions).all() and cam.attributions.abs().sum() > 0
    assert {name for name, m in model.named_modules() if getattr(m, "inplace", False)} == inplace_before
    assert any("sanity check" in note for note in backprop.fidelity.notes)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_channels_last_weights_give_the_same_maps(arch: str) -> None:
    """fastest_layout (channels-last weights on the CPU) changes how fast the maps come, not the maps."""
    torch.manual_seed(0)
    model = ARCHITECTURES[arch].build(3).eval()
    fast = fastest_layout(copy.deepcopy(model))
    weights = [p for p in fast.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)
    x = torch.randn(3, 64, 64)
    layer = ARCHITECTURES[arch].gradcam_layer
    for method, params in [("integrated_gradients", {"n_steps": 8}), ("guided_backprop", None),
                           ("guided_gradcam", None), ("xrai", {"n_steps": 4})]:
        expected = attribute(model, x, method, params, targets=[1], gradcam_layer=layer, **IMAGENET)
        got = attribute(fast, x, method, params, targets=[1], gradcam_layer=layer, **IMAGENET)
        if method == "xrai":  # region ranks from gains: a float-rounding tie may swap two neighbours
            assert spearmanr(got.attributions[0, 0].flatten(), expected.attributions[0, 0].flatten())[0] > 0.999
        else:
            assert relative_difference(got.attributions, expected.attributions) < 1e-2, method


def test_reused_in_place_relus_give_the_same_map_as_separate_modules() -> None:
    torch.manual_seed(0)
    model = ARCHITECTURES["resnet18"].build(3).eval()
    separate = copy.deepcopy(model)
    for block in [separate.layer1, separate.layer2, separate.layer3, separate.layer4]:
        for unit in block:
            unit.relu = nn.Identity()  # replaced below by distinct, out-of-place modules
            unit.relu1, unit.relu2 = nn.ReLU(), nn.ReLU()

            def forward(self, x, unit=unit):  # noqa: ANN001
                identity = x if self.downsample is None else self.downsample(x)
                out = self.relu1(self.bn1(self.conv1(x)))
                return self.relu2(self.bn2(self.conv2(out)) + identity)

            unit.forward = forward.__get__(unit)
    separate.relu = nn.ReLU()
    x = torch.randn(1, 3, 64, 64)
    ours, _census = guided_backprop(model, x, [2])
    reference = GuidedBackprop(separate).attribute(x, target=2)
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-10)


def test_functional_relu_calls_are_guided_too(cnn: SmallCNN) -> None:
    class Functional(SmallCNN):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.features:
                x = F.relu(block[1](block[0](x)))
                x = block[3](x) if len(block) > 3 else x
            return self.classifier(self.pool(x).flatten(1))

    functional = Functional(3).eval()
    functional.load_state_dict(cnn.state_dict())
    x = image_tensor(5)[None]
    ours, census = guided_backprop(functional, x, [0])
    reference = GuidedBackprop(cnn).attribute(x, target=0)
    assert torch.allclose(ours, reference, atol=1e-7)
    assert census["guided"]["relu calls"] == 4
    assert not torch.allclose(GuidedBackprop(functional).attribute(x, target=0), reference, atol=1e-7)


def test_targets_chosen_named_and_errors(cnn: SmallCNN) -> None:
    x = image_tensor(2)
    logits = cnn(x[None])[0]
    assert attribute(cnn, x, "guided_backprop", **IMAGENET).targets == [int(logits.argmax())]  # the top class by default
    everything = attribute(cnn, x, "guided_backprop", targets=lambda scores: list(range(len(scores))), **IMAGENET)
    assert everything.targets == [0, 1, 2] and everything.attributions.shape == (3, 3, 32, 32)
    top = attribute(cnn, x, "guided_backprop", targets=lambda scores: [int(scores.argmax())], **IMAGENET)
    assert top.targets == [int(logits.argmax())]
    none = attribute(cnn, x, "guided_backprop", targets=lambda scores: [], **IMAGENET)  # no label over a multi-label threshold
    assert none.targets == [] and none.attributions.shape[0] == 0 and "nothing to explain" in none.fidelity.notes[0]
    named = attribute(cnn, x, "integrated_gradients", {"n_steps": 4}, targets=[2], **IMAGENET)
    assert named.targets == [2]
    twice = attribute(cnn, x, "guided_backprop", targets=[2, 0, 2], **IMAGENET)
    assert twice.targets == [2, 0] and twice.attributions.shape == (2, 3, 32, 32)
    assert torch.allclose(twice.attributions[0], attribute(cnn, x, "guided_backprop", targets=[2], **IMAGENET).attributions[0],
                          atol=1e-6)
    with pytest.raises(ExplainError, match="target class 3 does not exist; the model has classes 0..2"):
        attribute(cnn, x, "guided_backprop", targets=[3], **IMAGENET)
    with pytest.raises(ExplainError, match="no layer 'features.9'"):
        attribute(cnn, x, "guided_gradcam", gradcam_layer="features.9", **IMAGENET)
    with pytest.raises(ExplainError, match=r"\[3, H, W\]"):
        attribute(cnn, torch.randn(2, 3, 32, 32), "guided_backprop", **IMAGENET)


def test_encodings_and_the_two_by_two_png(cnn: SmallCNN) -> None:
    explanation = attribute(cnn, image_tensor(4), "integrated_gradients", {"n_steps": 8}, **IMAGENET)
    values = explanation.attributions[0].numpy()
    as_list = np.array(explanation.encoded_attributions(0, "float32"))
    assert as_list.shape == (3, 32, 32) and np.allclose(as_list, values)
    half = np.array(explanation.encoded_attributions(0, "float16"))
    assert np.allclose(half, values.astype(np.float16).astype(np.float32))
    npy = decode_npy_base64(explanation.encoded_attributions(0, "npy_base64"))
    assert npy.dtype == np.float16 and np.array_equal(npy, values.astype(np.float16))

    png = Image.open(io.BytesIO(explanation.visualization_png()))
    assert png.format == "PNG" and png.size == (2 * 224, 2 * 224)  # 32 px panels enlarged 7x
    grid = np.asarray(png.convert("RGB"))
    original = grid[:224:7, :224:7]
    assert np.array_equal(original, explanation.image)
    heat = grid[:224, 224:].reshape(-1, 3).astype(int)
    assert (heat[:, 0] <= heat[:, 1] + 1).mean() > 0.5 or (heat[:, 2] > 200).any()  # blue-green-yellow-white
    masked = grid[224::7, 224::7]
    kept = (masked.sum(axis=2) > 0).mean()
    assert 0.25 <= kept <= 0.35  # the top 30 % of the pixels
    assert explanation.visualization_base64().startswith("iVBORw0KGgo")  # base64 of the PNG signature
