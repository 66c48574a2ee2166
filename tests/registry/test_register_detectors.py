"""Registering detectors and instance segmenters trained on shapes: their ONNX export checked against torch after
matching detections (or, where it is not faithful, a version for the torch backend that says why), the pyfunc model's
answers in the cloud's form, and new versions with new settings."""

from __future__ import annotations

import base64
import io
import subprocess
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from skimage.draw import polygon2mask

from registry.errors import LanternError, SpecError
from registry.model_files import TAG_BACKENDS, TAG_ONNX_REFUSED, TAG_PARITY
from registry.register import register_checkpoint, register_session_checkpoint, register_settings_update
from registry.resolve import load_bundle
from serving.config import DeploymentConfig
from serving.control.checks import check_deployment
from support.common import lantern_executable
from training.session import Session
from training.shapes_instances import InstanceShapesConfig, make_instance_sample

LABELS = ["circle", "square", "triangle"]


def shapes_images(count: int, size: int = 96) -> list[Image.Image]:
    config = InstanceShapesConfig(image_size=size, seed=99, max_objects=4)
    return [make_instance_sample(config, index).image for index in range(count)]


def encoded(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def pyfunc_answers(uri: str, images: list[Image.Image]) -> list[list[dict]]:
    model = mlflow.pyfunc.load_model(uri)
    return list(model.predict(pd.DataFrame({"image": [encoded(image) for image in images]}))["boxes"])


def check_boxes(boxes: list[dict], threshold: float) -> None:
    scores = [found["score"] for found in boxes]
    assert scores == sorted(scores, reverse=True) and all(threshold <= score <= 1 for score in scores)
    for found in boxes:
        box = found["box"]
        assert set(box) == {"topX", "topY", "bottomX", "bottomY"}
        assert 0 <= box["topX"] < box["bottomX"] <= 1 and 0 <= box["topY"] < box["bottomY"] <= 1
        assert found["label"] in LABELS


def test_a_detector_registers_with_a_faithful_onnx_export_and_answers_boxes(store: str, trained_detector: Path) -> None:
    registered = register_session_checkpoint("detector", trained_detector, alias="champion")
    assert registered.onnx_max_abs_diff is not None and registered.onnx_max_abs_diff < 1e-3
    assert registered.onnx_refused is None
    tags = MlflowClient(store, store).get_model_version("detector", "1").tags
    assert (tags[TAG_BACKENDS], tags["lantern.task"], tags["lantern.arch"]) == (
        "onnxruntime,torch", "object_detection", "small_detector")
    bundle = load_bundle("models:/detector@champion")
    assert bundle.onnx_path is not None and bundle.onnx_path.is_file()
    assert bundle.spec.gradcam_layer is None and bundle.labels == LABELS
    assert bundle.module.roi_heads.score_thresh == bundle.settings.box_score_thresh == 0.3
    assert bundle.module.transform.min_size == (96,)

    answers = pyfunc_answers("models:/detector/1", shapes_images(4))
    assert len(answers) == 4 and sum(len(boxes) for boxes in answers) > 0
    for boxes in answers:
        check_boxes(boxes, 0.3)
        assert all("polygon" not in found and "mask" not in found for found in boxes)

    stricter = register_settings_update("detector", 1, {"box_score_thresh": "0.6", "box_detections_per_img": "2"})
    assert stricter.version == 2 and stricter.onnx_max_abs_diff is not None  # exported again: settings are in the graph
    fewer = pyfunc_answers("models:/detector/2", shapes_images(4))
    for before, after in zip(answers, fewer):
        check_boxes(after, 0.6)
        assert len(after) <= min(2, len(before))
        assert [found["box"] for found in after] == [found["box"] for found in before if found["score"] >= 0.6][:2]


def test_a_detector_that_does_not_export_faithfully_is_registered_for_torch(store: str,
                                                                           trained_detector: Path) -> None:
    exported = register_session_checkpoint("faithful", trained_detector)
    refused = register_session_checkpoint("torch-only", trained_detector, parity_tolerance=0.0)
    if exported.onnx_max_abs_diff == 0.0:
        pytest.skip("ONNX Runtime matched torch exactly: nothing to refuse at tolerance 0")
    assert refused.onnx_max_abs_diff is None and refused.onnx_refused.startswith("ParityError: ")
    tags = MlflowClient(store, store).get_model_version("torch-only", "1").tags
    assert tags[TAG_BACKENDS] == "torch" and tags[TAG_ONNX_REFUSED] == refused.onnx_refused
    assert TAG_PARITY not in tags
    bundle = load_bundle("models:/torch-only/1")
    assert bundle.onnx_path is None and bundle.onnx_max_abs_diff is None
    images = shapes_images(3)
    by_torch, by_onnx = pyfunc_answers("models:/torch-only/1", images), pyfunc_answers("models:/faithful/1", images)
    for a, b in zip(by_torch, by_onnx):
        assert [found["label"] for found in a] == [found["label"] for found in b]
        assert np.allclose([list(f["box"].values()) for f in a], [list(f["box"].values()) for f in b], atol=1e-4)

    shown = subprocess.run([lantern_executable(), "models", "show", "torch-only/1", "--json"], capture_output=True,
                           text=True, timeout=120, check=True)
    assert '"backends": [\n    "torch"\n  ]' in shown.stdout and "ParityError" in shown.stdout


def test_segmenter_answers_carry_polygons_on_their_masks(store: str, trained_segmenter: Path) -> None:
    settings = {"box_score_thresh": "0.05", "max_number_of_polygon_points": "12", "export_as_image": "true",
                "image_type": "PNG"}
    registered = register_session_checkpoint("segmenter", trained_segmenter, settings_overrides=settings)
    assert registered.onnx_max_abs_diff is not None
    images = shapes_images(2)
    answers = pyfunc_answers(registered.uri, images)
    found_any, overlaps = 0, []
    for image, boxes in zip(images, answers):
        check_boxes(boxes, 0.05)
        for found in boxes:
            assert sum(len(ring) for ring in found["polygon"]) <= 2 * 12
            mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(found["mask"])))) > 127
            assert mask.shape == (image.height, image.width)
            if mask.sum() < 30:
                continue
            drawn = np.zeros_like(mask)
            for ring in found["polygon"]:
                points = np.asarray(ring).reshape(-1, 2) * [image.width, image.height] - 0.5
                drawn |= polygon2mask(mask.shape, points[:, ::-1])
            overlap = (drawn & mask).sum() / (drawn | mask).sum()
            on_mask = (drawn & mask).sum() / drawn.sum()
            # 12 points outline a ragged mask of several parts coarsely, but never off it
            assert on_mask >= 0.8 and overlap >= 0.5, f"polygon: IoU {overlap:.2f} with its mask, {on_mask:.0%} on it"
            overlaps.append(overlap)
            found_any += 1
    assert found_any > 0 and np.median(overlaps) > 0.85


def test_refusals(store: str, trained_detector: Path, tmp_path: Path) -> None:
    weights = Session(trained_detector).latest().path / "weights.safetensors"
    with pytest.raises(SpecError, match="resnet18 is a classifier; object_detection needs a detector"):
        register_checkpoint("x", weights, "resnet18", LABELS, "object_detection")
    with pytest.raises(SpecError, match="a detector has no Grad-CAM layer"):
        register_checkpoint("x", weights, "small_detector", LABELS, "object_detection", gradcam_layer="backbone.0")
    with pytest.raises(SpecError, match="box_score_thresh"):
        register_checkpoint("x", weights, "small_detector", LABELS, "object_detection", {"box_score_thresh": 2})
    with pytest.raises(SpecError, match="valid_crop_size: unknown setting"):
        register_checkpoint("x", weights, "small_detector", LABELS, "object_detection", {"valid_crop_size": 64})

    register_checkpoint("boxes", weights, "small_detector", LABELS, "object_detection", {"min_size": 96})
    checked = check_deployment(DeploymentConfig(name="blue", model="models:/boxes/1",
                                                settings={"box_score_thresh": 0.5}))
    assert (checked.version, checked.task) == ("models:/boxes/1", "object_detection")
    with pytest.raises(LanternError, match="valid_crop_size: unknown setting"):
        check_deployment(DeploymentConfig(name="blue", model="models:/boxes/1", settings={"valid_crop_size": 64}))
