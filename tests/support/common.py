"""The small model the tests register (its labels and settings), the installed `lantern` command, and the environment
without a store."""

from __future__ import annotations

import os
import sys
from pathlib import Path

LABELS = ["circle", "square", "triangle"]
SMALL_SETTINGS = {"valid_resize_size": 40, "valid_crop_size": 32}
MINUTE_ITERATIONS = 1000  # about a minute of training on a 2-core CPU


def lantern_executable() -> str:
    """The `lantern` console script installed beside this interpreter."""
    return str(Path(sys.executable).with_name("lantern"))


def env_without_store() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "LANTERN_HOME")}
