"""Turning logits into probabilities and predicted labels for a task."""

from __future__ import annotations

import numpy as np

from registry.settings import ClassificationSettings, MultilabelSettings


def probabilities(logits: np.ndarray, task: str) -> np.ndarray:
    """Softmax over classes for multi-class, an independent sigmoid per label for multi-label."""
    logits = logits.astype(np.float64)
    if task == "multilabel":
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def predicted_indices(probs: np.ndarray, task: str, settings: ClassificationSettings,
                      threshold: float | None = None) -> list[list[int]]:
    """Per row: [argmax] for multi-class; every label whose probability exceeds the threshold for multi-label."""
    if task == "multilabel":
        if threshold is None:
            threshold = settings.confidence_score_threshold_multilabel if isinstance(settings, MultilabelSettings) else 0.5
        return [[int(i) for i in np.flatnonzero(row > threshold)] for row in probs]
    return [[int(np.argmax(row))] for row in probs]
