"""The registered model as an MLflow `pyfunc` model, so MLflow's own tools can load and serve it.

Input: a DataFrame with an `image` column of base64-encoded image bytes (raw bytes are accepted too).
Output: a DataFrame with, per image, `predicted` (the top label; a list of labels for multi-label), `probs` (in label
order) and `labels` (all labels, in order); for a detector, `boxes` (the cloud's answer: normalised boxes with label
and score, and polygons for instance segmentation), from its ONNX export or, for a version without one, from torch.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from registry.checkpoint import fit_state_dict, load_state_dict
from registry.detection_inference import Detector, answer_image, decode_side, torch_detector
from registry.detector_onnx import onnx_detector
from registry.detectors import apply_detection_settings
from registry.errors import LanternError
from registry.images import decode_image
from registry.model_files import ModelFiles
from registry.onnx_export import INPUT_NAME, OUTPUT_NAME, make_session
from registry.postprocess import predicted_indices, probabilities
from registry.preprocess import Preprocess
from registry.settings import DetectionSettings
from registry.spec import build_module

SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "image")]))


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise LanternError("the `image` column must hold base64-encoded image bytes") from None
    raise LanternError(f"the `image` column must hold base64 strings or bytes, got {type(value).__name__}")


class LanternImageModel(mlflow.pyfunc.PythonModel):
    """Predicts labels and probabilities with the version's ONNX model and preprocessing settings."""

    _skip_type_hint_validation = True  # the signature is given explicitly when the model is logged

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        files = ModelFiles.from_artifacts(context.artifacts)
        self.spec = files.read_spec()
        self.labels = files.read_labels()
        self.settings = files.read_settings(self.spec.task)
        if isinstance(self.settings, DetectionSettings):
            self.detector = self._detector(files)
            return
        self.preprocess = Preprocess.for_model(self.spec, self.settings)
        self.session = make_session(files.onnx)

    def _detector(self, files: ModelFiles) -> Detector:
        if files.onnx is not None:
            return onnx_detector(files.onnx)
        module = build_module(self.spec)
        fit_state_dict(module, load_state_dict(files.weights))
        return torch_detector(apply_detection_settings(module, self.settings))

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would infer a signature from them
        """`model_input`: a DataFrame with an `image` column (MLflow enforces the signature before this runs)."""
        if "image" not in model_input.columns:
            raise LanternError("the input needs an `image` column of base64-encoded image bytes")
        if isinstance(self.settings, DetectionSettings):
            side = decode_side(self.settings)
            return pd.DataFrame([
                answer_image(decode_image(_image_bytes(value), shorter_side=side), self.detector, self.labels,
                             self.settings).model_dump(exclude_none=True)
                for value in model_input["image"]])
        batch = self.preprocess.batch(decode_image(_image_bytes(value), shorter_side=self.preprocess.resize_size)
                                     for value in model_input["image"]).numpy()
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        probs = probabilities(logits, self.spec.task)
        rows = []
        for row, chosen in zip(probs, predicted_indices(probs, self.spec.task, self.settings)):
            names = [self.labels[i] for i in chosen]
            rows.append({
                "predicted": names if self.spec.task == "multilabel" else names[0],
                "probs": [float(p) for p in np.asarray(row)],
                "labels": list(self.labels),
            })
        return pd.DataFrame(rows)
