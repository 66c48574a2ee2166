"""Class labels of a model: read from a text file (one per line) or a JSON list, validated."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from registry.errors import SpecError


def validate_labels(labels: list[str]) -> list[str]:
    """Labels must be non-empty, distinct strings."""
    if not labels:
        raise SpecError("the labels list is empty")
    bad = [label for label in labels if not isinstance(label, str) or not label.strip()]
    if bad:
        raise SpecError(f"labels must be non-empty strings, got {bad[:5]!r}")
    duplicates = sorted(label for label, count in Counter(labels).items() if count > 1)
    if duplicates:
        raise SpecError(f"labels must be distinct; repeated: {', '.join(duplicates)}")
    return [label.strip() for label in labels]


def read_labels(path: str | Path) -> list[str]:
    """Read labels from `path`: a JSON list, or plain text with one label per line (blank lines skipped)."""
    file = Path(path)
    if not file.is_file():
        raise SpecError(f"labels file not found: {file}")
    text = file.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            labels = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(f"labels file {file} is not valid JSON: {error}") from None
        if not isinstance(labels, list):
            raise SpecError(f"labels file {file} must hold a JSON list of strings")
    else:
        labels = [line.strip() for line in text.splitlines() if line.strip()]
    return validate_labels(labels)
