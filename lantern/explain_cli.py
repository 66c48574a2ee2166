"""`lantern explain IMAGE... --model models:/NAME@ALIAS --method ...`: explain images with a registered version (or
`--url URL --job`: on a running endpoint).

One image writes its PNG (`--out`) and attributions (`--attributions`) where asked and prints its report. Several
images, or folders of them, need `--out-dir`: each image gets `NAME.png` (`NAME-LABEL.png` per target when there are
several) and `NAME.npy`, every report goes to `reports.jsonl`, and a bar shows the progress. An image that cannot be
read is reported and skipped; the exit status is then 1.

With `--url URL --job` the images are explained on a running endpoint instead, through one explanation job
(serving/client/explain_jobs.py: HTTP only).

It lives in `lantern/` because it joins two packages that must not import each other: `registry` (the version,
its preprocessing) and `explain` (the attribution methods)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from explain.params import METHODS
from registry.console import console, stdout, user_errors
from serving.environment import PRIMARY_ENV

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_paths(arguments: tuple[str, ...]) -> list[Path]:
    """The images named, a folder standing for the images directly inside it (sorted by name)."""
    from registry.errors import LanternError

    paths: list[Path] = []
    for argument in arguments:
        path = Path(argument)
        if not path.is_dir():
            paths.append(path)
            continue
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise LanternError(f"{path} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
        paths.extend(found)
    return paths


def output_names(paths: list[Path]) -> list[str]:
    """A distinct output name per image: its stem, with -2, -3... added where stems repeat (a/x.png, b/x.jpg)."""
    names, taken = [], set()
    for path in paths:
        name, count = path.stem, 1
        while name in taken:
            count += 1
            name = f"{path.stem}-{count}"
        taken.add(name)
        names.append(name)
    return names


@click.command("explain")
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--model", "model_ref", help="models:/NAME/VERSION or models:/NAME@ALIAS: explain here, with this "
                                           "registered version.")
@click.option("--url", help="Explain on the running endpoint at this URL instead, through an explanation job (needs "
                            "its scoring key).")
@click.option("--job", "as_job", is_flag=True, help="With --url: submit one job, show its progress, download the "
                                                    "result (the only way --url explains; Ctrl+C cancels the job).")
@click.option("--key", envvar=PRIMARY_ENV, show_envvar=True, help="With --url: the endpoint's scoring key.")
@click.option("--deployment", help="With --url: pin the job to this deployment (else the traffic split picks).")
@click.option("--method", default="integrated_gradients", show_default=True,
              type=click.Choice(METHODS))
@click.option("--param", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Method parameter, e.g. --param n_steps=100 (repeatable).")
@click.option("--target", "target_labels", multiple=True, help="Explain this label instead of the prediction.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the 2x2 PNG here (one per target: -LABEL added).")
@click.option("--attributions", "attributions_out", type=click.Path(dir_okay=False),
              help="Write the [targets, 3, crop, crop] float32 attributions as .npy.")
@click.option("--out-dir", type=click.Path(file_okay=False),
              help="Write NAME.png, NAME.npy and reports.jsonl here, for each image (needed for several images).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, help="MLflow tracking URI.")
@user_errors
def explain_command(images: tuple[str, ...], model_ref: str | None, url: str | None, as_job: bool, key: str | None,
                    deployment: str | None, method: str, assignments: tuple[str, ...],
                    target_labels: tuple[str, ...], out: str | None, attributions_out: str | None,
                    out_dir: str | None, device: str, tracking_uri: str | None) -> None:
    """Explain a registered model's predictions on IMAGES (files or folders), here (--model) or on a running
    endpoint through an explanation job (--url); prints the report as JSON."""
    from explain.layout import fastest_layout
    from explain.params import ExplainError, parse_params
    from registry.devices import torch_device
    from registry.errors import LanternError
    from registry.resolve import load_bundle
    from registry.settings import parse_assignments

    paths = image_paths(images)
    if out_dir is None and len(paths) > 1:
        raise LanternError(f"{len(paths)} images to explain: give --out-dir DIR (it gets NAME.png, NAME.npy and "
                           "reports.jsonl for each)")
    if out_dir is not None and (out or attributions_out):
        raise LanternError("--out and --attributions name one image's files; with --out-dir each image's files are "
                           "named after it")
    params = parse_assignments(assignments, "--param")
    try:
        parse_params(method, params)  # a bad parameter fails before the model is loaded, not once per image
    except ExplainError as error:
        raise LanternError(str(error)) from None
    if (model_ref is None) == (url is None):
        raise LanternError("give --model (explain here with a registered version) or --url (on a running endpoint, "
                           "through a job)" + (", not both" if model_ref else ""))
    if url is None and (as_job or deployment):
        raise LanternError("--job and --deployment are for an endpoint: give its --url")
    if url is not None:
        from serving.client.explain_jobs import explain_remotely

        summary = explain_remotely(url, key, paths, method, params, list(target_labels), deployment, out,
                                   attributions_out, out_dir)
        stdout.print_json(json.dumps(summary))
        if summary["failed"]:
            raise click.exceptions.Exit(1)
        return
    bundle = load_bundle(model_ref, tracking_uri=tracking_uri, device=str(torch_device(device)))
    fastest_layout(bundle.module)
    unknown = [label for label in target_labels if label not in bundle.labels]
    if unknown:
        raise LanternError(f"unknown label(s) {', '.join(unknown)}; {bundle.uri} knows {', '.join(bundle.labels)}")
    explainer = Explainer(bundle, method, params, [bundle.labels.index(label) for label in target_labels] or None)
    if out_dir is None:
        explanation = explainer(paths[0])
        labels = [bundle.labels[t] for t in explanation.targets]
        if out:
            for index, label in enumerate(labels):
                path = Path(out) if len(labels) == 1 else \
                    Path(out).with_name(f"{Path(out).stem}-{label}{Path(out).suffix}")
                path.write_bytes(explanation.visualization_png(index))
                console.print(f"Wrote {path} ({label})")
        if attributions_out:
            import numpy as np

            np.save(attributions_out, explanation.attributions.numpy())
            console.print(f"Wrote {attributions_out} {tuple(explanation.attributions.shape)}")
        stdout.print_json(json.dumps({"model": bundle.uri, "labels": labels, **explanation.fidelity.model_dump()}))
        return
    summary = explain_into(explainer, paths, Path(out_dir))
    stdout.print_json(json.dumps(summary))
    if summary["failed"]:
        raise click.exceptions.Exit(1)


class Explainer:
    """One registered version's explanations of image files, with its preprocessing, on its device."""

    def __init__(self, bundle: Any, method: str, params: dict[str, Any], targets: list[int] | None) -> None:
        from registry.preprocess import Preprocess

        self.bundle, self.method, self.params, self.targets = bundle, method, params, targets
        self.preprocess = Preprocess.for_model(bundle.spec, bundle.settings)
        self.device = next(bundle.module.parameters()).device

    def __call__(self, path: Path) -> Any:
        from registry.images import decode_image
        from serving.runtime.deployment import explain_version

        cropped = self.preprocess.crop(decode_image(path.read_bytes(), shorter_side=self.preprocess.resize_size))
        x = self.preprocess.normalize(cropped).to(self.device)
        return explain_version(self.bundle.module, self.bundle.spec, self.bundle.settings, x, cropped, self.method,
                               self.params, self.targets)


def explain_into(explainer: Explainer, paths: list[Path], folder: Path) -> dict[str, Any]:
    """Explain every image into `folder`; an unreadable image is reported (in reports.jsonl and the summary) and
    skipped. Answers the summary printed on stdout."""
    import numpy as np

    from registry.errors import LanternError

    folder.mkdir(parents=True, exist_ok=True)
    labels_of = explainer.bundle.labels
    failed: list[dict[str, str]] = []
    start = time.perf_counter()
    with (folder / "reports.jsonl").open("w") as reports:
        for path, name in progress(paths, output_names(paths), explainer.method):
            try:
                explanation = explainer(path)
            except LanternError as error:  # an unreadable image: the others are still explained
                failed.append({"image": str(path), "error": str(error)})
                reports.write(json.dumps(failed[-1]) + "\n")
                console.print(f"[red]Skipped[/red] {path}: {error}")
                continue
            labels = [labels_of[t] for t in explanation.targets]
            pictures = [f"{name}.png"] if len(labels) == 1 else [f"{name}-{label}.png" for label in labels]
            for index, picture in enumerate(pictures):
                (folder / picture).write_bytes(explanation.visualization_png(index))
            np.save(folder / f"{name}.npy", explanation.attributions.numpy())
            reports.write(json.dumps({"image": str(path), "labels": labels, "visualizations": pictures,
                                      "attributions": f"{name}.npy", **explanation.fidelity.model_dump()}) + "\n")
    return {"model": explainer.bundle.uri, "method": explainer.method, "out_dir": str(folder),
            "images": len(paths), "explained": len(paths) - len(failed), "failed": failed,
            "seconds": round(time.perf_counter() - start, 3)}


def progress(paths: list[Path], names: list[str], method: str) -> Iterator[tuple[Path, str]]:
    """(path, output name) pairs, with a progress bar on a terminal, else one line per image."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if not console.is_terminal:
        for number, (path, name) in enumerate(zip(paths, names), 1):
            console.print(f"{method} {number}/{len(paths)}: {path}")
            yield path, name
        return
    with Progress(TextColumn(f"Explaining ({method})"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("explain", total=len(paths))
        for path, name in zip(paths, names):
            yield path, name
            bar.advance(task)
