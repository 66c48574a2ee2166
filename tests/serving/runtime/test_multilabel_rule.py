"""One multi-label rule (registry/postprocess.py): a label is predicted when its probability, in float64, is strictly
above the threshold. Predictions (/score, /predict, the pyfunc flavour) and explanations (/explain, `lantern
explain`) apply the same one, so they cannot pick different labels at the threshold (explanations used a float32
`sigmoid >= threshold` of their own)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from registry.postprocess import predicted_from_logits, predicted_indices, probabilities
from registry.settings import DEFAULT_MULTILABEL_THRESHOLD, build_settings
from registry.spec import make_spec
from serving.runtime.deployment import explain_version

LOGITS = np.array([0.0, 2.0, -2.0, 1e-9])  # sigmoid(0) is the default threshold exactly


class FixedLogits(torch.nn.Module):
    """Answers LOGITS whatever the image (plus a term in it, so gradients flow)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(LOGITS, dtype=x.dtype) + 0 * x.mean((1, 2, 3))[:, None]


def test_a_label_exactly_at_the_threshold_is_not_predicted() -> None:
    settings = build_settings("multilabel")
    assert settings.confidence_score_threshold_multilabel == DEFAULT_MULTILABEL_THRESHOLD == 0.5
    assert probabilities(LOGITS[None], "multilabel")[0][0] == 0.5
    assert predicted_from_logits(LOGITS, "multilabel", settings) == [1, 3]
    assert predicted_indices(probabilities(LOGITS[None], "multilabel"), "multilabel", settings) == [[1, 3]]
    assert predicted_from_logits(LOGITS, "multilabel", settings, threshold=0.4) == [0, 1, 3]
    tighter = build_settings("multilabel", {"confidence_score_threshold_multilabel": 0.8})
    assert predicted_from_logits(LOGITS, "multilabel", tighter) == [1]
    assert predicted_from_logits(LOGITS, "multiclass", build_settings("multiclass")) == [1]


def test_an_explanation_explains_what_the_prediction_predicted() -> None:
    spec = make_spec("small_cnn", len(LOGITS), "multilabel")
    settings = build_settings("multilabel")
    cropped = Image.new("RGB", (16, 16), (120, 60, 30))
    x = torch.zeros(3, 16, 16)
    explanation = explain_version(FixedLogits(), spec, settings, x, cropped, "integrated_gradients", {"n_steps": 2})
    assert explanation.targets == predicted_from_logits(LOGITS, "multilabel", settings) == [1, 3]
    overridden = explain_version(FixedLogits(), spec, settings, x, cropped, "integrated_gradients", {"n_steps": 2},
                                 threshold=0.8)
    assert overridden.targets == [1]
    chosen = explain_version(FixedLogits(), spec, settings, x, cropped, "integrated_gradients", {"n_steps": 2},
                             targets=[2, 2, 0])
    assert chosen.targets == [2, 0]
