"""A detector and an instance segmenter served over HTTP as a user calls them: the cloud's answers, each setting's
effect (score threshold, detections per image, tiling), both backends, refused explanations, a rollout between two
detector versions, and traffic splits that would mix answer formats refused."""

from __future__ import annotations

import base64
import io

import httpx
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from skimage.draw import polygon2mask

from support.operations import Admin, deployment
from support.scoring import row as scoring_row
from support.scoring import score_body
from support.servers import Server, multipart_body
from training.shapes_instances import InstanceShapesConfig, make_instance_sample

LABELS = ["circle", "square", "triangle"]
SIDE = 96


def samples(count: int, seed: int = 41, size: int = SIDE) -> list:
    config = InstanceShapesConfig(image_size=size, seed=seed, max_objects=4)
    return [make_instance_sample(config, index) for index in range(count)]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def score(server: Server, key: str, images: list[Image.Image], deployment_name: str | None = None,
          **row: object) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if deployment_name:
        headers["x-lantern-deployment"] = deployment_name
    return httpx.post(f"{server.url}/score", json=score_body(*(scoring_row(png(image), **row) for image in images)),
                      headers=headers, timeout=120)


def boxes_of(server: Server, key: str, images: list[Image.Image], deployment_name: str) -> list[list[dict]]:
    answer = score(server, key, images, deployment_name)
    assert answer.status_code == 200, answer.text
    items = answer.json()
    assert [item["deployment"] for item in items] == [deployment_name] * len(images)
    return [item["boxes"] for item in items]


def iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def corners(found: dict) -> tuple[float, float, float, float]:
    box = found["box"]
    return box["topX"], box["topY"], box["bottomX"], box["bottomY"]


def matched(objects: list, boxes: list[dict]) -> int:
    """How many of the true objects a detection of their label finds (IoU >= 0.5), each detection used once."""
    free = list(boxes)
    count = 0
    for obj in objects:
        hits = [b for b in free if b["label"] == obj.label and iou(obj.box, corners(b)) >= 0.5]
        if hits:
            free.remove(max(hits, key=lambda b: iou(obj.box, corners(b))))
            count += 1
    return count


def check_form(boxes: list[dict], threshold: float) -> None:
    scores = [found["score"] for found in boxes]
    assert scores == sorted(scores, reverse=True) and all(threshold <= s <= 1 for s in scores)
    for found in boxes:
        x0, y0, x1, y1 = corners(found)
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 and found["label"] in LABELS


def test_score_and_predict_answer_the_clouds_boxes(server: Server, keys: dict[str, str],
                                                   capsys: pytest.CaptureFixture) -> None:
    shapes = samples(8)
    answer = score(server, keys["primary"], [s.image for s in shapes])  # the live traffic: blue
    assert answer.status_code == 200, answer.text
    items = answer.json()
    assert {(item["deployment"], item["model_version"]) for item in items} == {("blue", "models:/boxes/1")}
    assert set(items[0]) == {"boxes", "deployment", "model_version"}
    for item in items:
        check_form(item["boxes"], 0.3)
        assert all(set(found) == {"box", "label", "score"} for found in item["boxes"])
    found = sum(matched(s.objects, item["boxes"]) for s, item in zip(shapes, items))
    total = sum(len(s.objects) for s in shapes)
    assert found >= 0.5 * total, f"the detector found {found} of {total} objects"
    with capsys.disabled():
        print(f"\nserved detector: {found} of {total} objects found (IoU >= 0.5, right label)")

    in_process = mlflow.pyfunc.load_model("models:/boxes/1").predict(pd.DataFrame(
        {"image": [base64.b64encode(png(s.image)).decode() for s in shapes]}))["boxes"]
    for served, local in zip(items, in_process):
        assert [f["label"] for f in served["boxes"]] == [f["label"] for f in local]
        assert np.allclose([corners(f) for f in served["boxes"]], [corners(f) for f in local], atol=1e-4)

    content_type, body = multipart_body([("images", ("a.png", png(shapes[0].image), "image/png")),
                                         ("images", ("b.png", png(shapes[1].image), "image/png"))])
    predicted = httpx.post(f"{server.url}/predict", content=body, timeout=60, headers={
        "Authorization": f"Bearer {keys['primary']}", "Content-Type": content_type})
    assert predicted.status_code == 200, predicted.text
    answer = predicted.json()
    assert (answer["deployment"], answer["model_version"]) == ("blue", "models:/boxes/1")
    assert [p["boxes"] for p in answer["predictions"]] == [items[0]["boxes"], items[1]["boxes"]]


def test_backends_and_settings_act_as_they_say(server: Server, keys: dict[str, str]) -> None:
    images = [s.image for s in samples(6, seed=43)]
    blue = boxes_of(server, keys["primary"], images, "blue")
    by_torch = boxes_of(server, keys["primary"], images, "torchy")
    for onnx_boxes, torch_boxes in zip(blue, by_torch):
        assert [f["label"] for f in onnx_boxes] == [f["label"] for f in torch_boxes]
        assert np.allclose([corners(f) for f in onnx_boxes], [corners(f) for f in torch_boxes], atol=1e-3)

    strict = boxes_of(server, keys["primary"], images, "strict")  # box_score_thresh 0.5, box_detections_per_img 2
    assert sum(map(len, strict)) < sum(map(len, blue))
    for mild, strong in zip(blue, strict):
        check_form(strong, 0.5)
        expected = [f for f in mild if f["score"] >= 0.5][:2]
        assert [f["label"] for f in strong] == [f["label"] for f in expected]
        assert np.allclose([corners(f) for f in strong], [corners(f) for f in expected], atol=1e-3)


def test_tiling_finds_the_small_objects_a_shrunk_image_loses(server: Server, keys: dict[str, str],
                                                             capsys: pytest.CaptureFixture) -> None:
    """Mosaics of 3 x 3 shapes images (288 px): shrunk whole to 96 px, their objects are a third of the size the
    detector learnt; in 3 x 3 tiles, each run at 96 px, they are about that size again."""
    mosaics, truths = [], []
    for number in range(3):
        parts = samples(9, seed=50 + number)
        mosaic = Image.new("RGB", (3 * SIDE, 3 * SIDE))
        objects = []
        for index, part in enumerate(parts):
            row, column = divmod(index, 3)
            mosaic.paste(part.image, (column * SIDE, row * SIDE))
            objects += [type(obj)(obj.label, ((obj.box[0] + column) / 3, (obj.box[1] + row) / 3,
                                              (obj.box[2] + column) / 3, (obj.box[3] + row) / 3))
                        for obj in part.objects]
        mosaics.append(mosaic)
        truths.append(objects)
    small = boxes_of(server, keys["primary"], mosaics, "small")
    tiled = boxes_of(server, keys["primary"], mosaics, "tiled")
    total = sum(map(len, truths))
    found_small = sum(matched(objects, boxes) for objects, boxes in zip(truths, small))
    found_tiled = sum(matched(objects, boxes) for objects, boxes in zip(truths, tiled))
    assert found_tiled >= 0.4 * total and found_tiled >= 2 * max(found_small, 1), (found_small, found_tiled, total)
    with capsys.disabled():
        print(f"\ntiling: {found_tiled} of {total} objects found in 3 x 3 tiles, {found_small} in the shrunk image")
    for boxes in tiled:
        check_form(boxes, 0.3)


def test_segmenter_polygons_lie_on_the_objects(server: Server, keys: dict[str, str],
                                               capsys: pytest.CaptureFixture) -> None:
    shapes = samples(4, seed=47)
    items = boxes_of(server, keys["primary"], [s.image for s in shapes], "segments")
    on_objects, outlined = [], 0
    for shape, boxes in zip(shapes, items):
        check_form(boxes, 0.05)
        instances = np.asarray(shape.instances)
        for found in boxes:
            assert sum(len(ring) for ring in found["polygon"]) <= 2 * 12
            mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(found["mask"])))) > 127
            assert mask.shape == (SIDE, SIDE)
            drawn = np.zeros_like(mask)
            for ring in found["polygon"]:
                points = np.asarray(ring).reshape(-1, 2) * SIDE - 0.5
                drawn |= polygon2mask(mask.shape, points[:, ::-1])
            if drawn.sum() < 20:
                continue
            outlined += 1
            hits = [k for k, obj in enumerate(shape.objects) if obj.label == found["label"]
                    and iou(obj.box, corners(found)) >= 0.5]
            if hits:
                best = max(hits, key=lambda k: iou(shape.objects[k].box, corners(found)))
                on_objects.append((drawn & (instances == best + 1)).sum() / drawn.sum())
    assert outlined > 0 and on_objects, "the segmenter outlined no object it found"
    assert np.mean(on_objects) >= 0.6, f"polygons lie {np.mean(on_objects):.0%} on their objects' pixels"
    with capsys.disabled():
        print(f"\nsegmenter: {len(on_objects)} polygons of found objects lie {np.mean(on_objects):.0%} on the "
              "objects' pixels")


def test_explanations_are_refused_for_detectors(server: Server, keys: dict[str, str]) -> None:
    image = png(samples(1)[0].image)
    headers = {"Authorization": f"Bearer {keys['primary']}", "Content-Type": "image/png"}
    refused = httpx.post(f"{server.url}/explain", content=image, headers=headers, timeout=60)
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "not_explainable"
    assert "explanations are for classification models" in refused.json()["error"]["message"]
    assert "object_detection" in refused.json()["error"]["message"]
    asked = score(server, keys["primary"], [samples(1)[0].image], model_explainability=True)
    assert asked.status_code == 422 and asked.json()["error"]["code"] == "not_explainable"
    job = httpx.post(f"{server.url}/explain/jobs", content=image, headers=headers, timeout=60)  # nor as a job
    assert job.status_code == 422 and job.json()["error"]["code"] == "not_explainable"


def test_a_rollout_between_two_detector_versions(server: Server, keys: dict[str, str], admin: Admin) -> None:
    admin.add(deployment("green", "models:/boxes/2"))  # the same weights, box_score_thresh 0.6
    admin.traffic(blue=50, green=50)
    images = [s.image for s in samples(2, seed=44)]
    seen = {}
    for _ in range(30):
        answer = score(server, keys["primary"], images)
        assert answer.status_code == 200, answer.text
        item = answer.json()[0]
        seen.setdefault(item["model_version"], []).append(item["boxes"])
    assert set(seen) == {"models:/boxes/1", "models:/boxes/2"}
    for boxes in seen["models:/boxes/2"]:
        check_form(boxes, 0.6)
    admin.traffic(green=100)
    answers = [score(server, keys["primary"], images).json()[0]["model_version"] for _ in range(5)]
    assert answers == ["models:/boxes/2"] * 5


def test_traffic_over_different_answer_formats_is_refused(server: Server, keys: dict[str, str],
                                                          admin: Admin) -> None:
    admin.add(deployment("classes", "models:/mc/1"))
    refused = admin.http.put("/traffic", json={"blue": 50, "classes": 50})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "mixed_tasks"
    message = refused.json()["error"]["message"]
    assert "blue serve object_detection" in message and "classes serve multiclass" in message
    mirrored = admin.http.put("/mirror-traffic", json={"segments": 10})
    assert mirrored.status_code == 422 and "segments serve instance_segmentation" in mirrored.json()["error"]["message"]
    assert admin.endpoint()["traffic"]["blue"] == 100
    pinned = score(server, keys["primary"], [samples(1)[0].image], "classes")  # a pinned request reaches it
    assert pinned.status_code == 200 and "probs" in pinned.json()[0]
