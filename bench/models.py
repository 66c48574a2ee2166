"""The benchmarks' models and images: resnet50 and the small CNN with random weights, registered as a user would
register them, and a shapes image as a JPEG."""

from __future__ import annotations

import io
from pathlib import Path

import torch

LABELS = [f"class-{i}" for i in range(10)]


def jpeg_image(size: int = 256) -> bytes:
    """A shapes image as a `size` x `size` JPEG (drawn at up to 1024 px, then enlarged)."""
    from PIL import Image

    from training.shapes import ShapesConfig, make_sample

    image = make_sample(ShapesConfig(image_size=min(size, 1024), seed=5), 0).image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def register_random(folder: Path, name: str, arch: str, settings: dict | None = None) -> str:
    """`arch` with random weights (seed 0) registered as `name`; its version's URI."""
    from safetensors.torch import save_file

    from registry.architectures import ARCHITECTURES
    from registry.register import register_checkpoint

    torch.manual_seed(0)
    model = ARCHITECTURES[arch].build(len(LABELS)).eval()
    checkpoint = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(checkpoint))
    return register_checkpoint(name, checkpoint, arch, LABELS, "multiclass", settings).uri


def register_resnet50(folder: Path) -> str:
    return register_random(folder, "bench-resnet50", "resnet50")


def register_tiny(folder: Path) -> str:
    """The small CNN at 64 px: a model that costs next to nothing, so serving costs are all that is measured."""
    return register_random(folder, "bench-tiny", "small_cnn", {"valid_resize_size": 64, "valid_crop_size": 64})
