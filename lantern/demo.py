"""`lantern demo` (what `make demo` runs): shapes data -> small CNN trained in a session -> registered model version."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from registry.console import StepProgress, console, user_errors
from registry.errors import ModelNotFoundError
from training.callbacks import CSVLogger
from training.progress import ProgressBar, describe_metrics
from training.session import Session, selection_metric

DEMO_MODEL = "shapes-demo"
DEMO_ALIAS = "champion"
DEMO_TRAINING = {"arch": "small_cnn", "image_size": 64, "batch_size": 64, "lr": 1e-2}


@dataclass(frozen=True)
class DetectionRecipe:
    """How the demo detector or segmenter is trained: shapes images drawn, iterations, and the session's config."""

    count: int
    iterations: int
    config: dict[str, Any] = field(default_factory=dict)


# within 5 minutes of a 2-core CPU each (bench/detection.py measures them)
DEMO_DETECTION = {
    "object_detection": DetectionRecipe(2000, 1200, {"arch": "small_detector", "task": "object_detection",
                                                     "image_size": 128, "batch_size": 8, "lr": 0.04}),
    "instance_segmentation": DetectionRecipe(2000, 800, {"arch": "small_segmenter", "task": "instance_segmentation",
                                                         "image_size": 128, "batch_size": 8, "lr": 0.04}),
}


def _train(session_dir: Path, count: int, iterations: int) -> None:
    from training.loop import RunOptions, train

    result = train(session_dir, {"data": f"shapes:{count}", **DEMO_TRAINING}, RunOptions(iterations=iterations),
                   [CSVLogger(session_dir / "metrics.csv"), ProgressBar("Training small_cnn on shapes")])
    console.print(f"[green]✓[/green] Trained {result.iteration} iterations: {describe_metrics(result.metrics)}")


@click.command()
@click.option("--data-dir", default="demo-data", show_default=True, type=click.Path(file_okay=False))
@click.option("--count", default=3000, show_default=True, help="Shapes images to generate.")
@click.option("--iterations", default=1000, show_default=True, help="Training iterations.")
@click.option("--port", default=3000, show_default=True, help="The port the printed requests use.")
@user_errors
def demo(data_dir: str, count: int, iterations: int, port: int) -> None:
    """Make the shapes data, train the demo model, and register it as shapes-demo@champion."""
    from registry.register import register_session_checkpoint
    from registry.resolve import parse_model_ref, resolve_version
    from registry.store import open_client, tracking_uri

    session_dir = Path(data_dir) / "session"
    client = open_client()
    console.print(f"MLflow store: {tracking_uri()}")
    ref = parse_model_ref(f"{DEMO_MODEL}@{DEMO_ALIAS}")
    try:
        version = resolve_version(client, ref)
        console.print(f"{DEMO_MODEL}@{DEMO_ALIAS} is already registered (version {version.version}); reusing it")
    except ModelNotFoundError:
        _train(session_dir, count, iterations)
        best = Session(session_dir).best(selection_metric("multiclass"))
        result = register_session_checkpoint(DEMO_MODEL, session_dir, best.iteration if best else None,
                                             alias=DEMO_ALIAS, progress=StepProgress())
        console.print(f"Registered [bold]{result.uri}[/bold] (alias @{DEMO_ALIAS})")
    console.print("\nInspect it with:\n  .venv/bin/lantern models list\n"
                  f"  .venv/bin/lantern models show {DEMO_MODEL}@{DEMO_ALIAS}\n")
    from registry.cli import show_model

    show_model.callback(ref=f"{DEMO_MODEL}@{DEMO_ALIAS}", as_json=False, tracking_uri=None)
    sample = write_sample(Path(data_dir))
    console.print(ready_to_paste(sample, port))


def write_sample(data_dir: Path) -> Path:
    """A shapes image the model has not seen (another seed), to send to the endpoint."""
    from training.shapes import ShapesConfig, make_sample

    shape = make_sample(ShapesConfig(image_size=64, seed=2026), 0)
    path = data_dir / f"sample-{shape.labels[0]}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    shape.image.save(path)
    return path


def ready_to_paste(sample: Path, port: int) -> str:
    base = f"http://127.0.0.1:{port}"
    key = "KEY=$(.venv/bin/lantern endpoint get-credentials endpoint.yaml --key primary)"
    return (
        f"\n[bold]Next: `make demo` serves endpoint.yaml on {base}[/bold] (try it in a browser at {base}/ with "
        f"the key the first line below gets; docs: {base}/docs, metrics: {base}/metrics)."
        f"\nOnce it says ready, paste into another terminal:\n"
        f"  {key}\n"
        f"  curl -s {base}/predict -H \"Authorization: Bearer $KEY\" -H 'Content-Type: image/png' "
        f"--data-binary @{sample}\n"
        f"  curl -s {base}/explain?method=xrai -H \"Authorization: Bearer $KEY\" -H 'Content-Type: image/png' "
        f"-H 'Accept: image/png' --data-binary @{sample} -o xrai.png\n"
        f"Roll a version out (README \"Rolling out a new version\"):\n"
        f"  export LANTERN_ADMIN_KEY=$(.venv/bin/lantern endpoint get-credentials endpoint.yaml --key admin) "
        f"LANTERN_URL={base}\n"
        f"  .venv/bin/lantern endpoint show\n"
    )
