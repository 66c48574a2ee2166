"""`lantern demo` (what `make demo` runs): shapes data -> small CNN (or, with --task, the small detector or segmenter)
trained in a session -> registered model version."""

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


@dataclass(frozen=True)
class DemoRecipe:
    """How a demo model is trained: shapes images drawn, iterations, the session's config, and how many validation
    passes (None: the loop's default, one every tenth of the run)."""

    count: int
    iterations: int
    config: dict[str, Any] = field(default_factory=dict)
    validations: int | None = None


# the detector and the segmenter within 5 minutes of a 2-core CPU each (bench/detection.py measures them); a
# validation pass of theirs takes seconds: two of them
DEMO_RECIPES = {
    "classification": DemoRecipe(3000, 1000, {"arch": "small_cnn", "image_size": 64, "batch_size": 64, "lr": 1e-2}),
    "object_detection": DemoRecipe(2000, 1200, {"arch": "small_detector", "task": "object_detection",
                                                "image_size": 128, "batch_size": 8, "lr": 0.04}, validations=2),
    "instance_segmentation": DemoRecipe(2000, 800, {"arch": "small_segmenter", "task": "instance_segmentation",
                                                    "image_size": 128, "batch_size": 8, "lr": 0.04}, validations=2),
}
DEMO_MODELS = {"classification": DEMO_MODEL, "object_detection": "shapes-boxes",
               "instance_segmentation": "shapes-masks"}


def _train(session_dir: Path, task: str, count: int | None, iterations: int | None) -> None:
    from training.loop import RunOptions, train

    recipe = DEMO_RECIPES[task]
    count, iterations = count or recipe.count, iterations or recipe.iterations
    interval = max(1, iterations // recipe.validations) if recipe.validations else None
    arch = recipe.config["arch"]
    result = train(session_dir, {"data": f"shapes:{count}", **recipe.config},
                   RunOptions(iterations=iterations, checkpoint_interval=interval),
                   [CSVLogger(session_dir / "metrics.csv"), ProgressBar(f"Training {arch} on shapes")])
    console.print(f"[green]✓[/green] Trained {result.iteration} iterations: {describe_metrics(result.metrics)}")


@click.command()
@click.option("--data-dir", default="demo-data", show_default=True, type=click.Path(file_okay=False))
@click.option("--task", type=click.Choice(list(DEMO_MODELS)), default="classification", show_default=True,
              help="The demo model: the small CNN (shapes-demo), the small detector (shapes-boxes, about 5 minutes "
                   "of training on 2 cores) or the small segmenter (shapes-masks, as long).")
@click.option("--count", type=int, help="Shapes images to generate  [default: 3000; 2000 for detection]")
@click.option("--iterations", type=int, help="Training iterations  [default: 1000; 1200 detector, 800 segmenter]")
@click.option("--port", default=3000, show_default=True, help="The port the printed requests use.")
@user_errors
def demo(data_dir: str, task: str, count: int | None, iterations: int | None, port: int) -> None:
    """Make the shapes data, train the demo model, and register it as shapes-demo@champion (shapes-boxes or
    shapes-masks with --task)."""
    from registry.references import parse_model_ref
    from registry.register import register_session_checkpoint
    from registry.resolve import resolve_version
    from registry.store import open_client, tracking_uri

    name = DEMO_MODELS[task]
    session_dir = Path(data_dir) / ("session" if task == "classification" else f"session-{task}")
    client = open_client()
    console.print(f"MLflow store: {tracking_uri()}")
    ref = parse_model_ref(f"{name}@{DEMO_ALIAS}")
    try:
        version = resolve_version(client, ref)
        console.print(f"{name}@{DEMO_ALIAS} is already registered (version {version.version}); reusing it")
    except ModelNotFoundError:
        _train(session_dir, task, count, iterations)
        best = Session(session_dir).best(selection_metric("multiclass" if task == "classification" else task))
        result = register_session_checkpoint(name, session_dir, best.iteration if best else None,
                                             alias=DEMO_ALIAS, progress=StepProgress())
        console.print(f"Registered [bold]{result.uri}[/bold] (alias @{DEMO_ALIAS})")
    console.print("\nInspect it with:\n  .venv/bin/lantern models list\n"
                  f"  .venv/bin/lantern models show {name}@{DEMO_ALIAS}\n")
    from registry.cli import show_model

    show_model.callback(ref=f"{name}@{DEMO_ALIAS}", as_json=False, tracking_uri=None)
    sample = write_sample(Path(data_dir), task)
    endpoint = "endpoint.yaml" if task == "classification" else "endpoint-detection.yaml"
    console.print(ready_to_paste(sample, port, endpoint, explain=task == "classification"))


def write_sample(data_dir: Path, task: str = "classification") -> Path:
    """A shapes image the model has not seen (another seed), to send to the endpoint."""
    if task != "classification":
        from training.shapes_instances import InstanceShapesConfig, make_instance_sample

        instances = make_instance_sample(InstanceShapesConfig(image_size=128, seed=2026, task=task), 0)
        path = data_dir / f"sample-{len(instances.objects)}-shapes.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        instances.image.save(path)
        return path
    from training.shapes import ShapesConfig, make_sample

    shape = make_sample(ShapesConfig(image_size=64, seed=2026), 0)
    path = data_dir / f"sample-{shape.labels[0]}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    shape.image.save(path)
    return path


def ready_to_paste(sample: Path, port: int, endpoint: str = "endpoint.yaml", explain: bool = True) -> str:
    base = f"http://127.0.0.1:{port}"
    key = f"KEY=$(.venv/bin/lantern endpoint get-credentials {endpoint} --key primary)"
    serves = "`make demo`" if endpoint == "endpoint.yaml" else f"`make demo ENDPOINT={endpoint}`"
    explanation = (f"  curl -s {base}/explain?method=xrai -H \"Authorization: Bearer $KEY\" "
                   f"-H 'Content-Type: image/png' -H 'Accept: image/png' --data-binary @{sample} -o xrai.png\n"
                   ) if explain else ""
    return (
        f"\n[bold]Next: {serves} serves {endpoint} on {base}[/bold] (try it in a browser at {base}/ with "
        f"the key the first line below gets; docs: {base}/docs, metrics: {base}/metrics)."
        f"\nOnce it says ready, paste into another terminal:\n"
        f"  {key}\n"
        f"  curl -s {base}/predict -H \"Authorization: Bearer $KEY\" -H 'Content-Type: image/png' "
        f"--data-binary @{sample}\n"
        f"{explanation}"
        f"Roll a version out (README \"Rolling out a new version\"):\n"
        f"  export LANTERN_ADMIN_KEY=$(.venv/bin/lantern endpoint get-credentials {endpoint} --key admin) "
        f"LANTERN_URL={base}\n"
        f"  .venv/bin/lantern endpoint show\n"
    )
