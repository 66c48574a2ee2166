"""Parsing /score rows: the cloud's JSON string per row, bare base64, and a row's fields as columns of their own."""

from __future__ import annotations

import json

import pytest

from serving.http.errors import ApiError
from serving.http.schemas import ScoreRequest, parse_score_rows

IMAGE = "iVBORw0KGgo="  # the rows are parsed, not decoded: any base64 text does


def rows_of(columns: list[str], data: list) -> list:
    return parse_score_rows(ScoreRequest.model_validate({"input_data": {"columns": columns, "data": data}}))


def refusal(columns: list[str], data: list) -> ApiError:
    with pytest.raises(ApiError) as raised:
        rows_of(columns, data)
    return raised.value


def test_a_rows_fields_as_columns_equal_the_same_fields_in_its_json() -> None:
    fields = {"model_explainability": True, "confidence_score_threshold_multilabel": 0.3,
              "xai_parameters": {"xai_algorithm": "integrated_gradients", "n_steps": 8, "attributions": True}}
    in_json = rows_of(["image"], [json.dumps({"image_base64": IMAGE, **fields})])
    as_columns = rows_of(["image", *fields], [[IMAGE, *fields.values()]])
    xai_as_text = rows_of(["image", *fields], [[IMAGE, True, 0.3, json.dumps(fields["xai_parameters"])]])
    assert in_json == as_columns == xai_as_text
    assert as_columns[0].model_explainability and as_columns[0].xai_parameters.attributions


def test_columns_can_complete_a_json_row_and_missing_cells_keep_the_defaults() -> None:
    row = json.dumps({"image_base64": IMAGE, "xai_parameters": {"xai_algorithm": "guided_backprop"}})
    completed, = rows_of(["model_explainability", "image"], [[True, row]])
    assert completed.model_explainability and completed.xai_parameters.xai_algorithm == "guided_backprop"
    default, = rows_of(["image", "model_explainability"], [[IMAGE, None]])
    assert not default.model_explainability


@pytest.mark.parametrize("columns, data, code, message", [
    (["image", "id"], [[IMAGE, 7]], "invalid_columns", "unknown column(s) 'id'; the columns are 'image' and optionally"),
    (["image", "image"], [[IMAGE, IMAGE]], "invalid_columns", "a column is named twice"),
    (["label"], [["x"]], "invalid_columns", "must include 'image'"),
    (["image", "model_explainability"], [IMAGE], "invalid_row", "a row must be a list of one value per column"),
    (["image", "model_explainability"], [[IMAGE]], "invalid_row", "one value per column"),
    (["image"], [[7]], "invalid_row", "the image a string"),
    (["image", "model_explainability"], [[json.dumps({"image_base64": IMAGE, "model_explainability": False}), True]],
     "invalid_row", "model_explainability is given twice"),
    (["image", "model_explainability"], [[IMAGE, "perhaps"]], "invalid_row", "model_explainability"),
    (["image", "xai_parameters"], [[IMAGE, "{not json"]], "invalid_json", "input_data.data[0].xai_parameters is not"),
    (["image"], ['{"image_base64": "%s", "confidence_score_threshold_multilabel": NaN}' % IMAGE], "invalid_json",
     "input_data.data[0] is not valid JSON: NaN is not a JSON number"),
    (["image"], ['{"image_base64": "%s", "model_explainability": true, "model_explainability": false}' % IMAGE],
     "invalid_json", "input_data.data[0] is not valid JSON: the name 'model_explainability' is given twice"),
    (["image", "xai_parameters"], [[IMAGE, {"xai_algorithm": "xrai", "n_steps": 1}]], "invalid_xai_parameters",
     "input_data.data[0].xai_parameters: invalid parameters for xrai: n_steps"),
    (["image", "confidence_score_threshold_multilabel"], [[IMAGE, 2]], "invalid_row",
     "confidence_score_threshold_multilabel"),
])
def test_bad_columns_and_cells_are_named(columns: list[str], data: list, code: str, message: str) -> None:
    error = refusal(columns, data)
    assert error.status in (400, 422) and error.code == code and message in error.message, error.message


def test_an_index_must_match_the_rows_and_params_must_be_empty() -> None:
    """pandas refuses an index whose length differs from the data's; inference params would be silently unused."""
    def parsed(**body: object) -> list:
        return parse_score_rows(ScoreRequest.model_validate({"input_data": {"data": [IMAGE, IMAGE]}, **body}))

    assert len(parsed()) == len(parsed(input_data={"data": [IMAGE, IMAGE], "index": [4, 9]}, params={})) == 2
    for body, code, message in (
            ({"input_data": {"data": [IMAGE, IMAGE], "index": [0]}}, "invalid_index",
             "input_data.index has 1 item(s) but input_data.data has 2 row(s)"),
            ({"params": {"top_k": 3}}, "invalid_params", "params: /score takes no inference parameters (got 'top_k')")):
        with pytest.raises(ApiError) as raised:
            parsed(**body)
        assert raised.value.status == 422 and raised.value.code == code and message in raised.value.message
