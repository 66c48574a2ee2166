"""Registering checkpoints in a real (temporary) MLflow store, and loading them back."""

from __future__ import annotations

import base64
import json

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from registry.errors import CheckpointError, ModelNotFoundError, SpecError
from registry.images import decode_image
from registry.preprocess import Preprocess
from registry.references import parse_model_ref
from registry.register import register_checkpoint, register_settings_update
from registry.resolve import load_bundle
from support.common import LABELS, SMALL_SETTINGS


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_each_checkpoint_format_registers_with_its_artifacts(store, checkpoints, small_model, fmt):
    result = register_checkpoint("shapes", checkpoints[fmt], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS,
                                 alias="champion")
    assert (result.name, result.version, result.alias) == ("shapes", 1, "champion")
    assert result.onnx_max_abs_diff < 1e-3
    client = MlflowClient(store, store)
    run = client.get_run(result.run_id)
    assert run.data.metrics["onnx_max_abs_diff"] == pytest.approx(result.onnx_max_abs_diff)
    assert run.data.params["arch"] == "small_cnn"
    assert len(client.search_registered_models()) == 1

    bundle = load_bundle("models:/shapes@champion")
    assert (bundle.version, bundle.labels, bundle.spec.task) == (1, LABELS, "multiclass")
    assert bundle.settings.valid_crop_size == 32 and bundle.aliases == ["champion"]
    assert bundle.onnx_path.is_file() and bundle.run_id == result.run_id
    saved = load_file(str(bundle.files.weights))
    assert all(torch.equal(saved[k], v) for k, v in small_model.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.allclose(bundle.module(x), small_model(x))
    for name in ("settings.json", "spec.json", "labels.json", "model.onnx", "weights.safetensors"):
        assert (bundle.files.weights.parent / name).is_file()
    assert json.loads(bundle.files.settings.read_text()) == SMALL_SETTINGS


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"labels": ["a", "b", "c", "d"]}, CheckpointError, "classifier.weight: checkpoint \\(3, 128\\) vs model \\(4, 128\\)"),
        ({"num_classes": 4}, SpecError, "num_classes is 4 but the labels file lists 3 labels"),
        ({"arch": "resnet18"}, CheckpointError, "missing key"),
        ({"settings": {"valid_resize_size": 40, "valid_crop_size": 64}}, SpecError, "must not exceed valid_resize_size"),
        ({"settings": {"nms_iou_thresh": 0.5}}, SpecError, "nms_iou_thresh: unknown setting"),
        ({"name": "bad/name"}, SpecError, "invalid model name"),
        ({"alias": "latest"}, SpecError, "reserved"),
    ],
)
def test_refusals_name_the_problem_and_register_nothing(store, checkpoints, kwargs, error, match):
    args = {"name": "shapes", "labels": LABELS, "arch": "small_cnn", "settings": SMALL_SETTINGS, **kwargs}
    with pytest.raises(error, match=match):
        register_checkpoint(args["name"], checkpoints["pt"], args["arch"], args["labels"], "multiclass",
                            args["settings"], alias=args.get("alias"), num_classes=args.get("num_classes"))
    mlflow.set_tracking_uri(store)
    assert MlflowClient(store, store).search_registered_models() == []


def test_settings_update_registers_a_new_version_and_leaves_the_old_one(store, checkpoints):
    register_checkpoint("shapes", checkpoints["pt"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    result = register_settings_update("shapes", 1, {"valid_crop_size": "24"})
    assert result.version == 2
    old, new = load_bundle("models:/shapes/1"), load_bundle("models:/shapes/2")
    assert old.settings.valid_crop_size == 32 and new.settings.valid_crop_size == 24
    assert new.settings.valid_resize_size == 40 and new.derived_from == "shapes/1"
    assert old.files.weights.read_bytes() == new.files.weights.read_bytes()
    with pytest.raises(SpecError, match="unknown setting"):
        register_settings_update("shapes", 1, {"box_score_thresh": "0.2"})
    with pytest.raises(SpecError, match="already have these values"):
        register_settings_update("shapes", 2, {"valid_crop_size": "24"})
    with pytest.raises(ModelNotFoundError, match="models:/shapes/9 does not exist"):
        register_settings_update("shapes", 9, {"valid_crop_size": "24"})
    assert len(MlflowClient(store, store).search_model_versions("name='shapes'")) == 2


def test_pyfunc_model_predicts_labels_and_probabilities(store, checkpoints, shapes_dir):
    register_checkpoint("shapes", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS,
                        alias="champion")
    model = mlflow.pyfunc.load_model("models:/shapes@champion")
    paths = sorted((shapes_dir / "images").iterdir())[:3]
    images = [base64.b64encode(p.read_bytes()).decode() for p in paths]
    out = model.predict(pd.DataFrame({"image": images}))
    assert list(out.columns) == ["predicted", "probs", "labels"] and len(out) == 3
    bundle = load_bundle("models:/shapes@champion")
    prep = Preprocess.for_model(bundle.spec, bundle.settings)
    with torch.inference_mode():
        expected = torch.softmax(bundle.module(prep.batch([decode_image(p.read_bytes()) for p in paths])), 1).numpy()
    for row, probs in zip(out.itertuples(), expected):
        assert row.labels == LABELS
        np.testing.assert_allclose(row.probs, probs, atol=1e-4)
        assert row.predicted == LABELS[int(np.argmax(probs))]


def test_multilabel_pyfunc_returns_label_lists(store, tmp_path, shapes_dir):
    from registry.small_cnn import SmallCNN

    torch.manual_seed(1)
    model = SmallCNN(3)
    torch.nn.init.constant_(model.classifier.bias, 0.0)
    model.classifier.bias.data[1] = 5.0  # "square" always above the threshold
    torch.save(model.state_dict(), tmp_path / "ml.pt")
    register_checkpoint("multi", tmp_path / "ml.pt", "small_cnn", LABELS, "multilabel",
                        {**SMALL_SETTINGS, "confidence_score_threshold_multilabel": 0.6})
    out = mlflow.pyfunc.load_model("models:/multi/1").predict(pd.DataFrame(
        {"image": [base64.b64encode(p.read_bytes()).decode() for p in sorted((shapes_dir / "images").iterdir())[:2]]}))
    for row in out.itertuples():
        assert "square" in row.predicted and all(isinstance(x, str) for x in row.predicted)
        assert [LABELS[i] for i, p in enumerate(row.probs) if p > 0.6] == list(row.predicted)


def test_model_references_and_unknown_versions(store, checkpoints):
    register_checkpoint("shapes", checkpoints["pt"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    register_checkpoint("shapes", checkpoints["pt"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS, alias="next")
    assert load_bundle("shapes").version == 2  # bare name: the latest version
    assert load_bundle("models:/shapes/1").version == 1
    assert load_bundle("shapes@next").version == 2
    with pytest.raises(ModelNotFoundError, match="aliases: @next"):
        load_bundle("models:/shapes@champion")
    with pytest.raises(ModelNotFoundError, match="no registered model named 'absent'"):
        load_bundle("models:/absent/1")
    for bad in ("https://example.com/model.pt", "models:/a/b/c", "runs:/abc/model"):
        with pytest.raises(Exception, match="not a registered model reference"):
            parse_model_ref(bad, allow_short=False)
