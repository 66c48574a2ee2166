"""Explanations: parameters, integrated gradients vs captum, completeness, guided methods on real architectures,
multi-label targets, encodings, the 2 x 2 visualisation, and the pointing game on a trained shapes model."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum.attr import GuidedBackprop, IntegratedGradients, Saliency
from PIL import Image
from scipy import ndimage
from scipy.stats import spearmanr
from safetensors.torch import load_file
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from explain.attribute import IMAGENET_MEAN, IMAGENET_STD, attribute
from explain.encoding import decode_npy_base64
from explain.guided import guided_backprop
from explain.integrated import PATH_MEMORY_BUDGET, activation_bytes, path_batch_size
from explain.layout import fastest_layout
from explain.params import ExplainError, parse_params
from registry.architectures import ARCHITECTURES
from registry.small_cnn import SmallCNN
from registry.model_files import WEIGHTS, ModelFiles
from registry.preprocess import Preprocess
from registry.spec import build_module
from training.datasets import load_uint8
from training.loop import TrainResult
from training.session import Session


@pytest.fixture(scope="module")
def cnn() -> SmallCNN:
    torch.manual_seed(1)
    return SmallCNN(3).eval()


def image_tensor(seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed))


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / max(float(b.norm()), 1e-30))


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
    ours = attribute(cnn, x, "integrated_gradients", {"n_steps": 24, "internal_batch_size": 7})
    black = ((torch.zeros(3) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    reference = IntegratedGradients(cnn).attribute(x[None], baselines=black.expand(1, 3, 32, 32), target=ours.targets,
                                                   n_steps=24, method="riemann_middle")
    assert torch.allclose(ours.attributions, reference, rtol=1e-5, atol=1e-7)
    unbatched = attribute(cnn, x, "integrated_gradients", {"n_steps": 24})
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
    expected = attribute(cnn, x, method, params)
    limited = MemoryLimited(cnn, most=5)
    torch.manual_seed(0)
    explained = attribute(limited, x, method, params)  # a retry adds the same SmoothGrad noise as the failed pass
    assert torch.allclose(explained.attributions, expected.attributions, rtol=1e-5, atol=1e-7)
    assert max(limited.batches) > 5 and explained.fidelity.internal_batch_size <= 5  # it did run out, then fitted
    limited.batches.clear()
    torch.manual_seed(0)
    again = attribute(limited, x, method, params)
    assert max(limited.batches) <= 5 and again.fidelity.internal_batch_size == explained.fidelity.internal_batch_size
    assert torch.allclose(again.attributions, expected.attributions, rtol=1e-5, atol=1e-7)
    with pytest.raises(torch.OutOfMemoryError):  # a size the caller chose is kept, out of memory or not
        attribute(MemoryLimited(cnn, most=5), x, method, {**params, "internal_batch_size": 8})
    with pytest.raises(torch.OutOfMemoryError):  # one step of every row a pass does not fit: nothing left to halve
        attribute(MemoryLimited(cnn, most=0), x, method, params)


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
                                                                 "approximation_method": "gausslegendre"})
        report = explanation.fidelity
        with torch.no_grad():
            gap = report.target_scores[0] - float(cnn(black.expand(1, 3, 32, 32))[0, report.targets[0]])
        assert report.completeness_error[0] == pytest.approx(
            abs(float(explanation.attributions.sum()) - gap) / abs(gap), rel=1e-3, abs=1e-6)
        errors.append(report.completeness_error[0])
    assert errors[0] > errors[1] > errors[2] > 0


def test_smoothgrad_averages_noisy_copies(cnn: SmallCNN) -> None:
    x = image_tensor(3)
    plain = attribute(cnn, x, "integrated_gradients", {"n_steps": 8})
    torch.manual_seed(0)
    smooth = attribute(cnn, x, "integrated_gradients", {"n_steps": 8, "smoothgrad_samples": 3})
    assert smooth.attributions.shape == plain.attributions.shape
    assert relative_difference(smooth.attributions, plain.attributions) > 1e-3


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
    backprop = attribute(model, x, "guided_backprop", targets=[1])
    cam = attribute(model, x, "guided_gradcam", targets=[1], gradcam_layer=ARCHITECTURES[arch].gradcam_layer)
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
        expected = attribute(model, x, method, params, targets=[1], gradcam_layer=layer)
        got = attribute(fast, x, method, params, targets=[1], gradcam_layer=layer)
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
    assert attribute(cnn, x, "guided_backprop").targets == [int(logits.argmax())]  # the top class by default
    everything = attribute(cnn, x, "guided_backprop", targets=lambda scores: list(range(len(scores))))
    assert everything.targets == [0, 1, 2] and everything.attributions.shape == (3, 3, 32, 32)
    top = attribute(cnn, x, "guided_backprop", targets=lambda scores: [int(scores.argmax())])
    assert top.targets == [int(logits.argmax())]
    none = attribute(cnn, x, "guided_backprop", targets=lambda scores: [])  # no label over a multi-label threshold
    assert none.targets == [] and none.attributions.shape[0] == 0 and "nothing to explain" in none.fidelity.notes[0]
    named = attribute(cnn, x, "integrated_gradients", {"n_steps": 4}, targets=[2])
    assert named.targets == [2]
    twice = attribute(cnn, x, "guided_backprop", targets=[2, 0, 2])
    assert twice.targets == [2, 0] and twice.attributions.shape == (2, 3, 32, 32)
    assert torch.allclose(twice.attributions[0], attribute(cnn, x, "guided_backprop", targets=[2]).attributions[0],
                          atol=1e-6)
    with pytest.raises(ExplainError, match="target class 3 does not exist; the model has classes 0..2"):
        attribute(cnn, x, "guided_backprop", targets=[3])
    with pytest.raises(ExplainError, match="no layer 'features.9'"):
        attribute(cnn, x, "guided_gradcam", gradcam_layer="features.9")
    with pytest.raises(ExplainError, match=r"\[3, H, W\]"):
        attribute(cnn, torch.randn(2, 3, 32, 32), "guided_backprop")


def test_encodings_and_the_two_by_two_png(cnn: SmallCNN) -> None:
    explanation = attribute(cnn, image_tensor(4), "integrated_gradients", {"n_steps": 8})
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


def _trained_model(trained: TrainResult) -> tuple[nn.Module, Preprocess, list, object, object]:
    from training.sources import load_data

    session = Session(trained.session_dir)
    meta = session.read_meta()
    checkpoint = session.latest().path
    model = build_module(meta.spec)
    model.load_state_dict(load_file(str(checkpoint / WEIGHTS)))
    settings = ModelFiles.in_dir(checkpoint).read_settings(meta.spec.task)
    validation = load_data(meta.config, session.dir / "data").val
    return model.eval(), Preprocess.for_model(meta.spec, settings), validation, meta.spec, settings


def test_completeness_below_one_percent_with_gausslegendre_50(trained_shapes: TrainResult,
                                                              capsys: pytest.CaptureFixture) -> None:
    model, preprocess, validation, _spec, _settings = _trained_model(trained_shapes)
    errors = [
        attribute(model, preprocess(load_uint8(example.path)), "integrated_gradients",
                  {"n_steps": 50, "approximation_method": "gausslegendre"}).fidelity.completeness_error[0]
        for example in validation[:30]
    ]
    with capsys.disabled():
        print(f"\nIG completeness error, gausslegendre 50 steps, trained small CNN, 30 validation images: "
              f"median {np.median(errors):.2%}, mean {np.mean(errors):.2%}, max {np.max(errors):.2%}")
    assert np.median(errors) < 0.01


POINTING_TOLERANCE_AT_224 = 15


def _peak(scores: np.ndarray) -> tuple[int, int]:
    """The maximum's position; when a whole region ties for it (XRAI gives one value per region), the region's
    pixel nearest to its centroid rather than its first pixel in raster order."""
    ties = np.argwhere(scores == scores.max())
    centre = ties.mean(axis=0)
    row, col = ties[np.argmin(((ties - centre) ** 2).sum(axis=1))]
    return int(row), int(col)


def _crop_mask(mask_path: Path, resize: int, crop: int) -> np.ndarray:
    mask = torch.from_numpy(np.array(Image.open(mask_path)))[None]  # a copy: PIL's buffer is read-only
    mask = TF.resize(mask, [resize], interpolation=InterpolationMode.NEAREST)
    return TF.center_crop(mask, [crop, crop])[0].numpy()


@pytest.mark.parametrize("method, count, params", [
    ("guided_gradcam", 150, None),
    ("integrated_gradients", 150, None),
    ("xrai", 40, {"n_steps": 20}),  # XRAI segments every image at 224 px: fewer images keep the suite short
])
def test_pointing_game_on_the_trained_shapes_model(trained_shapes: TrainResult, method: str, count: int,
                                                    params: dict | None, capsys: pytest.CaptureFixture) -> None:
    model, preprocess, validation, spec, settings = _trained_model(trained_shapes)
    validation = validation[:count]
    tolerance = POINTING_TOLERANCE_AT_224 * settings.valid_crop_size / 224  # TorchRay's 15 px, scaled to the crop
    hits = strict_hits = 0
    for example in validation:
        cropped = preprocess.crop(load_uint8(example.path))
        x = preprocess.normalize(cropped)
        explanation = attribute(model, x, method, params, gradcam_layer=spec.gradcam_layer,
                                image=cropped.permute(1, 2, 0).numpy())
        raw = explanation.attributions[0].numpy()  # not the display scale, which saturates the top values
        scores = raw[0] if method == "xrai" else np.abs(raw.sum(axis=0))
        peak = _peak(scores)
        mask = _crop_mask(example.mask, settings.valid_resize_size, settings.valid_crop_size) > 0
        distance = ndimage.distance_transform_edt(~mask)[peak]  # 0 inside the object
        hits += int(distance <= tolerance)
        strict_hits += int(distance == 0)
    rate = hits / len(validation)
    with capsys.disabled():
        print(f"\npointing game, {method}, trained small CNN, {len(validation)} validation images: {rate:.1%} "
              f"within {tolerance:.1f} px of the object (TorchRay's 15 px at 224), {strict_hits / len(validation):.1%} "
              "inside it")
    assert rate >= 0.90
    assert json.loads(explanation.fidelity.model_dump_json())["method"] == method


def test_explain_command_writes_the_png_and_the_report(trained_shapes: TrainResult, store: str, tmp_path: Path) -> None:
    import subprocess

    from registry.register import register_session_checkpoint
    from support.common import lantern_executable

    registered = register_session_checkpoint("explained", trained_shapes.session_dir, alias="champion")
    _model, _preprocess, validation, _spec, _settings = _trained_model(trained_shapes)
    example = validation[0]
    out, npy = tmp_path / "heatmap.png", tmp_path / "attributions.npy"
    done = subprocess.run(
        [lantern_executable(), "explain", str(example.path), "--model", "models:/explained@champion",
         "--method", "integrated_gradients", "--param", "n_steps=16", "--param", "approximation_method=gausslegendre",
         "--out", str(out), "--attributions", str(npy)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["model"] == registered.uri and report["labels"] == list(example.labels)
    assert report["params"]["n_steps"] == 16 and report["completeness_error"][0] >= 0
    assert Image.open(out).size == (512, 512)  # 64 px panels enlarged 4x
    assert np.load(npy).shape == (1, 3, 64, 64)

    refused = subprocess.run(
        [lantern_executable(), "explain", str(example.path), "--model", "models:/explained@champion",
         "--target", "hexagon"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "unknown label(s) hexagon" in refused.stderr
    bad_param = subprocess.run(
        [lantern_executable(), "explain", str(example.path), "--model", "models:/explained@champion",
         "--param", "n_steps=1"], capture_output=True, text=True, timeout=300)
    assert bad_param.returncode == 2 and "n_steps: Input should be greater than or equal to 2" in bad_param.stderr


def test_explain_command_explains_a_folder_into_out_dir(trained_shapes: TrainResult, store: str,
                                                        tmp_path: Path) -> None:
    """Several images (a folder, plus a file with the same stem elsewhere) go to --out-dir: a PNG and an .npy per
    image, one report line each; an unreadable file is reported and skipped (exit status 1), not the end of the run."""
    import shutil
    import subprocess

    from registry.register import register_session_checkpoint
    from support.common import lantern_executable

    register_session_checkpoint("batch-explained", trained_shapes.session_dir, alias="champion")
    _model, _preprocess, validation, _spec, _settings = _trained_model(trained_shapes)
    folder, other = tmp_path / "images", tmp_path / "other"
    folder.mkdir()
    other.mkdir()
    for example in validation[:3]:
        shutil.copy(example.path, folder / example.path.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "notes.txt").write_text("not an image: left out by its suffix")
    shutil.copy(validation[3].path, other / validation[0].path.name)  # the same stem as the folder's first image
    out_dir = tmp_path / "explained"
    command = [lantern_executable(), "explain", str(folder), str(other / validation[0].path.name),
               "--model", "models:/batch-explained@champion", "--method", "guided_backprop"]
    done = subprocess.run(command + ["--out-dir", str(out_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr  # one image failed; the others were explained
    assert "Warning" not in done.stderr, done.stderr  # captum's two warnings per guided explanation are expected noise
    summary = json.loads(done.stdout)
    assert summary["images"] == 5 and summary["explained"] == 4
    assert [Path(f["image"]).name for f in summary["failed"]] == ["broken.png"]
    assert "not a readable image" in summary["failed"][0]["error"]
    reports = [json.loads(line) for line in (out_dir / "reports.jsonl").read_text().splitlines()]
    assert len(reports) == 5 and sum("error" in r for r in reports) == 1
    explained = [r for r in reports if "error" not in r]
    stems = [validation[0].path.stem, validation[1].path.stem, validation[2].path.stem,
             f"{validation[0].path.stem}-2"]  # sorted folder first, then the file with the repeated stem
    assert sorted(r["attributions"] for r in explained) == sorted(f"{stem}.npy" for stem in stems)
    for report in explained:
        assert report["method"] == "guided_backprop" and len(report["labels"]) == 1
        assert Image.open(out_dir / report["visualizations"][0]).size == (512, 512)
        assert np.load(out_dir / report["attributions"]).shape == (1, 3, 64, 64)
    assert "guided_backprop 5/5" in done.stderr  # one progress line per image when stderr is not a terminal

    several = subprocess.run(command + ["--out", str(tmp_path / "x.png")], capture_output=True, text=True, timeout=300)
    assert several.returncode == 2 and "5 images to explain: give --out-dir DIR" in several.stderr
    bad = subprocess.run(command + ["--out-dir", str(out_dir), "--param", "n_steps=8"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "n_steps: not a parameter of guided_backprop" in bad.stderr
