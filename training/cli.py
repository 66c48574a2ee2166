"""`lantern data ...` and `lantern train ...`: datasets and training sessions on the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from pydantic import ValidationError
from rich.table import Table

from registry.architectures import ARCHITECTURES
from registry.console import StepProgress, console, stdout, user_errors
from registry.detectors import DETECTORS
from registry.errors import LanternError, describe_validation_error
from registry.model_files import TAG_TRAINING_RUN
from registry.settings import TASKS
from training.callbacks import Callback, CSVLogger, EarlyStopping
from training.progress import SHOWN_METRICS, ProgressBar, describe_metrics
from training.schedule import parse_schedule
from training.session import Session, selection_metric
from training.shapes import ShapesConfig, write_shapes_dataset
from training.shapes_instances import InstanceShapesConfig, write_instance_shapes_dataset

if TYPE_CHECKING:
    from training.loop import TrainResult

# training.loop and registry.register import torchvision and MLflow (seconds): commands import them when they run


@click.group()
def data() -> None:
    """Make datasets."""


@data.command("shapes")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--count", default=300, show_default=True, help="Number of images.")
@click.option("--image-size", type=int, default=None,
              help="Side of the square images in pixels (64 for classification, 128 for detection).")
@click.option("--seed", default=0, show_default=True)
@click.option("--multilabel", is_flag=True, help="Several shapes per image; labels are lists.")
@click.option("--task", type=click.Choice(["classification", "object_detection", "instance_segmentation"]),
              default="classification", show_default=True,
              help="Detection and instance segmentation: several objects per image (some small, some touching), "
                   "labelled with boxes (and polygons) in the cloud's JSONL format; images are 128 px by default.")
@click.option("--max-objects", default=6, show_default=True, help="Most objects per image (detection tasks).")
def shapes(out_dir: str, count: int, image_size: int | None, seed: int, multilabel: bool, task: str,
           max_objects: int) -> None:
    """Write the synthetic shapes dataset (images, masks, labels.txt, index.jsonl) to OUT_DIR."""
    if multilabel and task != "classification":
        raise click.UsageError("--multilabel is for classification; detection images hold several objects anyway")
    try:
        config: ShapesConfig | InstanceShapesConfig = (
            ShapesConfig(count=count, image_size=image_size or 64, seed=seed, multilabel=multilabel)
            if task == "classification" else
            InstanceShapesConfig(count=count, image_size=image_size or 128, seed=seed, max_objects=max_objects,
                                 task=task))
    except ValidationError as error:
        raise click.UsageError(describe_validation_error(error, "shapes dataset", "unknown option")) from None
    with console.status(f"Drawing {count} images"):
        index = (write_shapes_dataset(Path(out_dir), config) if isinstance(config, ShapesConfig)
                 else write_instance_shapes_dataset(Path(out_dir), config))
    console.print(f"Wrote {count} images to {out_dir}")
    stdout.print(index)


def _early_stopping(task: str, metric: str | None, target: float | None, patience: int | None,
                    min_delta: float) -> EarlyStopping | None:
    if target is None and patience is None:
        if metric is not None:
            raise click.UsageError("--early-stop-metric needs --early-stop-target and/or --early-stop-patience")
        return None
    metric = metric or selection_metric(task)
    mode = "min" if metric.endswith("loss") else "max"
    return EarlyStopping(metric, mode, target=target, patience=patience, min_delta=min_delta)


def _report(result: TrainResult) -> None:
    where = f"session {result.session_dir}"
    if not result.ran:
        console.print(f"{where} is at iteration {result.iteration} and "
                      f"{'stopped early (' + str(result.stop_reason) + ')' if result.status == 'early_stopped' else 'finished'}"
                      "; nothing to train. Give a larger --iterations to extend it.")
    elif result.status == "completed":
        console.print(f"[green]✓[/green] Trained to iteration {result.iteration}: {describe_metrics(result.metrics)}")
    elif result.status == "early_stopped":
        console.print(f"[green]✓[/green] Stopped early at iteration {result.iteration}: {result.stop_reason}")
    else:
        console.print(f"[yellow]Stopped[/yellow] at iteration {result.iteration} of {result.total} "
                      f"({result.stop_reason}); checkpoint written. Run the same command to resume.")
    if result.best is not None:
        metric = next((k for k in ("val_map", "val_f1", "val_accuracy") if k in result.best.metrics), None)
        value = f" ({metric} {result.best.metrics[metric]:.2%})" if metric else ""
        console.print(f"Best checkpoint: iteration {result.best.iteration}{value}")


@click.group(invoke_without_command=True)
@click.option("--session-dir", type=click.Path(file_okay=False), help="Where the session's checkpoints and metadata live.")
@click.option("--data", "data_source",
              help="Image folder (one sub-folder per class), JSONL index (for detection: the cloud's, with boxes and "
                   "polygons), or shapes[:COUNT].")
@click.option("--val-data", help="Validation data (default: hold out --val-fraction of --data).")
@click.option("--val-fraction", type=float, help="Share held out for validation when no --val-data  [default: 0.2]")
@click.option("--arch", type=click.Choice(sorted(ARCHITECTURES) + sorted(DETECTORS)),
              help="Architecture: a classifier, or a detector for the detection tasks (default with --from: its own).")
@click.option("--task", type=click.Choice(TASKS), help="[default: multiclass]")
@click.option("--image-size", type=int,
              help="Training crop size in pixels; a detector's shorter side  [default: 224; a detector's own: 128 for "
                   "small_detector and small_segmenter, 800 for torchvision's]")
@click.option("--iterations", type=int, help="Total iterations; larger than a finished session's extends it.")
@click.option("--checkpoint-interval", type=int, help="Iterations between checkpoints  [default: a tenth of the run]")
@click.option("--report-interval", type=int, help="Iterations between progress reports.")
@click.option("--batch-size", type=int, help="[default: 32]")
@click.option("--lr", type=float, help="Peak learning rate (AdamW; SGD with momentum for detectors)  "
                                      "[default: 0.001; 0.02 for detectors]")
@click.option("--weight-decay", type=float, help="[default: 0.0001]")
@click.option("--lr-schedule", help="Segments KIND:LENGTH:START-END, e.g. linear:0.05:0.02-1,cosine:rest:1-0.01 "
                                    "(the default).")
@click.option("--augment/--no-augment", default=None,
              help="Random resized crop, flip, colour jitter (detectors: flips)  [default: on]")
@click.option("--seed", type=int, help="[default: 0]")
@click.option("--from", "from_model", help="Start from a registered version's weights: models:/NAME/VERSION or @ALIAS.")
@click.option("--new-head/--keep-head", default=None,
              help="With --from: train a new classifier head for the data's labels (needed when they differ).")
@click.option("--early-stop-metric",
              help="Metric to watch (default: val_accuracy; val_f1 for multilabel; val_map for detection).")
@click.option("--early-stop-target", type=float, help="Stop once the metric reaches this value.")
@click.option("--early-stop-patience", type=int, help="Stop after this many validations without improvement.")
@click.option("--early-stop-min-delta", type=float, default=0.0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N (AMP on CUDA).")
@click.option("--loader-workers", type=int, help="Data loader processes (default: 0 for preloaded data).")
@click.option("--register", "register_name", help="At the end, register the best checkpoint under this name.")
@click.option("--alias", help="With --register: point this alias at the new version.")
@click.option("--mlflow/--no-mlflow", default=True, show_default=True, help="Record the run in MLflow.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, help="MLflow tracking URI.")
@click.pass_context
@user_errors
def train_group(ctx: click.Context, session_dir: str | None, data_source: str | None, val_data: str | None,
                val_fraction: float | None, arch: str | None, task: str | None, image_size: int | None,
                iterations: int | None, checkpoint_interval: int | None, report_interval: int | None,
                batch_size: int | None, lr: float | None, weight_decay: float | None, lr_schedule: str | None,
                augment: bool | None, seed: int | None, from_model: str | None, new_head: bool | None,
                early_stop_metric: str | None, early_stop_target: float | None, early_stop_patience: int | None,
                early_stop_min_delta: float, device: str, loader_workers: int | None, register_name: str | None,
                alias: str | None, mlflow: bool, tracking_uri: str | None) -> None:
    """Train (or resume, or extend) a session; `lantern train sessions DIR` lists its checkpoints.

    Running the same command again resumes where it stopped; Ctrl-C or SIGTERM stops after the current batch and
    writes a checkpoint first."""
    if ctx.invoked_subcommand is not None:
        return
    from registry.register import register_session_checkpoint
    from training.loop import RunOptions, train

    if session_dir is None:
        raise click.UsageError("give --session-dir (and --data, --arch, --iterations for a new session)")
    if alias and not register_name:
        raise click.UsageError("--alias needs --register NAME")
    given: dict[str, Any] = {
        "data": data_source, "val_data": val_data, "val_fraction": val_fraction, "arch": arch, "task": task,
        "image_size": image_size, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "schedule": parse_schedule(lr_schedule) if lr_schedule else None, "augment": augment, "seed": seed,
        "from_model": from_model, "new_head": new_head,
    }
    session = Session(session_dir)
    task_name = task or (session.read_meta().config.task if session.exists() else "multiclass")
    callbacks: list[Callback] = [CSVLogger(session.csv_path), ProgressBar()]
    stopper = _early_stopping(task_name, early_stop_metric, early_stop_target, early_stop_patience,
                              early_stop_min_delta)
    if stopper is not None:
        callbacks.append(stopper)
    options = RunOptions(iterations=iterations, checkpoint_interval=checkpoint_interval,
                         report_interval=report_interval, device=device, loader_workers=loader_workers,
                         mlflow=mlflow, tracking_uri=tracking_uri)
    result = train(session_dir, given, options, callbacks)
    _report(result)
    if result.signal_number is not None:
        sys.exit(128 + result.signal_number)
    if register_name:
        best = result.best or session.latest()
        if best is None:
            raise LanternError(f"{session_dir} has no checkpoint to register")
        tags = {TAG_TRAINING_RUN: result.mlflow_run_id} if result.mlflow_run_id else {}
        registered = register_session_checkpoint(register_name, session_dir, best.iteration, alias=alias,
                                                 tracking_uri=tracking_uri, progress=StepProgress(), tags=tags)
        console.print(f"Registered [bold]{registered.uri}[/bold] from iteration {best.iteration}"
                      + (f" (alias @{alias})" if alias else ""))
        stdout.print(registered.uri)


@train_group.command("sessions")
@click.argument("session_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@user_errors
def sessions(session_dir: str, as_json: bool) -> None:
    """List a session's checkpoints with their iteration and metrics (* marks the best)."""
    session = Session(session_dir)
    meta = session.read_meta()
    checkpoints = session.checkpoints()
    best = session.best(selection_metric(meta.config.task))
    if as_json:
        stdout.print_json(json.dumps({
            "session": str(session.dir), "status": meta.status, "iterations": meta.iterations,
            "config": meta.config.model_dump(mode="json"), "labels": meta.labels, "mlflow_run_id": meta.mlflow_run_id,
            "best_iteration": best.iteration if best else None,
            "checkpoints": [{"iteration": c.iteration, "epoch": c.epoch, "reason": c.reason, "metrics": c.metrics,
                             "created_at": c.created_at, "path": str(c.path)} for c in checkpoints],
        }))
        return
    console.print(f"Session {session.dir}: {meta.config.arch} {meta.config.task} on {meta.config.data}, "
                  f"status {meta.status} at {checkpoints[-1].iteration if checkpoints else 0}/{meta.iterations}"
                  + (f" ({meta.stop_reason})" if meta.stop_reason else ""))
    shown = [c for c in SHOWN_METRICS if any(c in info.metrics for info in checkpoints)]
    table = Table("", "iteration", "epoch", *shown, "reason", "written")
    for info in checkpoints:
        values = [f"{info.metrics[c]:.4f}" if c in info.metrics else "-" for c in shown]
        table.add_row("*" if best and best.iteration == info.iteration else "", str(info.iteration), str(info.epoch),
                      *values, info.reason, info.created_at)
    stdout.print(table)


@train_group.command("prune")
@click.argument("session_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--keep-last", type=int, help="Keep only the newest N checkpoints.")
@click.option("--below", type=int, help="Remove checkpoints before this iteration.")
@click.option("--keep-best/--no-keep-best", default=True, show_default=True,
              help="Keep the best checkpoint by validation metric.")
@user_errors
def prune(session_dir: str, keep_last: int | None, below: int | None, keep_best: bool) -> None:
    """Remove checkpoints (the newest, where a resume starts, is always kept)."""
    if keep_last is None and below is None:
        raise click.UsageError("give --keep-last N and/or --below ITERATION")
    session = Session(session_dir)
    meta = session.read_meta()
    session.lock()
    try:
        removed = session.prune(keep_last, below, keep_best, selection_metric(meta.config.task))
    finally:
        session.unlock()
    kept = [c.iteration for c in session.checkpoints()]
    console.print(f"Removed {len(removed)} checkpoint(s): {', '.join(str(c.iteration) for c in removed) or 'none'}; "
                  f"kept: {', '.join(map(str, kept))}")
