"""Files readable by their owner only (0600): the endpoint's keys, its state and the workers' statuses (key digests
and what each worker serves)."""

from __future__ import annotations

import os
from pathlib import Path


def replace_private(path: Path, text: str, temporary: Path) -> None:
    """Write `text` to `temporary`, created 0600, then move it over `path` in one step (readers see the old file or the
    new one, never half of it)."""
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)
