"""Training progress on the terminal: a bar with iteration, loss, accuracy or mAP, and ETA (one line per report in
logs)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from registry.console import console
from training.callbacks import Callback, TrainState

SHOWN_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_f1", "val_map", "val_map_50",
                 "val_mask_map", "val_mask_map_50")


def describe_metrics(metrics: dict[str, float]) -> str:
    """The headline metrics, those that are rates as percentages."""
    parts = []
    for key in SHOWN_METRICS:
        if key in metrics:
            value = metrics[key]
            parts.append(f"{key} {value:.1%}" if "accuracy" in key or "f1" in key else f"{key} {value:.4f}")
    return "  ".join(parts)


class ProgressBar(Callback):
    """A rich progress bar when stderr is a terminal; otherwise a plain line at every report."""

    def __init__(self, description: str = "Training") -> None:
        self.description = description
        self.bar: Progress | None = None
        self.task = None

    def on_fit_start(self, state: TrainState) -> None:
        if state.resumed:
            console.print(f"Resuming at iteration {state.iteration} of {state.total}")
        if console.is_terminal:
            self.bar = Progress(
                TextColumn(self.description), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[metrics]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console,
            )
            self.bar.start()
            self.task = self.bar.add_task("train", total=state.total, completed=state.iteration, metrics="")

    def on_batch_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.iteration)

    def on_report(self, state: TrainState) -> None:
        text = describe_metrics(state.metrics)
        if self.bar is not None:
            self.bar.update(self.task, metrics=text)
        else:
            console.print(f"iteration {state.iteration}/{state.total} ({state.iteration / state.total:.0%}) "
                          f"lr {state.lr:.3g}  {text}")

    def on_fit_end(self, state: TrainState) -> None:
        if self.bar is not None:
            self.bar.stop()
