"""/score as the cloud's clients call it: their code unchanged, rows and data frames, explanations per row."""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import httpx
import numpy as np
import pytest
from PIL import Image

from explain.encoding import decode_npy_base64
from support.common import LABELS
from support.scoring import auth, expected_probs, row, score_body
from support.servers import Server, png_bytes


def test_cloud_client_snippet_works_unchanged(server: Server, key: str) -> None:
    """The Python snippet of the cloud's "consume" page, with only the URL and key changed."""
    image = png_bytes(shape="circle")
    data = {"input_data": {"columns": ["image"], "data": [json.dumps({
        "image_base64": base64.encodebytes(image).decode("utf-8"), "model_explainability": True,
        "xai_parameters": {"xai_algorithm": "xrai", "n_steps": 8, "xrai_fast": True, "visualizations": True,
                           "attributions": True}})]}}
    body = str.encode(json.dumps(data))
    url = f"{server.url}/score"
    api_key = key
    headers = {"Content-Type": "application/json", "Accept": "application/json", "Authorization": ("Bearer " + api_key)}
    req = urllib.request.Request(url, body, headers)
    response = urllib.request.urlopen(req)
    result = json.loads(response.read())

    assert response.headers["x-lantern-deployment"] == "blue"
    assert response.headers["x-lantern-model-version"] == "models:/mc/1"
    assert len(result) == 1
    item = result[0]
    assert item["labels"] == LABELS and item["deployment"] == "blue" and item["model_version"] == "models:/mc/1"
    np.testing.assert_allclose(item["probs"], expected_probs("models:/mc/1", image), atol=1e-5)
    grid = Image.open(io.BytesIO(base64.b64decode(item["visualizations"])))
    assert grid.format == "PNG" and grid.width == grid.height
    attributions = np.asarray(item["attributions"])
    assert attributions.shape == (3, 32, 32)


@pytest.mark.parametrize("algorithm, ignored", [("xrai", None), ("integrated_gradients", "xrai_fast"),
                                                ("guided_gradcam", "n_steps, xrai_fast"),
                                                ("guided_backprop", "n_steps, xrai_fast")])
def test_the_cloud_clients_one_parameter_dict_works_with_every_algorithm(server: Server, key: str, algorithm: str,
                                                                       ignored: str | None) -> None:
    """The cloud's client keeps one `xai_parameters` dict and changes only `xai_algorithm`: another algorithm's
    parameters are accepted, ignored and named in x-lantern-ignored-parameters; a name no algorithm takes is a 422."""
    xai = {"xai_algorithm": algorithm, "n_steps": 8, "xrai_fast": True, "visualizations": True, "attributions": True}
    response = httpx.post(f"{server.url}/score", json=score_body(row(png_bytes(), model_explainability=True,
                                                                     xai_parameters=xai)),
                          headers=auth(key), timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers.get("x-lantern-ignored-parameters") == ignored
    assert np.asarray(response.json()[0]["attributions"]).shape == (3, 32, 32)
    unknown = httpx.post(f"{server.url}/score", json=score_body(row(png_bytes(), model_explainability=True,
                                                                    xai_parameters={**xai, "n_stepz": 8})),
                         headers=auth(key), timeout=60)
    assert unknown.status_code == 422 and "n_stepz: not a parameter of" in unknown.json()["error"]["message"]


def test_score_plain_base64_rows_and_row_lists(server: Server, key: str) -> None:
    images = [png_bytes(shape="circle"), png_bytes(shape="square", color=(30, 200, 30))]
    body = {"input_data": {"columns": ["image"], "index": [0, 1],
                           "data": [base64.encodebytes(images[0]).decode(), [base64.b64encode(images[1]).decode()]]}}
    response = httpx.post(f"{server.url}/score", json=body, headers=auth(key), timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()
    assert [set(item) for item in result] == [{"probs", "labels", "deployment", "model_version"}] * 2
    for item, image in zip(result, images):
        np.testing.assert_allclose(item["probs"], expected_probs("models:/mc/1", image), atol=1e-5)


def test_score_takes_a_pandas_dataframe_with_a_rows_fields_as_columns(server: Server, key: str) -> None:
    """A DataFrame in the split orientation (as MLflow clients send one): model_explainability and xai_parameters as
    columns of their own apply to their row; an unknown column is a 422, not silently dropped."""
    import pandas as pd

    image = png_bytes(shape="circle")
    frame = pd.DataFrame({"image": [base64.b64encode(image).decode()] * 2, "model_explainability": [True, False],
                          "xai_parameters": [json.dumps({"xai_algorithm": "guided_backprop", "attributions": True}),
                                             None]})
    def body(frame: pd.DataFrame) -> bytes:  # pandas' own JSON: a missing cell (NaN) is null
        return b'{"input_data": ' + frame.to_json(orient="split").encode() + b"}"

    response = httpx.post(f"{server.url}/score", content=body(frame), timeout=60,
                          headers=auth(key, **{"Content-Type": "application/json"}))
    assert response.status_code == 200, response.text
    explained, plain = response.json()
    assert np.asarray(explained["attributions"]).shape == (3, 32, 32) and "visualizations" in explained
    assert set(plain) == {"probs", "labels", "deployment", "model_version"}
    np.testing.assert_allclose(plain["probs"], expected_probs("models:/mc/1", image), atol=1e-5)

    frame["id"] = [1, 2]
    refused = httpx.post(f"{server.url}/score", content=body(frame), timeout=60,
                         headers=auth(key, **{"Content-Type": "application/json"}))
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_columns"
    assert "unknown column(s) 'id'" in refused.json()["error"]["message"]


def test_an_explanation_with_nothing_to_return_is_not_computed(server: Server, key: str) -> None:
    """model_explainability with visualizations and attributions both off: the prediction alone, and no explanation
    run (an XRAI nobody sees would take seconds, and an explanation slot)."""
    before = server.metric("lantern_explanation_runs_total", deployment="blue", method="xrai", outcome="completed")
    body = score_body(row(png_bytes(), model_explainability=True,
                          xai_parameters={"xai_algorithm": "xrai", "visualizations": False, "attributions": False}))
    response = httpx.post(f"{server.url}/score", json=body, headers=auth(key), timeout=60)
    assert response.status_code == 200, response.text
    assert set(response.json()[0]) == {"probs", "labels", "deployment", "model_version"}
    assert server.metric("lantern_explanation_runs_total", deployment="blue", method="xrai",
                         outcome="completed") == before


def test_each_score_row_uses_its_own_xai_parameters(server: Server, key: str) -> None:
    image = png_bytes()
    body = score_body(
        row(image, model_explainability=True, xai_parameters={"xai_algorithm": "guided_backprop",
                                                                "attributions": True, "visualizations": False}),
        row(image, model_explainability=True, xai_parameters={"xai_algorithm": "integrated_gradients",
                                                                "n_steps": 16, "attributions": True,
                                                                "attributions_encoding": "npy_base64"}),
        row(image),
    )
    response = httpx.post(f"{server.url}/score", json=body, headers=auth(key), timeout=60)
    assert response.status_code == 200, response.text
    first, second, third = response.json()
    assert "visualizations" not in first and np.asarray(first["attributions"]).shape == (3, 32, 32)
    assert isinstance(second["visualizations"], str)
    assert decode_npy_base64(second["attributions"]).shape == (3, 32, 32)
    assert "attributions" not in third and "visualizations" not in third  # explainability is off by default


def test_multilabel_gives_one_map_per_predicted_label(server: Server, key: str) -> None:
    image = png_bytes()
    body = score_body(row(image, model_explainability=True, confidence_score_threshold_multilabel=0.0,
                          xai_parameters={"xai_algorithm": "guided_gradcam", "attributions": True}),
                      row(image, model_explainability=True, confidence_score_threshold_multilabel=1.0))
    response = httpx.post(f"{server.url}/score", json=body, headers=auth(key, **{"azureml-model-deployment": "green"}),
                          timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["x-lantern-deployment"] == "green"
    everything, nothing = response.json()
    np.testing.assert_allclose(everything["probs"], expected_probs("models:/ml/1", image, "multilabel"), atol=1e-5)
    assert len(everything["visualizations"]) == 3 and len(everything["attributions"]) == 3
    assert np.asarray(everything["attributions"]).shape == (3, 3, 32, 32)
    assert nothing["visualizations"] == [] and "attributions" not in nothing
