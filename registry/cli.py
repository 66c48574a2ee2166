"""`lantern register` and `lantern models ...`: the registry on the command line."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import click
from rich.table import Table

from registry.architectures import ARCHITECTURES
from registry.console import StepProgress, console, stdout, user_errors
from registry.detectors import DETECTORS
from registry.labels import read_labels
from registry.model_files import (
    DEFAULT_PARITY_TOLERANCE,
    TAG_BACKENDS,
    TAG_DERIVED_FROM,
    TAG_ONNX_REFUSED,
    TAG_PARITY,
    TAG_TRAINING_ITERATION,
    TAG_TRAINING_SESSION,
)
from registry.settings import TASKS, parse_assignments

if TYPE_CHECKING:
    from registry.register import RegisteredVersion

# registry.register/resolve/store import MLflow (seconds): each command imports what it uses when it runs

tracking_uri_option = click.option(
    "--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None,
    help="MLflow tracking/registry URI (default: sqlite:///./.lantern/mlflow.db; env MLFLOW_TRACKING_URI).",
)
set_option = click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
                          help="Inference setting, e.g. --set valid_crop_size=192 (repeatable).")


def describe_onnx(result: RegisteredVersion) -> str:
    """How a registration's ONNX export went, in a few words."""
    if result.onnx_max_abs_diff is None:
        return f"no ONNX export (served with torch): {result.onnx_refused}"
    return f"ONNX max abs diff {result.onnx_max_abs_diff:.3g}"


def _time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC") if ms else "-"


@click.command()
@click.option("--name", required=True, help="Registered model name.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="safetensors or torch state_dict.")
@click.option("--arch", type=click.Choice(sorted(ARCHITECTURES) + sorted(DETECTORS)),
              help="Architecture to rebuild: a classifier, or a detector for the detection tasks.")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False), help="Labels: one per line, or a JSON list.")
@click.option("--task", type=click.Choice(TASKS))
@click.option("--from-session", type=click.Path(file_okay=False, exists=True),
              help="A `lantern train` session directory: register one of its checkpoints (arch, labels, task and "
                   "settings come from it).")
@click.option("--checkpoint-iteration", type=int, default=None,
              help="With --from-session: the checkpoint's iteration (default: the newest).")
@set_option
@click.option("--alias", default=None, help="Point this alias (e.g. champion) at the new version.")
@click.option("--num-classes", type=int, default=None, help="Expected number of classes (default: from labels).")
@click.option("--gradcam-layer", default=None,
              help="Module name for Grad-CAM (classifiers; default: last conv stage).")
@click.option("--parity-tolerance", type=float, default=DEFAULT_PARITY_TOLERANCE, show_default=True,
              help="Largest accepted ONNX-vs-torch difference: of logits; for detectors of box corners (a share of "
                   "the image's side), scores and mask pixel scores after matching detections.")
@tracking_uri_option
@user_errors
def register(name: str, checkpoint: str | None, arch: str | None, labels_file: str | None, task: str | None,
             from_session: str | None, checkpoint_iteration: int | None, assignments: tuple[str, ...],
             alias: str | None, num_classes: int | None, gradcam_layer: str | None, parity_tolerance: float,
             tracking_uri: str | None) -> None:
    """Check a checkpoint (weights fit, ONNX parity) and register it as a new MLflow model version.

    Give either --checkpoint with --arch, --labels and --task, or --from-session (and --checkpoint-iteration).
    A detector that does not export to ONNX faithfully is registered for the torch backend, and says why."""
    from registry.register import register_checkpoint, register_session_checkpoint
    if from_session:
        clashing = [f"--{flag}" for flag, value in (("checkpoint", checkpoint), ("arch", arch), ("labels", labels_file),
                                                     ("task", task), ("num-classes", num_classes),
                                                     ("gradcam-layer", gradcam_layer)) if value is not None]
        if clashing:
            raise click.UsageError(f"--from-session takes the model from the session; drop {', '.join(clashing)}")
        result = register_session_checkpoint(
            name, from_session, checkpoint_iteration, parse_assignments(assignments), alias=alias,
            parity_tolerance=parity_tolerance, tracking_uri=tracking_uri, progress=StepProgress(),
        )
    else:
        missing = [f"--{flag}" for flag, value in (("checkpoint", checkpoint), ("arch", arch), ("labels", labels_file),
                                                    ("task", task)) if value is None]
        if missing:
            raise click.UsageError(f"missing {', '.join(missing)} (or give --from-session DIR)")
        if checkpoint_iteration is not None:
            raise click.UsageError("--checkpoint-iteration needs --from-session")
        result = register_checkpoint(
            name, checkpoint, arch, read_labels(labels_file), task, parse_assignments(assignments),
            alias=alias, num_classes=num_classes, gradcam_layer=gradcam_layer, parity_tolerance=parity_tolerance,
            tracking_uri=tracking_uri, progress=StepProgress(),
        )
    alias_note = f" (alias @{result.alias})" if result.alias else ""
    console.print(f"Registered [bold]{result.uri}[/bold]{alias_note}; {describe_onnx(result)}")
    if result.alias:
        console.print(moved_alias_hint(name, result.alias))
    stdout.print(result.uri)


@click.group()
def models() -> None:
    """List, inspect, alias and re-configure registered models."""


@models.command("list")
@tracking_uri_option
@user_errors
def list_models(tracking_uri: str | None) -> None:
    """Registered models with their latest version and aliases."""
    from registry.resolve import list_versions
    from registry.store import open_client

    client = open_client(tracking_uri)
    table = Table("name", "latest", "versions", "aliases", "updated")
    for model in client.search_registered_models(order_by=["name ASC"]):
        versions = list_versions(client, model.name)
        latest = max((int(v.version) for v in versions), default=0)
        aliases = ", ".join(f"@{alias}={version}" for alias, version in sorted(model.aliases.items()))
        table.add_row(model.name, str(latest or "-"), str(len(versions)), aliases or "-",
                      _time(model.last_updated_timestamp))
    stdout.print(table)


@models.command("show")
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@tracking_uri_option
@user_errors
def show_model(ref: str, as_json: bool, tracking_uri: str | None) -> None:
    """Show a version: REF is NAME (latest), NAME/VERSION, NAME@ALIAS or a models:/ URI."""
    from registry.references import parse_model_ref
    from registry.resolve import download_version
    from registry.store import open_client

    client = open_client(tracking_uri)
    downloaded = download_version(client, parse_model_ref(ref))
    version, files = downloaded.version, downloaded.files
    spec = files.read_spec()
    info = {
        "uri": downloaded.uri,
        "name": version.name,
        "version": int(version.version),
        "aliases": sorted(version.aliases),
        "created": _time(version.creation_timestamp),
        "source_run": version.run_id,
        "spec": spec.model_dump(mode="json"),
        "settings": files.read_settings(spec.task).model_dump(mode="json"),
        "labels": files.read_labels(),
        "onnx_max_abs_diff": float(version.tags[TAG_PARITY]) if TAG_PARITY in version.tags else None,
        "backends": version.tags.get(TAG_BACKENDS, "onnxruntime,torch").split(","),
        "onnx_refused": version.tags.get(TAG_ONNX_REFUSED),
        "derived_from": version.tags.get(TAG_DERIVED_FROM),
        "training_session": version.tags.get(TAG_TRAINING_SESSION),
        "training_iteration": version.tags.get(TAG_TRAINING_ITERATION),
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    table = Table(show_header=False, title=info["uri"])
    for key, value in info.items():
        shown = ", ".join(value) if isinstance(value, list) else value
        if isinstance(value, dict):
            shown = "\n".join(f"{k} = {v}" for k, v in value.items())
        table.add_row(key, "-" if shown in (None, "") else str(shown))
    stdout.print(table)


@models.command("alias")
@click.argument("name")
@click.argument("alias")
@click.argument("version", type=int)
@tracking_uri_option
@user_errors
def alias_model(name: str, alias: str, version: int, tracking_uri: str | None) -> None:
    """Point ALIAS of NAME at VERSION (moving it if it pointed elsewhere)."""
    from registry.references import ModelRef, validate_alias
    from registry.resolve import resolve_version
    from registry.store import open_client

    client = open_client(tracking_uri)
    validate_alias(alias)
    resolve_version(client, ModelRef(name, version))
    client.set_registered_model_alias(name, alias, str(version))
    console.print(f"{ModelRef(name, alias=alias).uri} -> version {version}")
    console.print(moved_alias_hint(name, alias))


def moved_alias_hint(name: str, alias: str) -> str:
    """What a moved alias does to running deployments of it: nothing, until they are told."""
    from registry.references import ModelRef

    uri = ModelRef(name, alias=alias).uri
    return (f"[dim]Deployments of {uri} keep serving the version they were made with; `lantern deploy update "
            f"DEPLOYMENT --model {uri}` moves one to it (or `lantern rollout` a new deployment of it).[/dim]")


@models.command("settings")
@click.argument("name")
@click.argument("version", type=int)
@set_option
@tracking_uri_option
@user_errors
def settings_model(name: str, version: int, assignments: tuple[str, ...], tracking_uri: str | None) -> None:
    """Register a NEW version of NAME with VERSION's weights and updated settings (VERSION is untouched)."""
    from registry.register import register_settings_update

    if not assignments:
        raise click.UsageError("give at least one --set key=value")
    result = register_settings_update(name, version, parse_assignments(assignments), tracking_uri=tracking_uri,
                                      progress=StepProgress())
    console.print(f"Registered [bold]{result.uri}[/bold] with the new settings (from {name}/{version}); "
                  f"{describe_onnx(result)}")
    stdout.print(result.uri)
