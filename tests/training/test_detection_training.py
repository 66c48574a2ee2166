"""Training sessions of detectors and instance segmenters: the same session control as classifiers (checkpoints,
exact resume after a stop, extension), COCO's metrics choosing the best checkpoint, and the version files a
checkpoint holds."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from registry.errors import LanternError
from registry.model_files import ModelFiles
from registry.store import open_client
from support.common import lantern_executable, lantern_here
from support.training import StopAt, final_weights, quiet
from training.loop import train
from training.session import Session
from training.shapes_instances import InstanceShapesConfig, write_instance_shapes_dataset

ARCH = {"object_detection": "small_detector", "instance_segmentation": "small_segmenter"}


@pytest.fixture(scope="module")
def instances(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shapes with boxes and polygons (a segmentation index serves detection too)."""
    folder = tmp_path_factory.mktemp("instance-shapes")
    write_instance_shapes_dataset(folder, InstanceShapesConfig(count=32, image_size=64, seed=4, max_objects=3,
                                                               task="instance_segmentation"))
    return folder


def detection_config(data: Path, task: str, **overrides: object) -> dict[str, object]:
    return {"data": str(data), "arch": ARCH[task], "task": task, "image_size": 64, "batch_size": 4, **overrides}


@pytest.mark.parametrize("task", ["object_detection", "instance_segmentation"])
def test_a_stopped_detector_session_resumes_exactly(instances: Path, tmp_path: Path, task: str) -> None:
    options = quiet(iterations=8, checkpoint_interval=4, loader_workers=0)
    straight = train(tmp_path / "straight", detection_config(instances, task), options)
    assert (straight.status, straight.iteration) == ("completed", 8)

    stopped = train(tmp_path / "resumed", detection_config(instances, task), options, [StopAt(3)])
    assert (stopped.status, stopped.iteration) == ("stopped", 3)
    resumed = train(tmp_path / "resumed", {}, quiet(loader_workers=1))
    assert (resumed.status, resumed.iteration) == ("completed", 8)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"resumed weights differ from an uninterrupted run in {different}"

    metrics = straight.metrics
    losses = {"train_loss", "train_loss_classifier", "train_loss_box_reg", "train_loss_objectness",
              "train_loss_rpn_box_reg"} | ({"train_loss_mask"} if task == "instance_segmentation" else set())
    assert losses <= set(metrics) and all(metrics[name] > 0 for name in losses)
    expected = {"val_map", "val_map_50"} | ({"val_mask_map", "val_mask_map_50"}
                                            if task == "instance_segmentation" else set())
    assert expected <= set(metrics)
    assert {name for name in metrics if name.startswith("val_map_50_")} <= {
        f"val_map_50_{label}" for label in straight.labels}
    assert straight.labels == ["circle", "square", "triangle"]
    session = Session(tmp_path / "straight")
    best = session.best("val_map")
    assert straight.best is not None and straight.best.iteration == best.iteration
    assert best.metrics["val_map"] == max(c.metrics["val_map"] for c in session.checkpoints())

    files = ModelFiles.in_dir(session.latest().path)
    spec = files.read_spec()
    assert (spec.arch, spec.task, spec.num_classes, spec.gradcam_layer) == (ARCH[task], task, 3, None)
    settings = json.loads(files.settings.read_text())
    assert (settings["min_size"], settings["max_size"]) == (64, 107)
    assert ("mask_pixel_score_threshold" in settings) == (task == "instance_segmentation")
    meta = session.read_meta()
    assert (meta.config.lr, meta.config.task) == (0.02, task)  # a detector's SGD learning rate by default


def test_a_small_detector_learns_the_shapes(trained_detector: Path) -> None:
    """The session's detector (300 iterations, a checkpoint every 100): its loss falls and its mAP rises."""
    session = Session(trained_detector)
    checkpoints = session.checkpoints()
    assert [c.iteration for c in checkpoints] == [100, 200, 300]
    first, last = checkpoints[0].metrics, checkpoints[-1].metrics
    assert last["train_loss"] < first["train_loss"]
    assert last["val_map_50"] > max(0.15, first["val_map_50"]), (first, last)
    assert session.best("val_map").metrics["val_map"] > 0.05


def test_detection_sessions_refuse_what_cannot_work(instances: Path, tmp_path: Path) -> None:
    def refused(values: dict[str, object]) -> str:
        with pytest.raises(LanternError) as caught:
            train(tmp_path / f"s{len(list(tmp_path.iterdir()))}", values, quiet(iterations=2))
        return str(caught.value)

    message = refused(detection_config(instances, "object_detection", arch="resnet18"))
    assert "resnet18 is a classifier; object_detection needs a detector" in message and "small_detector" in message
    message = refused(detection_config(instances, "instance_segmentation", arch="small_detector"))
    assert "small_detector does not predict masks" in message and "small_segmenter" in message
    assert "small_detector is a detector; multiclass needs a classifier" in refused(
        {"data": str(instances), "arch": "small_detector"})
    assert "--from" in refused(detection_config(instances, "object_detection", from_model="models:/x/1"))

    classes = tmp_path / "classes" / "circle"
    classes.mkdir(parents=True)
    assert "no detection index" in refused(detection_config(tmp_path / "classes", "object_detection"))

    lines = (instances / "index.jsonl").read_text().splitlines()
    boxes_only = [json.loads(line) for line in lines]
    for line in boxes_only:
        line["image_url"] = str(instances / line["image_url"])
        for item in line["label"]:
            item.pop("polygon", None)
    index = tmp_path / "boxes.jsonl"
    index.write_text("\n".join(json.dumps(line) for line in boxes_only) + "\n")
    message = refused(detection_config(index, "instance_segmentation"))
    assert "boxes.jsonl:1: label.0.polygon: instance segmentation needs a polygon" in message
    assert train(tmp_path / "boxes", detection_config(index, "object_detection"),
                 quiet(iterations=1, loader_workers=0)).status == "completed"


def test_lantern_train_segments_shapes_and_registers_the_best_checkpoint(store: str, tmp_path: Path) -> None:
    session_dir = tmp_path / "segmenter"
    done = subprocess.run(
        [lantern_executable(), "train", "--session-dir", str(session_dir), "--data", "shapes:24", "--task",
         "instance_segmentation", "--arch", "small_segmenter", "--image-size", "64", "--batch-size", "4",
         "--iterations", "4", "--checkpoint-interval", "2", "--loader-workers", "0", "--register", "segmenter",
         "--alias", "champion"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "models:/segmenter/1"
    assert "Trained to iteration 4" in done.stderr and "val_mask_map" in done.stderr
    assert "Best checkpoint: iteration" in done.stderr and "(val_map " in done.stderr

    # the follow-up commands run in this process (the command above is the installed one, in a process of its own)
    listing = json.loads(lantern_here("train", "sessions", str(session_dir), "--json").stdout)
    assert listing["config"]["task"] == "instance_segmentation" and listing["config"]["lr"] == 0.02
    assert [c["iteration"] for c in listing["checkpoints"]] == [2, 4]
    assert all({"val_map", "val_mask_map", "train_loss_mask"} <= set(c["metrics"]) for c in listing["checkpoints"])
    table = lantern_here("train", "sessions", str(session_dir)).stdout
    assert "val_map" in table and "val_mask_map" in table

    shown = json.loads(lantern_here("models", "show", "segmenter@champion", "--json").stdout)
    assert (shown["spec"]["task"], shown["spec"]["arch"], shown["spec"]["gradcam_layer"]) == (
        "instance_segmentation", "small_segmenter", None)
    assert shown["settings"]["min_size"] == 64 and shown["settings"]["max_number_of_polygon_points"] == 100
    assert shown["training_iteration"] == str(listing["best_iteration"])
    run = open_client(store).get_run(Session(session_dir).read_meta().mlflow_run_id)
    assert (run.data.params["arch"], run.data.params["task"]) == ("small_segmenter", "instance_segmentation")
    assert "val_mask_map" in run.data.metrics

    refused = lantern_here("train", "--session-dir", str(tmp_path / "x"), "--data", "shapes:8", "--task",
                           "object_detection", "--arch", "resnet18", "--iterations", "1", exit_code=2)
    assert "resnet18 is a classifier; object_detection needs a detector" in refused.stderr
