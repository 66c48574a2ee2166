"""Model spec, architectures, labels and per-task settings validation."""

from __future__ import annotations

import pytest
import torch

from registry.architectures import ARCHITECTURES
from registry.errors import SpecError
from registry.labels import read_labels, validate_labels
from registry.settings import build_settings, parse_assignments, with_overrides
from registry.spec import build_module, make_spec


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_builds_with_its_gradcam_layer(arch):
    spec = make_spec(arch, 4, "multiclass")
    model = build_module(spec)
    assert spec.gradcam_layer in dict(model.named_modules())
    with torch.inference_mode():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_gradcam_defaults_follow_the_reference_layers():
    assert make_spec("resnet18", 2, "multiclass").gradcam_layer == "layer4.1"  # layer4[-1]
    assert make_spec("resnet50", 2, "multiclass").gradcam_layer == "layer4.2"
    assert make_spec("mobilenet_v3_small", 2, "multiclass").gradcam_layer == "features.12"  # features[-1]
    assert make_spec("small_cnn", 2, "multiclass").gradcam_layer == "features.3"


def test_spec_refusals_name_the_problem():
    with pytest.raises(SpecError, match="unknown architecture 'vgg99'"):
        make_spec("vgg99", 3, "multiclass")
    with pytest.raises(SpecError, match="task"):
        make_spec("small_cnn", 3, "detection")
    with pytest.raises(SpecError, match="num_classes"):
        make_spec("small_cnn", 0, "multiclass")
    with pytest.raises(SpecError, match="'layer9' is not a module of small_cnn"):
        build_module(make_spec("small_cnn", 3, "multiclass", gradcam_layer="layer9"))


def test_settings_defaults_match_the_spec():
    assert build_settings("multiclass").model_dump() == {"valid_resize_size": 256, "valid_crop_size": 224}
    assert build_settings("multilabel").confidence_score_threshold_multilabel == 0.5


def test_settings_refusals():
    with pytest.raises(SpecError, match="box_score_thresh: unknown setting"):
        build_settings("multiclass", {"box_score_thresh": 0.3})
    with pytest.raises(SpecError, match="valid_crop_size \\(300\\) must not exceed valid_resize_size \\(256\\)"):
        build_settings("multiclass", {"valid_crop_size": 300})
    with pytest.raises(SpecError, match="valid_crop_size"):
        build_settings("multiclass", {"valid_crop_size": "big"})
    with pytest.raises(SpecError, match="confidence_score_threshold_multilabel"):
        build_settings("multilabel", {"confidence_score_threshold_multilabel": 2})
    with pytest.raises(SpecError, match="confidence_score_threshold_multilabel: Input should be a finite number"):
        build_settings("multilabel", {"confidence_score_threshold_multilabel": "nan"})  # as `--set` passes it
    with pytest.raises(SpecError, match="unknown setting"):  # multi-label-only setting on a multi-class model
        build_settings("multiclass", {"confidence_score_threshold_multilabel": 0.4})


def test_overrides_from_strings_are_converted_and_validated_as_a_whole():
    base = build_settings("multiclass")
    updated = with_overrides(base, "multiclass", parse_assignments(["valid_crop_size=192"]))
    assert updated.valid_crop_size == 192 and updated.valid_resize_size == 256
    with pytest.raises(SpecError, match="key=value"):
        parse_assignments(["valid_crop_size"])


def test_labels_from_text_and_json(tmp_path):
    (tmp_path / "a.txt").write_text("cat\n\ndog\n")
    (tmp_path / "b.json").write_text('["cat", "dog"]')
    assert read_labels(tmp_path / "a.txt") == ["cat", "dog"]
    assert read_labels(tmp_path / "b.json") == ["cat", "dog"]
    with pytest.raises(SpecError, match="repeated: cat"):
        validate_labels(["cat", "cat"])
    with pytest.raises(SpecError, match="empty"):
        validate_labels([])
    with pytest.raises(SpecError, match="not found"):
        read_labels(tmp_path / "none.txt")
