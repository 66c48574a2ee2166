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
