"""Helpers of the training tests: quiet run options, a session's final weights, and a callback that stops a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from registry.model_files import WEIGHTS
from training.callbacks import Callback, TrainState
from training.loop import RunOptions
from training.session import Session


def quiet(**options: Any) -> RunOptions:
    """Run options without MLflow tracking."""
    return RunOptions(**{"mlflow": False, **options})


def final_weights(session_dir: Path) -> dict[str, torch.Tensor]:
    """The weights of a session's newest checkpoint."""
    return load_file(str(Session(session_dir).latest().path / WEIGHTS))


class StopAt(Callback):
    """Asks the loop to stop once `iteration` updates are done (what a signal handler does)."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def on_batch_end(self, state: TrainState) -> None:
        if state.iteration == self.iteration:
            state.request_stop("test stop")


DETECTOR_ARCH = {"object_detection": "small_detector", "instance_segmentation": "small_segmenter"}


def train_shapes_detector(folder: Path, task: str, iterations: int, image_size: int = 96, count: int = 160,
                          checkpoint_interval: int | None = None) -> Path:
    """A small detector (or segmenter) trained on instance shapes under `folder` (a checkpoint every
    `checkpoint_interval` iterations, else one at the end); returns its session directory."""
    from training.loop import train
    from training.shapes_instances import InstanceShapesConfig, write_instance_shapes_dataset

    data = write_instance_shapes_dataset(folder / "data", InstanceShapesConfig(
        count=count, image_size=image_size, seed=3, max_objects=4, task=task)).parent
    session_dir = folder / "session"
    train(session_dir, {"data": str(data), "arch": DETECTOR_ARCH[task], "task": task, "image_size": image_size,
                        "batch_size": 4, "lr": 0.04},
          quiet(iterations=iterations, checkpoint_interval=checkpoint_interval or iterations, loader_workers=0))
    return session_dir
