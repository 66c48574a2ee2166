"""`lantern explain IMAGE --model models:/NAME@ALIAS --method ...`: explain one image with a registered version.

It lives in `lantern/` because it joins two packages that must not import each other: `registry` (the version,
its preprocessing) and `explain` (the attribution methods)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from explain.params import METHODS
from lantern.console import console, stdout, user_errors

ENCODINGS = ("float32", "float16", "npy_base64")


@click.command("explain")
@click.argument("image", type=click.Path(dir_okay=False, exists=True))
@click.option("--model", "model_ref", required=True, help="models:/NAME/VERSION or models:/NAME@ALIAS.")
@click.option("--method", default="integrated_gradients", show_default=True,
              type=click.Choice(METHODS))
@click.option("--param", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Method parameter, e.g. --param n_steps=100 (repeatable).")
@click.option("--target", "target_labels", multiple=True, help="Explain this label instead of the prediction.")
@click.option("--out", type=click.Path(dir_okay=False), help="Write the 2x2 PNG here (one per target: -LABEL added).")
@click.option("--attributions", "attributions_out", type=click.Path(dir_okay=False),
              help="Write the [targets, 3, crop, crop] float32 attributions as .npy.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--tracking-uri", envvar="MLFLOW_TRACKING_URI", default=None, help="MLflow tracking URI.")
@user_errors
def explain_command(image: str, model_ref: str, method: str, assignments: tuple[str, ...],
                    target_labels: tuple[str, ...], out: str | None, attributions_out: str | None, device: str,
                    tracking_uri: str | None) -> None:
    """Explain a registered model's prediction on IMAGE; prints the fidelity report as JSON."""
    import numpy as np

    from explain.attribute import attribute
    from explain.params import ExplainError
    from registry.devices import torch_device
    from registry.errors import LanternError
    from registry.images import decode_image
    from registry.preprocess import Preprocess
    from registry.resolve import load_bundle
    from registry.settings import parse_assignments

    params = parse_assignments(assignments)
    bundle = load_bundle(model_ref, tracking_uri=tracking_uri, device=str(torch_device(device)))
    unknown = [label for label in target_labels if label not in bundle.labels]
    if unknown:
        raise LanternError(f"unknown label(s) {', '.join(unknown)}; {bundle.uri} knows {', '.join(bundle.labels)}")
    preprocess = Preprocess.for_model(bundle.spec, bundle.settings)
    cropped = preprocess.crop(decode_image(Path(image).read_bytes(), shorter_side=preprocess.resize_size))
    x = preprocess.normalize(cropped).to(next(bundle.module.parameters()).device)
    threshold = getattr(bundle.settings, "confidence_score_threshold_multilabel", 0.5)
    try:
        explanation = attribute(
            bundle.module, x, method, params,
            targets=[bundle.labels.index(label) for label in target_labels] or None,
            task=bundle.spec.task, threshold=threshold, gradcam_layer=bundle.spec.gradcam_layer,
            mean=bundle.spec.normalize_mean, std=bundle.spec.normalize_std, image=np.asarray(cropped),
        )
    except ExplainError as error:
        raise LanternError(str(error)) from None
    labels = [bundle.labels[t] for t in explanation.targets]
    if out:
        for index, label in enumerate(labels):
            path = Path(out) if len(labels) == 1 else Path(out).with_name(f"{Path(out).stem}-{label}{Path(out).suffix}")
            path.write_bytes(explanation.visualization_png(index))
            console.print(f"Wrote {path} ({label})")
    if attributions_out:
        np.save(attributions_out, explanation.attributions.numpy())
        console.print(f"Wrote {attributions_out} {tuple(explanation.attributions.shape)}")
    report = {"model": bundle.uri, "labels": labels, **explanation.fidelity.model_dump()}
    stdout.print_json(json.dumps(report))
