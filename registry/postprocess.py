"""Turning logits into probabilities and predicted labels for a task."""

from __future__ import annotations

import numpy as np

from registry.settings import DEFAULT_MULTILABEL_THRESHOLD, ClassificationSettings, MultilabelSettings


def probabilities(logits: np.ndarray, task: str) -> np.ndarray:
    """Softmax over classes for multi-class, an independent sigmoid per label for multi-label."""
    logits = logits.astype(np.float64)
    if task == "multilabel":
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def multilabel_threshold(settings: ClassificationSettings, threshold: float | None = None) -> float:
    """The score a multi-label prediction must exceed: `threshold` when given (a request's own), else the version's
    confidence_score_threshold_multilabel, else the default."""
    if threshold is not None:
        return threshold
    if isinstance(settings, MultilabelSettings):
        return settings.confidence_score_threshold_multilabel
    return DEFAULT_MULTILABEL_THRESHOLD


def predicted_indices(probs: np.ndarray, task: str, settings: ClassificationSettings,
                      threshold: float | None = None) -> list[list[int]]:
    """Per row: [argmax] for multi-class; every label whose probability (float64) is strictly above the threshold for
    multi-label. The one rule /score, /predict, /explain, the pyfunc flavour and `lantern explain` apply."""
    if task == "multilabel":
        above = multilabel_threshold(settings, threshold)
        return [[int(i) for i in np.flatnonzero(row > above)] for row in probs]
    return [[int(np.argmax(row))] for row in probs]


def predicted_from_logits(logits: np.ndarray, task: str, settings: ClassificationSettings,
                          threshold: float | None = None) -> list[int]:
    """One image's predicted label indices from its logits [labels] (what an explanation explains by default)."""
    return predicted_indices(probabilities(np.asarray(logits)[None], task), task, settings, threshold)[0]
