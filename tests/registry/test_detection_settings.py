"""Detection and instance-segmentation settings (registry/settings.py): SPEC.md section 1's defaults, the cloud's
spellings, ranges checked and unknown keys refused, each problem named."""

from __future__ import annotations

import pytest

from registry.errors import SpecError
from registry.settings import DetectionSettings, SegmentationSettings, build_settings, with_overrides


def test_defaults_are_the_specs() -> None:
    detection = build_settings("object_detection")
    assert isinstance(detection, DetectionSettings) and not isinstance(detection, SegmentationSettings)
    assert detection.model_dump() == {
        "min_size": 600, "max_size": 1333, "box_score_thresh": 0.3, "nms_iou_thresh": 0.5,
        "box_detections_per_img": 100, "tile_grid_size": None, "tile_overlap_ratio": 0.25,
        "tile_predictions_nms_thresh": 0.25}
    segmentation = build_settings("instance_segmentation")
    assert segmentation.model_dump() == {**detection.model_dump(), "mask_pixel_score_threshold": 0.5,
                                         "max_number_of_polygon_points": 100, "export_as_image": False,
                                         "image_type": "JPG"}


@pytest.mark.parametrize("grid", ["(3, 2)", "3x2", "3,2", [3, 2]])
def test_values_as_the_cloud_writes_them(grid: object) -> None:
    settings = build_settings("instance_segmentation", {"tile_grid_size": grid, "box_score_thresh": "0.6",
                                                        "export_as_image": "true", "image_type": "PNG"})
    assert settings.tile_grid_size == (3, 2) and settings.box_score_thresh == 0.6
    assert settings.export_as_image is True and settings.image_type == "PNG"
    again = build_settings("instance_segmentation", settings.model_dump(mode="json"))  # settings.json round trip
    assert again == settings


@pytest.mark.parametrize("task, values, named", [
    ("object_detection", {"box_score_thresh": 1.5}, "box_score_thresh: Input should be less than or equal to 1"),
    ("object_detection", {"min_size": 900, "max_size": 800}, "min_size (900) must not exceed max_size (800)"),
    ("object_detection", {"box_detections_per_img": 0}, "box_detections_per_img: Input should be greater than"),
    ("object_detection", {"tile_grid_size": "3 by 2"}, "tile_grid_size:"),
    ("object_detection", {"tile_grid_size": [3, 40]}, "tile_grid_size.1: Input should be less than or equal to 16"),
    ("object_detection", {"tile_overlap_ratio": 1.0}, "tile_overlap_ratio: Input should be less than 1"),
    ("object_detection", {"nms_iou_thresh": float("nan")}, "nms_iou_thresh:"),
    ("object_detection", {"mask_pixel_score_threshold": 0.5}, "mask_pixel_score_threshold: unknown setting"),
    ("object_detection", {"valid_crop_size": 224}, "valid_crop_size: unknown setting"),
    ("instance_segmentation", {"image_type": "GIF"}, "image_type: Input should be 'JPG', 'PNG' or 'BMP'"),
    ("instance_segmentation", {"max_number_of_polygon_points": 2}, "max_number_of_polygon_points:"),
])
def test_bad_values_are_named(task: str, values: dict, named: str) -> None:
    with pytest.raises(SpecError) as refused:
        build_settings(task, values)
    assert named in str(refused.value) and f"settings for task {task!r}" in str(refused.value), str(refused.value)


def test_overrides_make_new_settings_checked_as_a_whole() -> None:
    base = build_settings("object_detection", {"min_size": 320, "max_size": 640})
    assert with_overrides(base, "object_detection", {"box_score_thresh": 0.7}).box_score_thresh == 0.7
    assert base.box_score_thresh == 0.3
    with pytest.raises(SpecError, match="must not exceed max_size"):
        with_overrides(base, "object_detection", {"min_size": 700})


def test_an_unknown_task_names_every_task() -> None:
    with pytest.raises(SpecError, match="accepted: multiclass, multilabel, object_detection, instance_segmentation"):
        build_settings("keypoints")
