"""`lantern demo` (what `make demo` runs): shapes data -> small CNN trained briefly -> registered model version."""

from __future__ import annotations

from pathlib import Path

import click
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file

from lantern.console import StepProgress, console, user_errors
from registry.errors import ModelNotFoundError
from registry.register import register_checkpoint
from registry.resolve import parse_model_ref, resolve_version
from registry.spec import make_spec
from registry.store import open_client, tracking_uri
from training.datasets import label_set, read_examples
from training.fit import fit, valid_sizes
from training.shapes import ShapesConfig, write_shapes_dataset

DEMO_MODEL = "shapes-demo"
DEMO_ALIAS = "champion"
IMAGE_SIZE = 64


def _train(data_dir: Path, checkpoint: Path, iterations: int) -> list[str]:
    examples = read_examples(data_dir)
    labels = label_set(examples)
    split = int(len(examples) * 0.8)
    spec = make_spec("small_cnn", len(labels), "multiclass")
    columns = (TextColumn("Training small_cnn"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.3f}"),
               TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task("train", total=iterations, loss=float("nan"))
        result = fit(spec, labels, examples[:split], examples[split:], IMAGE_SIZE, iterations,
                     on_report=lambda step, loss: bar.update(task, completed=step, loss=loss))
    console.print(f"[green]✓[/green] Trained {result.iterations} iterations: validation accuracy "
                  f"{result.val_accuracy:.1%} on {len(examples) - split} images")
    save_file({k: v.contiguous() for k, v in result.model.state_dict().items()}, str(checkpoint))
    return labels


@click.command()
@click.option("--data-dir", default="demo-data", show_default=True, type=click.Path(file_okay=False))
@click.option("--count", default=3000, show_default=True, help="Shapes images to generate.")
@click.option("--iterations", default=800, show_default=True, help="Training iterations.")
@user_errors
def demo(data_dir: str, count: int, iterations: int) -> None:
    """Make the shapes data, train the demo model, and register it as shapes-demo@champion."""
    root = Path(data_dir)
    shapes_dir, checkpoint = root / "shapes", root / "shapes-cnn.safetensors"
    client = open_client()
    console.print(f"MLflow store: {tracking_uri()}")
    ref = parse_model_ref(f"{DEMO_MODEL}@{DEMO_ALIAS}")
    try:
        version = resolve_version(client, ref)
        console.print(f"{DEMO_MODEL}@{DEMO_ALIAS} is already registered (version {version.version}); reusing it")
    except ModelNotFoundError:
        if not (shapes_dir / "index.jsonl").is_file():
            with StepProgress().step(f"Drawing {count} shapes images into {shapes_dir}"):
                write_shapes_dataset(shapes_dir, ShapesConfig(count=count, image_size=IMAGE_SIZE, seed=0))
        labels = _train(shapes_dir, checkpoint, iterations)
        resize, crop = valid_sizes(IMAGE_SIZE)
        result = register_checkpoint(
            DEMO_MODEL, checkpoint, "small_cnn", labels, "multiclass",
            {"valid_resize_size": resize, "valid_crop_size": crop}, alias=DEMO_ALIAS, progress=StepProgress(),
        )
        console.print(f"Registered [bold]{result.uri}[/bold] (alias @{DEMO_ALIAS})")
    console.print("\nInspect it with:\n  .venv/bin/lantern models list\n"
                  f"  .venv/bin/lantern models show {DEMO_MODEL}@{DEMO_ALIAS}\n")
    from registry.cli import show_model

    show_model.callback(ref=f"{DEMO_MODEL}@{DEMO_ALIAS}", as_json=False, tracking_uri=None)
