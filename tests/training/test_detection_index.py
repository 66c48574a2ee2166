"""Detection and instance-segmentation labels in the cloud's JSONL format (training/detection_index.py): the
documentation's own spellings are read, and a malformed line is refused naming its number and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from registry.errors import LanternError
from training.detection_index import detection_labels, read_detection_index

BOX = {"label": "can", "topX": 0.25, "topY": 0.5, "bottomX": 0.75, "bottomY": 1.0, "isCrowd": 0}
TRIANGLE = [0.1, 0.2, 0.5, 0.2, 0.3, 0.6]


def index_of(tmp_path: Path, *lines: dict | str) -> Path:
    index = tmp_path / "index.jsonl"
    index.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return index


def test_the_documentations_spellings_are_read(tmp_path: Path) -> None:
    """Numbers and booleans as strings, sizes in px, one label object instead of a list, and a crowd."""
    index = index_of(
        tmp_path,
        {"image_url": "images/1.jpg", "image_details": {"format": "jpg", "width": "2230px", "height": "1632px"},
         "label": [{"label": "can", "topX": "0.25", "topY": "0.5", "bottomX": "0.75", "bottomY": "1", "isCrowd": "1"},
                   {**BOX, "label": "carton", "isCrowd": "false"}]},
        {"image_url": "file:///data/2.jpg", "label": {**BOX, "isCrowd": "true"}},
        "",  # blank lines are skipped
        {"image_url": "3.jpg", "image_details": {"width": 640, "height": "480"}, "label": []})
    first, second, third = read_detection_index(index, "object_detection")
    assert first.path == tmp_path / "images/1.jpg" and (first.width, first.height) == (2230, 1632)
    assert [(o.label, o.box, o.is_crowd) for o in first.objects] == [
        ("can", (0.25, 0.5, 0.75, 1.0), True), ("carton", (0.25, 0.5, 0.75, 1.0), False)]
    assert second.path == Path("/data/2.jpg") and second.objects[0].is_crowd and second.width is None
    assert third.objects == () and (third.width, third.height) == (640, 480)
    assert detection_labels([first, second, third]) == ["can", "carton"]


def test_a_polygon_gives_the_box_when_there_is_none(tmp_path: Path) -> None:
    index = index_of(tmp_path, {"image_url": "1.png", "label": [{"label": "roof", "isCrowd": 0,
                                                                "polygon": [TRIANGLE, [0.6, 0.6, 0.9, 0.6, 0.9, 0.7]]}]})
    for task in ("object_detection", "instance_segmentation"):
        (example,) = read_detection_index(index, task)
        (obj,) = example.objects
        assert obj.box == (0.1, 0.2, 0.9, 0.7) and obj.polygons == (tuple(TRIANGLE), (0.6, 0.6, 0.9, 0.6, 0.9, 0.7))


@pytest.mark.parametrize("line, named", [
    ('{"image_url": "1.png", "label": [', "index.jsonl:2: not JSON"),
    ({"image_url": "1.png"}, "index.jsonl:2: invalid line: label: Field required"),
    ({"image_url": "1.png", "label": [{**BOX, "topX": "left"}]}, "label.0.topX: Input should be a valid number"),
    ({"image_url": "1.png", "label": [{**BOX, "bottomY": 1.5}]}, "label.0.bottomY: Input should be less than or equal"),
    ({"image_url": "1.png", "label": [{**BOX, "topX": 0.9}]}, "label.0: a box needs topX < bottomX and topY < bottomY"),
    ({"image_url": "1.png", "label": [{"label": "can", "topX": 0.1}]}, "label.0: a box needs all of topX"),
    ({"image_url": "1.png", "label": [{"label": "can"}]}, "label.0: an object needs a box"),
    ({"image_url": "1.png", "label": [{"label": "can", "polygon": [[0.1, 0.2, 0.3]]}]},
     "label.0.polygon: a polygon is a flat list"),
    ({"image_url": "1.png", "label": [{**BOX, "isCrowd": "maybe"}]}, "label.0.isCrowd: Input should be a valid boolean"),
    ({"image_url": "1.png", "label": [{**BOX, "colour": "red"}]}, "label.0.colour: unknown field"),
    ({"image_url": "1.png", "image_details": {"width": "wide"}, "label": []}, "image_details.width"),
    ({"image_url": "https://example.com/1.png", "label": []}, "index.jsonl:2: image_url: only local image paths"),
])
def test_a_malformed_line_is_refused_naming_the_line_and_field(tmp_path: Path, line: dict | str, named: str) -> None:
    index = index_of(tmp_path, {"image_url": "0.png", "label": [BOX]}, line)
    with pytest.raises(LanternError) as refused:
        read_detection_index(index, "object_detection")
    assert named in str(refused.value) and "index.jsonl:2" in str(refused.value), str(refused.value)


def test_instance_segmentation_needs_a_polygon_for_each_object_but_a_crowd(tmp_path: Path) -> None:
    crowd = {**BOX, "isCrowd": 1}
    (example,) = read_detection_index(index_of(tmp_path, {"image_url": "1.png", "label": [crowd]}),
                                      "instance_segmentation")
    assert example.objects[0].is_crowd and example.objects[0].polygons == ()
    with pytest.raises(LanternError, match=r"index.jsonl:1: label.1.polygon: instance segmentation needs a polygon"):
        read_detection_index(index_of(tmp_path, {"image_url": "1.png", "label": [crowd, BOX]}), "instance_segmentation")


def test_an_empty_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LanternError, match="holds no images"):
        read_detection_index(index_of(tmp_path, ""), "object_detection")
