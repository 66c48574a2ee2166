"""`lantern data ...`: datasets on the command line."""

from __future__ import annotations

from pathlib import Path

import click

from lantern.console import console, stdout
from training.shapes import ShapesConfig, write_shapes_dataset


@click.group()
def data() -> None:
    """Make datasets."""


@data.command("shapes")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--count", default=300, show_default=True, help="Number of images.")
@click.option("--image-size", default=64, show_default=True, help="Side of the square images in pixels.")
@click.option("--seed", default=0, show_default=True)
@click.option("--multilabel", is_flag=True, help="Several shapes per image; labels are lists.")
def shapes(out_dir: str, count: int, image_size: int, seed: int, multilabel: bool) -> None:
    """Write the synthetic shapes dataset (images, masks, labels.txt, index.jsonl) to OUT_DIR."""
    config = ShapesConfig(count=count, image_size=image_size, seed=seed, multilabel=multilabel)
    with console.status(f"Drawing {count} images"):
        index = write_shapes_dataset(Path(out_dir), config)
    console.print(f"Wrote {count} images to {out_dir}")
    stdout.print(index)
