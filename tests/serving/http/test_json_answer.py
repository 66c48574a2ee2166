"""JSON answers (serving/http/json_answer.py): the same content as the standard encoder's, and 424 for non-finite numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from serving.http.errors import ApiError
from serving.http.json_answer import all_finite, json_response
from serving.http.schemas import ScoreItem


def item(**fields) -> ScoreItem:
    return ScoreItem(probs=[0.25, 0.75], labels=["circle", "square"], deployment="blue", model_version="models:/m/1",
                     **fields)


def test_an_answer_reads_back_as_what_was_given() -> None:
    attributions = (np.random.default_rng(0).standard_normal((3, 8, 8)) * 1e-5).astype(np.float32).tolist()
    answer = json_response([item(attributions=attributions, visualizations="iVBORw0K"), item()])
    assert answer.media_type == "application/json"
    first, second = json.loads(answer.body)
    assert first["attributions"] == attributions and first["visualizations"] == "iVBORw0K"  # every float exact
    assert second == {"probs": [0.25, 0.75], "labels": ["circle", "square"], "deployment": "blue",
                      "model_version": "models:/m/1"}  # None fields left out


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["probs", "attributions", "row"])
def test_nan_or_infinity_anywhere_is_424(bad: float, where: str) -> None:
    rows = [[0.0, 1.0], [2.0, 3.0]]
    if where == "probs":
        answer = item()
        answer.probs = [bad, 0.5]
    elif where == "attributions":
        answer = item(attributions=[[[0.0, bad]], rows])
    else:
        answer = item(attributions=[[[0.0, "x", bad]]])  # a row that is not all floats is walked item by item
    with pytest.raises(ApiError) as refused:
        json_response([item(), answer])
    assert refused.value.status == 424 and "not finite" in refused.value.message


def test_all_finite_walks_every_kind_of_value() -> None:
    assert all_finite({"a": [1, 2.5, "x", None, True, {"b": [[0.0] * 300]}], "c": []})
    assert not all_finite({"a": [{"b": {"c": [1.0, float("nan")]}}]})
    assert not all_finite([[1.0, 2.0], [3, float("inf")]])


def test_keys_and_numbers_read_back_as_the_standard_encoder_writes_them() -> None:
    answer = item(attributions={0: [1e-05, -2.5e-300, 123456789.125], "label": True})
    assert json.loads(json_response(answer).body) == json.loads(json.dumps(answer.model_dump(exclude_none=True)))
