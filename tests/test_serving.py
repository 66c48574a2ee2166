"""End to end: the real server (`lantern serve`) on a free loopback port, driven over HTTP as a user would."""

from __future__ import annotations

import base64
import gzip
import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import tomllib
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch
from packaging.requirements import Requirement
from PIL import Image

from support.common import LABELS, SMALL_SETTINGS, lantern_executable
from explain.encoding import decode_npy_base64
from support.servers import Server, SlowUpload, png_bytes

# `slow` and `torchy` explain on the CPU at 448 px: 1024 steps take 15 s at 320 px on 2 cores, and still seconds on 16
# (a GPU finished them within the tests' 1.5 s timeouts). `picky` runs on the CPU too: its out-of-bounds gather fails
# there, where a CUDA kernel reads past the end without a word.
SLOW_SETTINGS = {"valid_resize_size": 448, "valid_crop_size": 448}
SLOW_IG = {"method": "integrated_gradients", "params": {"n_steps": 1024}}


def probe(**values: float) -> dict:
    return {"initial_delay": 0, "period": 1, **values}


WEB_APP = "https://app.example.com"  # the one origin allowed to call the endpoint from a browser


def endpoint_config() -> dict:
    fast = {"request_timeout_ms": 60000, "max_concurrent_requests_per_instance": 8, "max_queue_wait_ms": 5000}
    return {
        "name": "e2e",
        "auth_mode": "key",
        "limits": {"max_body_bytes": 1_000_000, "max_image_pixels": 1_000_000, "max_concurrent_explanations": 1},
        "deployments": [
            {"name": "blue", "model": "models:/mc@champion", "request_settings": fast, "readiness_probe": probe()},
            {"name": "green", "model": "models:/ml/1", "request_settings": fast, "readiness_probe": probe()},
            {"name": "slow", "model": "models:/mc/1", "settings": SLOW_SETTINGS, "readiness_probe": probe(), "device": "cpu",
             "request_settings": {"request_timeout_ms": 1500, "max_concurrent_requests_per_instance": 1,
                                  "max_queue_wait_ms": 0}},
            {"name": "torchy", "model": "models:/mc/1", "backend": "torch", "settings": SLOW_SETTINGS, "device": "cpu",
             "request_settings": fast, "readiness_probe": probe()},
            {"name": "late", "model": "models:/mc/1", "readiness_probe": probe(initial_delay=3600)},
            {"name": "picky", "model": "models:/picky/1", "request_settings": fast, "readiness_probe": probe(),
             "device": "cpu"},
            {"name": "sick", "model": "models:/sick/1", "readiness_probe": probe(),
             "liveness_probe": probe(period=0.2, failure_threshold=2)},
        ],
        "traffic": {"blue": 100},
        "cors": {"allow_origins": [WEB_APP], "max_age": 120, "allow_headers": ["X-Client-Version"]},
    }


@pytest.fixture(scope="module")
def registered(module_store: str, checkpoints: dict[str, Path]) -> str:
    from registry.register import register_checkpoint

    register_checkpoint("mc", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS,
                        alias="champion")
    register_checkpoint("ml", checkpoints["safetensors"], "small_cnn", LABELS, "multilabel", SMALL_SETTINGS)
    register_checkpoint("picky", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    make_picky("models:/picky/1")
    register_checkpoint("sick", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    make_picky("models:/sick/1", Sick())
    return module_store


class Picky(torch.nn.Module):
    """Logits for most images, but a runtime error (a gather out of bounds) for an all-white one, and NaN logits for
    an all-black one."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a white image normalises to > 2 in every channel (warm-up zeros do not): any white image fails the batch
        white = (x.flatten(1).amin(1).amax() > 2.0).to(torch.int64)
        black = x.flatten(1).amax(1, keepdim=True) < -1.5  # black normalises to about -2 (zeros do not)
        logits = torch.index_select(x.mean((2, 3)), 1, torch.arange(3) + 10 * white)
        return torch.where(black, torch.full_like(logits, float("nan")), logits)


class Sick(torch.nn.Module):
    """Finite logits for images, NaN for the blank image the probes send: its probes always fail."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        means = x.mean((2, 3))
        return means / x.abs().amax()


def make_picky(uri: str, module: torch.nn.Module | None = None) -> None:
    """Swap the downloaded ONNX model of `uri` for one that fails on some inputs, as a user's model may."""
    from registry.onnx_export import export_onnx
    from registry.resolve import download_version
    from registry.store import open_client

    downloaded = download_version(open_client(), uri)
    export_onnx(module or Picky(), 32, downloaded.files.onnx)


@pytest.fixture(scope="module")
def server(registered: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANTERN_API_KEY")}
    running = Server(endpoint_config(), tmp_path_factory.mktemp("endpoint"), env).start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def key(server: Server) -> str:
    """The primary scoring key, as `lantern endpoint get-credentials` prints it."""
    out = subprocess.run([lantern_executable(), "endpoint", "get-credentials", str(server.config_path)],
                         capture_output=True, text=True, check=True, env=server.env)
    return json.loads(out.stdout)["primary"]


def auth(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


def predict(server: Server, key: str) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", content=png_bytes(), timeout=60,
                      headers=auth(key, **{"Content-Type": "image/png"}))


def score_body(*rows: dict | str) -> dict:
    data = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    return {"input_data": {"columns": ["image"], "data": data}}


def row(image: bytes, **fields) -> dict:
    return {"image_base64": base64.encodebytes(image).decode(), **fields}


def expected_probs(uri: str, image: bytes, task: str = "multiclass") -> np.ndarray:
    """The same version's probabilities computed in this process (its ONNX model, its preprocessing)."""
    from registry.images import decode_image
    from registry.onnx_export import INPUT_NAME, OUTPUT_NAME, make_session
    from registry.postprocess import probabilities
    from registry.preprocess import Preprocess
    from registry.resolve import load_bundle

    bundle = load_bundle(uri)
    x = Preprocess.for_model(bundle.spec, bundle.settings)(decode_image(image))[None].numpy()
    logits = make_session(bundle.onnx_path, "cpu").run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    return probabilities(logits, task)[0]


# the cloud's client code -----------------------------------------------------------------------------------------

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


# /predict and /explain -----------------------------------------------------------------------------------------------

def test_predict_multipart_and_raw_body(server: Server, key: str) -> None:
    images = [png_bytes(shape="circle"), png_bytes(shape="square")]
    files = [("images", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    response = httpx.post(f"{server.url}/predict?top_k=2", files=files, headers=auth(key), timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["deployment"] == "blue" and body["model_version"] == "models:/mc/1"
    for prediction, image in zip(body["predictions"], images):
        probs = expected_probs("models:/mc/1", image)
        assert len(prediction["top_k"]) == 2
        assert prediction["top_k"][0]["label"] == prediction["predicted"][0] == LABELS[int(np.argmax(probs))]
        assert prediction["top_k"][0]["probability"] == pytest.approx(float(probs.max()), abs=1e-5)
    raw = httpx.post(f"{server.url}/predict", content=images[0], headers=auth(key, **{"Content-Type": "image/png"}))
    assert raw.status_code == 200 and len(raw.json()["predictions"]) == 1
    raw_top, multipart_top = raw.json()["predictions"][0]["top_k"][0], body["predictions"][0]["top_k"][0]
    # the same image, batched differently: on a GPU the last bits may differ
    assert raw_top["label"] == multipart_top["label"]
    assert raw_top["probability"] == pytest.approx(multipart_top["probability"], abs=1e-6)


@pytest.mark.parametrize("query, named", [("topk=2", "topk: unknown parameter (accepted: top_k)"),
                                          ("top_k=two", "top_k: Input should be a valid integer"),
                                          ("top_k=0", "top_k: Input should be greater than or equal to 1")])
def test_predict_query_errors_are_named(server: Server, key: str, query: str, named: str) -> None:
    """A misspelt option is refused, not silently answered with the default."""
    response = httpx.post(f"{server.url}/predict?{query}", content=png_bytes(),
                          headers=auth(key, **{"Content-Type": "image/png"}))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_query" and error["message"].startswith(f"invalid predict query: {named}"), error


def test_a_query_parameter_given_twice_is_refused_but_targets_add_up(server: Server, key: str) -> None:
    """With one value per name the last would silently win; `targets` may be repeated, as a client would. A JSON body
    carries its own options: a query beside it would be ignored, so it is refused."""
    headers = auth(key, **{"Content-Type": "image/png"})
    for route, query in (("predict", "top_k=2&top_k=3"), ("explain", "method=xrai&method=guided_backprop")):
        refused = httpx.post(f"{server.url}/{route}?{query}", content=png_bytes(), headers=headers, timeout=60)
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "invalid_query", refused.text
        assert "is given more than once" in refused.json()["error"]["message"]
    mixed = httpx.post(f"{server.url}/explain?method=xrai", headers=auth(key), timeout=60,
                       json={"image_base64": base64.b64encode(png_bytes()).decode(), "method": "guided_backprop"})
    assert mixed.status_code == 422 and "not in the query (got method)" in mixed.json()["error"]["message"]
    both = httpx.post(f"{server.url}/explain?method=guided_backprop&targets=circle&targets=square",
                      content=png_bytes(), headers=headers, timeout=60)
    assert both.status_code == 200, both.text
    assert [e["label"] for e in both.json()["explanations"]] == ["circle", "square"]
    for empty in ("targets=", "targets=,"):  # a client's empty variable: not silently the prediction
        refused = httpx.post(f"{server.url}/explain?method=guided_backprop&{empty}", content=png_bytes(),
                             headers=headers, timeout=60)
        assert refused.status_code == 422, refused.text
        assert "targets: no label given; name at least one, or leave targets out" in refused.json()["error"]["message"]


def test_explain_json_and_png(server: Server, key: str) -> None:
    image = png_bytes()
    request = {"image_base64": base64.b64encode(image).decode(), "method": "integrated_gradients",
               "params": {"n_steps": 20, "approximation_method": "gausslegendre"}, "targets": ["square"],
               "attributions_encoding": "float16"}
    response = httpx.post(f"{server.url}/explain", json=request, headers=auth(key), timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["deployment"] == "blue" and body["method"] == "integrated_gradients"
    assert [e["label"] for e in body["explanations"]] == ["square"]
    assert np.asarray(body["explanations"][0]["attributions"]).shape == (3, 32, 32)
    assert body["fidelity"]["params"]["n_steps"] == 20 and body["fidelity"]["targets"] == [1]
    assert body["fidelity"]["completeness_error"] is not None

    png = httpx.post(f"{server.url}/explain?method=guided_gradcam", content=image,
                     headers=auth(key, **{"Content-Type": "image/png", "Accept": "image/png"}), timeout=60)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["x-lantern-deployment"] == "blue"
    assert Image.open(io.BytesIO(png.content)).format == "PNG"
    for accept in ("application/json, image/png;q=0.5", "image/png;q=0", "*/*"):  # any mention of PNG was a PNG
        as_json = httpx.post(f"{server.url}/explain?method=guided_gradcam", content=image,
                             headers=auth(key, **{"Content-Type": "image/png", "Accept": accept}), timeout=60)
        assert as_json.status_code == 200 and as_json.json()["method"] == "guided_gradcam", accept

    files = {"image": ("x.png", image, "image/png")}
    multipart = httpx.post(f"{server.url}/explain?method=xrai&n_steps=4&attributions=false", files=files,
                           headers=auth(key), timeout=60)
    assert multipart.status_code == 200, multipart.text
    assert multipart.json()["explanations"][0].get("attributions") is None


def test_torch_backend_answers_like_onnxruntime(server: Server, key: str) -> None:
    image = png_bytes(size=200)
    torch_answer = httpx.post(f"{server.url}/predict", content=image, timeout=60,
                              headers=auth(key, **{"Content-Type": "image/png", "x-lantern-deployment": "torchy"}))
    assert torch_answer.status_code == 200, torch_answer.text
    probs = expected_probs("models:/mc/1", image)  # settings differ (448 px): compare with the same settings below
    assert len(torch_answer.json()["predictions"][0]["top_k"]) == len(probs)
    onnx_answer = httpx.post(f"{server.url}/predict", content=image, timeout=60,
                             headers=auth(key, **{"Content-Type": "image/png", "x-lantern-deployment": "slow"}))
    for a, b in zip(torch_answer.json()["predictions"][0]["top_k"], onnx_answer.json()["predictions"][0]["top_k"]):
        assert a["label"] == b["label"] and a["probability"] == pytest.approx(b["probability"], abs=1e-4)


def test_failing_liveness_probe_reloads_the_deployment(server: Server, key: str) -> None:
    deadline = time.monotonic() + 60
    while server.metric("lantern_deployment_reloads_total", deployment="sick") < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.metric("lantern_deployment_reloads_total", deployment="sick") >= 2
    pinned = httpx.post(f"{server.url}/predict", content=png_bytes(), timeout=30,
                        headers=auth(key, **{"Content-Type": "image/png", "x-lantern-deployment": "sick"}))
    assert pinned.status_code == 503 and "sick is loading" in pinned.json()["error"]["message"]
    assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200  # sick has no live traffic
    assert "failed its liveness probe 2 times; reloading" in server.log_path.read_text()


def test_model_failing_on_an_input_is_424_with_the_reason(server: Server, key: str) -> None:
    headers = auth(key, **{"Content-Type": "image/png", "x-lantern-deployment": "picky"})
    assert httpx.post(f"{server.url}/predict", content=png_bytes(), headers=headers).status_code == 200
    white = png_bytes(color=(255, 255, 255))
    white_image = io.BytesIO()
    Image.new("RGB", (48, 48), (255, 255, 255)).save(white_image, format="PNG")
    failed = httpx.post(f"{server.url}/predict", content=white_image.getvalue(), headers=headers)
    assert failed.status_code == 424, failed.text
    assert failed.json()["error"]["code"] == "model_error" and "picky" in failed.json()["error"]["message"]
    assert "out of data bounds" in failed.json()["error"]["message"]
    assert httpx.post(f"{server.url}/predict", content=white, headers=headers).status_code == 200  # not all white

    black = io.BytesIO()
    Image.new("RGB", (48, 48), (0, 0, 0)).save(black, format="PNG")
    for path, options in [("/predict", {"content": black.getvalue()}),
                          ("/score", {"json": score_body(row(black.getvalue()))})]:
        nan = httpx.post(f"{server.url}{path}", headers=headers if path == "/predict" else
                         auth(key, **{"x-lantern-deployment": "picky"}), **options)
        assert nan.status_code == 424, nan.text
        assert nan.json()["error"]["code"] == "model_error" and "not finite" in nan.json()["error"]["message"]

    # in a batch, only the failing input gets 424: the other requests batched with it are answered
    from concurrent.futures import ThreadPoolExecutor

    bodies = [white_image.getvalue() if i % 8 == 0 else png_bytes() for i in range(32)]
    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda b: httpx.post(f"{server.url}/predict", content=b, headers=headers,
                                                      timeout=60).status_code, bodies))
    assert statuses == [424 if i % 8 == 0 else 200 for i in range(32)]


# auth, routing, readiness -------------------------------------------------------------------------------------------

def test_auth_missing_wrong_and_secondary_key(server: Server, key: str) -> None:
    image = png_bytes()
    headers = {"Content-Type": "image/png"}
    missing = httpx.post(f"{server.url}/predict", content=image, headers=headers)
    wrong = httpx.post(f"{server.url}/predict", content=image, headers={**headers, "Authorization": "Bearer nope"})
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized" and "Bearer" in missing.json()["error"]["message"]
    out = subprocess.run([lantern_executable(), "endpoint", "get-credentials", "e2e"], capture_output=True, text=True,
                         check=True, env=server.env)
    keys = json.loads(out.stdout)
    assert keys["primary"] == key and keys["secondary"] != key
    assert httpx.post(f"{server.url}/predict", content=image, headers=auth(keys["secondary"], **headers)).status_code == 200
    credentials = Path(server.env["LANTERN_HOME"]) / "endpoints" / "e2e" / "credentials.json"
    assert credentials.stat().st_mode & 0o777 == 0o600
    assert key not in server.log()  # keys are never logged
    for path in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(f"{server.url}{path}").status_code == 200


def test_a_web_app_on_an_allowed_origin_may_call_the_scoring_routes(server: Server, key: str) -> None:
    """A browser asks first (preflight) for a POST with Authorization; the answer lets the page read which deployment
    answered, errors included. Other origins, and the management API, are refused in Lantern's JSON format."""
    asks = {"Origin": WEB_APP, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-lantern-deployment"}
    preflight = httpx.options(f"{server.url}/predict", headers=asks)
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == WEB_APP
    assert preflight.headers["access-control-max-age"] == "120"
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    own_header = httpx.options(f"{server.url}/predict",
                               headers={**asks, "Access-Control-Request-Headers": "authorization, x-client-version"})
    assert own_header.status_code == 200 and "X-Client-Version" in own_header.headers["access-control-allow-headers"]
    unlisted = httpx.options(f"{server.url}/predict", headers={**asks, "Access-Control-Request-Headers": "x-other"})
    assert unlisted.status_code == 400 and "headers" in unlisted.json()["error"]["message"]
    assert "X-Client-Version" in unlisted.json()["error"]["message"]  # the refusal lists what is allowed
    answered = httpx.post(f"{server.url}/predict", content=png_bytes(),
                          headers=auth(key, **{"Content-Type": "image/png", "Origin": WEB_APP}))
    assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == WEB_APP
    exposed = answered.headers["access-control-expose-headers"].lower()
    assert "x-lantern-deployment" in exposed and "x-lantern-model-version" in exposed and "x-request-id" in exposed
    refused_key = httpx.post(f"{server.url}/predict", content=png_bytes(),
                             headers={"Content-Type": "image/png", "Origin": WEB_APP, "Authorization": "Bearer nope"})
    assert refused_key.status_code == 401 and refused_key.headers["access-control-allow-origin"] == WEB_APP
    elsewhere = httpx.options(f"{server.url}/predict", headers={**asks, "Origin": "https://evil.example.org"})
    assert elsewhere.status_code == 400 and elsewhere.json()["error"]["code"] == "cors_refused"
    assert "origin" in elsewhere.json()["error"]["message"] and WEB_APP in elsewhere.json()["error"]["message"]
    assert "access-control-allow-origin" not in httpx.post(
        f"{server.url}/predict", content=png_bytes(),
        headers=auth(key, **{"Content-Type": "image/png", "Origin": "https://evil.example.org"})).headers
    manage = httpx.options(f"{server.url}/manage/traffic", headers={**asks, "Access-Control-Request-Method": "PUT"})
    assert manage.status_code == 403 and manage.json()["error"]["code"] == "cors_refused"
    assert httpx.options(f"{server.url}/predict").status_code == 405  # not a preflight: no route takes OPTIONS


def test_the_management_api_is_never_called_cross_origin(server: Server, key: str) -> None:
    """Even from the allowed origin, with a method the scoring routes take: the preflight is refused, and a simple
    request's answer carries no CORS header, so the browser keeps it from the page."""
    for path in ("/manage/endpoint", "/manage/deployments/blue", "/manage"):
        preflight = httpx.options(f"{server.url}{path}", headers={
            "Origin": WEB_APP, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code == 403, preflight.text
        assert preflight.json()["error"]["code"] == "cors_refused" and "/manage" in preflight.json()["error"]["message"]
        assert "access-control-allow-origin" not in preflight.headers
    simple = httpx.get(f"{server.url}/manage/endpoint", headers={"Origin": WEB_APP, "Authorization": f"Bearer {key}"})
    assert simple.status_code == 403 and "access-control-allow-origin" not in simple.headers  # a scoring key
    scoring = httpx.options(f"{server.url}/score", headers={"Origin": WEB_APP, "Access-Control-Request-Method": "POST"})
    assert scoring.status_code == 200 and scoring.headers["access-control-allow-origin"] == WEB_APP


def test_a_stalled_upload_is_408_and_counts_in_flight_meanwhile(server: Server, key: str) -> None:
    """Half a body, then silence: the deployment's request_timeout_ms (1.5 s on `slow`) covers the upload, and the
    answer is Lantern's 408, not BentoML's 504 minutes later. While the uploads stall they count in flight (2 x its 1
    concurrent request), so a third request is refused at once, and the worker answers /livez throughout."""
    body = json.dumps(score_body(row(png_bytes()))).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json", "x-lantern-deployment": "slow"}
    stalled = [SlowUpload(server.url, "/score", body, headers, sent_first=len(body) // 2) for _ in range(2)]
    time.sleep(0.3)  # both are routed and counted
    crowded = httpx.post(f"{server.url}/score", content=body, headers=headers, timeout=10)
    assert crowded.status_code == 429 and "2 requests in flight" in crowded.json()["error"]["message"], crowded.text
    assert httpx.get(f"{server.url}/livez", timeout=5).status_code == 200
    for upload in stalled:
        answer = upload.answer(timeout=30)
        assert answer.status_code == 408, answer.text
        error = answer.json()["error"]
        assert error["code"] == "request_timeout" and "the request body did not arrive within request_timeout_ms " \
            f"(1500 ms): {len(body) // 2} of {len(body)} bytes came" == error["message"]
        assert answer.headers["connection"] == "close" and answer.headers["x-lantern-deployment"] == "slow"
    after = httpx.post(f"{server.url}/score", content=body, headers=headers, timeout=30)
    assert after.status_code == 200, after.text


def test_an_oversized_request_head_is_431_before_any_work(server: Server, key: str) -> None:
    """A header of 64 KiB (no key needed to send one) is refused in Lantern's format; the connection is closed and
    the worker serves the next request as before."""
    huge = httpx.post(f"{server.url}/predict", content=png_bytes(), timeout=30,
                      headers={"Content-Type": "image/png", "X-Filler": "a" * (64 << 10)})
    assert huge.status_code == 431, huge.text
    assert huge.json()["error"]["code"] == "headers_too_large" and "32768 bytes" in huge.json()["error"]["message"]
    long_url = httpx.get(f"{server.url}/livez?{'q' * (40 << 10)}", timeout=30)
    assert long_url.status_code == 431
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as trickle:  # a head sent 1 KiB at a time
        trickle.sendall(b"POST /predict HTTP/1.1\r\nHost: lantern\r\nX-Filler: ")
        answer = b""
        for _ in range(64):
            try:
                trickle.sendall(b"a" * 1024)
            except OSError:  # the server stopped reading: its answer is in
                break
        while chunk := trickle.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 ") and b'"headers_too_large"' in answer, answer[:300]
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as garbled:  # not HTTP: uvicorn's 400
        garbled.sendall(b"POST /predict HTTP/1.1\r\nHost: lantern\r\nX-Bad: a\x00b\r\n\r\n")
        answer = b""
        while chunk := garbled.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and json.loads(body)["error"]["code"] == "invalid_http", answer
    usual = httpx.post(f"{server.url}/predict", content=png_bytes(), timeout=30,
                       headers=auth(key, **{"Content-Type": "image/png", "X-Filler": "a" * 4096}))
    assert usual.status_code == 200, usual.text


def test_a_json_body_in_utf16_is_400_naming_the_encoding(server: Server, key: str) -> None:
    body = json.dumps(score_body(row(png_bytes()))).encode("utf-16")
    response = httpx.post(f"{server.url}/score", content=body,
                          headers=auth(key, **{"Content-Type": "application/json"}), timeout=30)
    assert response.status_code == 400
    assert response.json()["error"] == {"code": "invalid_json",
                                        "message": "the score body is UTF-16-encoded; send JSON in UTF-8"}


def test_pinning_unknown_and_unready_deployments(server: Server, key: str) -> None:
    image = png_bytes()
    headers = auth(key, **{"Content-Type": "image/png"})
    for header in ("x-lantern-deployment", "azureml-model-deployment"):
        pinned = httpx.post(f"{server.url}/predict", content=image, headers={**headers, header: "green"})
        assert pinned.status_code == 200 and pinned.headers["x-lantern-deployment"] == "green"
    unknown = httpx.post(f"{server.url}/predict", content=image, headers={**headers, "x-lantern-deployment": "nope"})
    assert unknown.status_code == 404 and "blue" in unknown.json()["error"]["message"]
    late = httpx.post(f"{server.url}/predict", content=image, headers={**headers, "x-lantern-deployment": "late"})
    assert late.status_code == 503 and "late" in late.json()["error"]["message"]
    both = {**headers, "x-lantern-deployment": "blue", "azureml-model-deployment": "blue"}
    assert httpx.post(f"{server.url}/predict", content=image, headers=both).headers["x-lantern-deployment"] == "blue"
    disagree = httpx.post(f"{server.url}/predict", content=image, headers={**both, "azureml-model-deployment": "green"})
    assert disagree.status_code == 400 and disagree.json()["error"]["code"] == "conflicting_pins"
    assert "azureml-model-deployment: green" in disagree.json()["error"]["message"]


# bad input ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, code", [
    (b"{not json", 400, "invalid_json"),
    (json.dumps({"input_data": {"columns": ["image"], "data": ["%%%not base64%%%"]}}).encode(), 400, "invalid_base64"),
    (json.dumps({"input_data": {"columns": ["image"], "data": ["https://example.com/cat.png"]}}).encode(), 400,
     "url_not_accepted"),
    (json.dumps({"input_data": {"columns": ["image"], "data": [base64.b64encode(b"plain text").decode()]}}).encode(),
     415, "unsupported_media_type"),
    (json.dumps({"inputs": []}).encode(), 422, "invalid_request"),
    (json.dumps(score_body(row(png_bytes(), model_explainability=True,
                               xai_parameters={"xai_algorithm": "xrai", "n_steps": 1}))).encode(), 422,
     "invalid_xai_parameters"),
    (json.dumps(score_body(row(png_bytes(), xai_parameters={"xai_algorithm": "gradcam"}))).encode(), 422,
     "invalid_row"),
    (json.dumps(score_body(row(png_bytes(), colour="red"))).encode(), 422, "invalid_row"),
])
def test_score_bad_input_gets_a_clear_4xx(server: Server, key: str, body: bytes, status: int, code: str) -> None:
    response = httpx.post(f"{server.url}/score", content=body, headers=auth(key, **{"Content-Type": "application/json"}))
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]


DEEP = "nests its arrays or objects too deeply (more than 64 levels)"
MANY = "holds more than 20000 arrays or objects"


@pytest.mark.parametrize("path, body, named", [
    ("/score", b"[" * 100_000 + b"]" * 100_000, MANY),
    ("/score", json.dumps(score_body('{"image_base64": ' + "[" * 5000 + "]" * 5000 + "}")).encode(), DEEP),
    ("/score", json.dumps(score_body('{"image_base64": ' + "[" * 65 + "]" * 65 + "}")).encode(), DEEP),
    ("/explain", b'{"image_base64": "", "params": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", MANY),
    ("/explain", b'{"image_base64": "", "params": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", DEEP),
    ("/explain?method=integrated_gradients&n_steps=" + "[" * 3000, b"\x89PNG", DEEP),
])
def test_json_nested_too_deeply_is_400(server: Server, key: str, path: str, body: bytes, named: str) -> None:
    """Python's JSON parser raises RecursionError past about a thousand levels (that was a 500), or parses 5000
    levels (Python 3.12): Lantern refuses more than 64, on every version, and more arrays or objects than any valid
    body holds before looking any further."""
    kind = "image/png" if "?" in path else "application/json"
    response = httpx.post(f"{server.url}{path}", content=body, headers=auth(key, **{"Content-Type": kind}))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json"
    assert named in response.json()["error"]["message"]


@pytest.mark.parametrize("method, path, status, code, named", [
    ("POST", "/scores", 404, "unknown_route", "did you mean /score?"),
    ("POST", "/v1/score", 404, "unknown_route", "POST /score, /predict and /explain"),
    ("GET", "/manage/nothing", 404, "unknown_route", "no route GET /manage/nothing"),
    ("GET", "/score", 405, "method_not_allowed", "this route takes POST"),
    ("PUT", "/manage/endpoint", 405, "method_not_allowed", "this route takes GET"),
    ("POST", "/livez", 405, "method_not_allowed", "this route takes GET, HEAD"),
    ("DELETE", "/metrics", 405, "method_not_allowed", "this route takes GET, HEAD"),
    ("GET", "/static_content/nothing.js", 404, "unknown_route", "no file /static_content/nothing.js"),
    ("POST", "/static_content/swagger-ui.css", 405, "method_not_allowed", "this route takes GET, HEAD"),
])
def test_unknown_routes_and_methods_get_a_json_error(server: Server, key: str, method: str, path: str, status: int,
                                                     code: str, named: str) -> None:
    """Starlette answers these in plain text ("Not Found") or FastAPI's `detail`; a client expects Lantern's error."""
    response = httpx.request(method, f"{server.url}{path}", headers=auth(key), content=png_bytes())
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and named in error["message"], error
    if status == 405:
        assert response.headers["allow"]


def test_known_routes_are_not_taken_for_unknown_ones(server: Server, key: str) -> None:
    """The JSON 404 leaves BentoML's own routes and Starlette's trailing-slash redirect alone."""
    for path in ("/livez", "/readyz", "/metrics", "/docs.json", "/docs", "/static_content/swagger-ui.css"):
        assert httpx.get(f"{server.url}{path}").status_code == 200, path
    redirect = httpx.post(f"{server.url}/score/", headers=auth(key), json={})
    assert redirect.status_code == 307 and redirect.headers["location"].endswith("/score")


def test_every_answer_carries_a_request_id_that_the_server_log_names(server: Server, key: str) -> None:
    answers = [httpx.post(f"{server.url}/predict", content=png_bytes(), headers=auth(key)),
               httpx.post(f"{server.url}/predict", content=png_bytes()),  # 401
               httpx.get(f"{server.url}/nothing"),  # 404
               httpx.get(f"{server.url}/manage/endpoint")]  # 401 from the management API
    assert [answer.status_code for answer in answers] == [200, 401, 404, 401]
    ids = [answer.headers["x-request-id"] for answer in answers]
    assert all(re.fullmatch(r"[0-9a-f]{32}", request_id) for request_id in ids) and len(set(ids)) == len(ids)
    deadline = time.monotonic() + 10  # the access log's line is written once the answer is sent
    while not all(f"trace={request_id}" in server.log_path.read_text() for request_id in ids):
        assert time.monotonic() < deadline, f"request ids {ids} not in the access log"
        time.sleep(0.2)
    theirs = "4bf92f3577b34da6a3ce929d0e0e4736"  # a W3C traceparent from the client names the request
    answer = httpx.post(f"{server.url}/predict", content=png_bytes(), headers=auth(
        key, traceparent=f"00-{theirs}-00f067aa0ba902b7-01"))
    assert answer.status_code == 200 and answer.headers["x-request-id"] == theirs


def test_the_web_page_is_self_contained_and_sends_what_the_routes_take(server: Server, key: str,
                                                                       tmp_path: Path) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    text = page.text
    assert "<code>e2e</code>" in text and 'data-auth-mode="key"' in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), "the page loads nothing from elsewhere"
    routes = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    used = set(re.findall(r"""["'`](/[a-z]+)[?"'`]""", text))
    assert {"/predict", "/explain", "/docs"} <= used
    for path in used:
        assert path in routes or path in ("/docs", "/readyz", "/metrics"), path
    script = re.search(r"<script>(.*)</script>", text, re.S).group(1)
    if shutil.which("node"):  # a syntax error would leave the page dead
        (tmp_path / "page.js").write_text(script)
        subprocess.run(["node", "--check", str(tmp_path / "page.js")], check=True, capture_output=True)
    # the two requests the page's script sends, as it sends them
    image = png_bytes(shape="square")
    predicted = httpx.post(f"{server.url}/predict?top_k=5", files={"images": ("a.png", image, "image/png")},
                           headers=auth(key))
    assert predicted.status_code == 200, predicted.text
    answer = predicted.json()
    assert answer["predictions"][0]["top_k"][0]["label"] in answer["predictions"][0]["predicted"]
    explained = httpx.post(f"{server.url}/explain?method=xrai&n_steps=8", files={"image": ("a.png", image, "image/png")},
                           headers=auth(key, **{"x-lantern-deployment": answer["deployment"], "Accept": "image/png"}),
                           timeout=120)
    assert explained.status_code == 200, explained.text
    assert explained.headers["content-type"] == "image/png" and explained.content.startswith(b"\x89PNG")
    assert explained.headers["x-lantern-explained-label"] in answer["predictions"][0]["predicted"]
    assert explained.headers["x-lantern-model-version"] == answer["model_version"]
    other = answer["predictions"][0]["top_k"][1]["label"]  # an "explain" button beside a label not predicted
    explained = httpx.post(f"{server.url}/explain?method=xrai&n_steps=8&targets={other}",
                           files={"image": ("a.png", image, "image/png")},
                           headers=auth(key, **{"x-lantern-deployment": answer["deployment"], "Accept": "image/png"}),
                           timeout=120)
    assert explained.status_code == 200 and explained.headers["x-lantern-explained-label"] == other


def test_unknown_xai_parameter_message_names_the_accepted_ones(server: Server, key: str) -> None:
    body = score_body(row(png_bytes(), model_explainability=True,
                          xai_parameters={"xai_algorithm": "integrated_gradients", "steps": 5}))
    response = httpx.post(f"{server.url}/score", json=body, headers=auth(key))
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "steps" in message and "n_steps" in message and "approximation_method" in message


def test_a_bad_row_of_a_batch_is_named(server: Server, key: str) -> None:
    good = row(png_bytes())
    bad = row(png_bytes(), model_explainability=True,
              xai_parameters={"xai_algorithm": "integrated_gradients", "n_steps": 1})
    response = httpx.post(f"{server.url}/score", json=score_body(good, bad), headers=auth(key))
    assert response.status_code == 422
    assert response.json()["error"]["message"].startswith("input_data.data[1].xai_parameters: "), response.text


def test_odd_but_valid_images_are_answered(server: Server, key: str) -> None:
    """A 200000 x 1 strip (no larger than the crop it is cut to) and a WebP whose EXIF block is damaged (once a 500)."""
    images = {}
    for name, image, options in [
        ("strip", Image.new("RGB", (200_000, 1), (200, 30, 30)), {"format": "PNG"}),
        ("tower", Image.new("RGB", (2, 300_000), (30, 30, 200)), {"format": "PNG"}),
        ("damaged_exif", Image.open(io.BytesIO(png_bytes())),
         {"format": "WEBP", "exif": b"Exif\x00\x00kM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03"}),
    ]:
        out = io.BytesIO()
        image.save(out, **options)
        images[name] = out.getvalue()
    files = [("images", (f"{name}.img", data)) for name, data in images.items()]
    response = httpx.post(f"{server.url}/predict", files=files, headers=auth(key), timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 3
    explained = httpx.post(f"{server.url}/explain?method=guided_backprop&attributions=false",
                           content=images["strip"], headers=auth(key, **{"Content-Type": "image/png"}), timeout=60)
    assert explained.status_code == 200, explained.text


def test_unreadable_multipart_bodies_are_400_and_too_many_images_413(server: Server, key: str) -> None:
    """65 images are over the limit however they come: multipart files get the answer /score rows get."""
    image = png_bytes(size=16)
    too_many = httpx.post(f"{server.url}/predict", files=[("images", (f"{i}.png", image)) for i in range(65)],
                          headers=auth(key))
    assert too_many.status_code == 413
    assert too_many.json()["error"] == {"code": "too_many_images",
                                        "message": "more images in one request than the limit; the limit is 64"}
    rows = httpx.post(f"{server.url}/score", json=score_body(*[row(image)] * 65), headers=auth(key))
    assert rows.status_code == 413
    assert rows.json()["error"] == {"code": "too_many_images", "message": "65 images in one request; the limit is 64"}
    garbled = httpx.post(f"{server.url}/predict", content=b"garbage",
                         headers=auth(key, **{"Content-Type": "multipart/form-data; boundary=zzz"}))
    assert garbled.status_code == 400 and garbled.json()["error"]["code"] == "invalid_multipart"


def memory_kb(process: psutil.Process, field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of a process, in kB."""
    status = Path(f"/proc/{process.pid}/status").read_text()
    return int(status.split(f"{field}:")[1].split()[0])


def test_a_request_of_many_large_images_holds_one_decoded_image_at_a_time(server: Server, key: str) -> None:
    """64 images of 1 M pixels are 256 MB decoded (Pillow keeps RGB in 4 bytes a pixel) but 15 KB as PNGs: each is
    decoded, cropped and let go before the next, so the workers' peak memory grows by a few of them, not 64."""
    out = io.BytesIO()
    Image.new("RGB", (1000, 1000), (40, 160, 90)).save(out, format="PNG")
    workers = psutil.Process(server.process.pid).children(recursive=True)
    try:
        for worker in workers:  # "5" resets the peak resident size (VmHWM) to the current one
            Path(f"/proc/{worker.pid}/clear_refs").write_text("5")
    except OSError as error:
        pytest.skip(f"the peak resident size cannot be reset here: {error}")
    before = {worker.pid: memory_kb(worker, "VmRSS") for worker in workers}
    files = [("images", (f"{i}.png", out.getvalue())) for i in range(64)]
    response = httpx.post(f"{server.url}/predict", files=files, headers=auth(key), timeout=120)
    assert response.status_code == 200 and len(response.json()["predictions"]) == 64
    growth_mb = max(memory_kb(worker, "VmHWM") - before[worker.pid] for worker in workers) / 1024
    print(f"peak growth {growth_mb:.1f} MB")
    assert growth_mb < 64, f"a worker's peak memory grew by {growth_mb:.0f} MB"


def test_size_limits(server: Server, key: str) -> None:
    too_big = httpx.post(f"{server.url}/predict", content=b"\0" * 1_100_000,
                         headers=auth(key, **{"Content-Type": "image/png"}))
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "payload_too_large"
    bomb = io.BytesIO()
    Image.new("RGB", (4000, 4000), (0, 0, 0)).save(bomb, format="PNG")  # 16 M pixels in a few KB
    assert len(bomb.getvalue()) < 100_000
    refused = httpx.post(f"{server.url}/predict", content=bomb.getvalue(),
                         headers=auth(key, **{"Content-Type": "image/png"}))
    assert refused.status_code == 413 and "pixels" in refused.json()["error"]["message"]
    not_image = httpx.post(f"{server.url}/predict", content=b"GIF89a but not really",
                           headers=auth(key, **{"Content-Type": "image/gif"}))
    assert not_image.status_code == 415
    json_to_predict = httpx.post(f"{server.url}/predict", json={"image": "x"}, headers=auth(key))
    assert json_to_predict.status_code == 415 and "/score" in json_to_predict.json()["error"]["message"]


def test_compressed_bodies_are_inflated_within_the_body_limit(server: Server, key: str) -> None:
    """Content-Encoding gzip or deflate was ignored: a gzip'd /score body was read as UTF-8 JSON and refused with
    'utf-8 codec can't decode byte 0x8b', and a gzip'd image as an unrecognised format."""
    body = json.dumps(score_body(base64.b64encode(png_bytes()).decode())).encode()
    plain = httpx.post(f"{server.url}/score", content=body, headers=auth(key, **{"Content-Type": "application/json"}))
    zipped = httpx.post(f"{server.url}/score", content=gzip.compress(body),
                        headers=auth(key, **{"Content-Type": "application/json", "Content-Encoding": "gzip"}))
    assert plain.status_code == zipped.status_code == 200 and zipped.json() == plain.json()
    predicted = httpx.post(f"{server.url}/predict", content=zlib.compress(png_bytes()),
                           headers=auth(key, **{"Content-Type": "image/png", "Content-Encoding": "deflate"}))
    assert predicted.status_code == 200 and predicted.json()["predictions"]
    brotli = httpx.post(f"{server.url}/predict", content=png_bytes(),
                        headers=auth(key, **{"Content-Type": "image/png", "Content-Encoding": "br"}))
    assert brotli.status_code == 415 and brotli.json()["error"]["code"] == "unsupported_content_encoding"
    bomb = gzip.compress(b"\0" * 5_000_000)  # under the 1 MB body limit sent, 5 MB inflated
    refused = httpx.post(f"{server.url}/predict", content=bomb,
                         headers=auth(key, **{"Content-Type": "image/png", "Content-Encoding": "gzip"}))
    assert refused.status_code == 413 and "inflates to over the limit" in refused.json()["error"]["message"]



def test_large_answers_are_gzipped_for_clients_that_accept_it(server: Server, key: str) -> None:
    """An explanation's JSON (attributions as float lists: 3.5 MB at 224 px) went as it was to every client."""
    request = {"image_base64": base64.b64encode(png_bytes()).decode(), "method": "guided_backprop",
               "attributions_encoding": "float32"}
    zipped = httpx.post(f"{server.url}/explain", json=request, headers=auth(key, **{"Accept-Encoding": "gzip"}))
    plain = httpx.post(f"{server.url}/explain", json=request, headers=auth(key, **{"Accept-Encoding": "identity"}))
    assert zipped.status_code == plain.status_code == 200, zipped.text
    assert zipped.headers["content-encoding"] == "gzip" and "Accept-Encoding" in zipped.headers["vary"]
    assert int(zipped.headers["content-length"]) < len(plain.content) * 3 // 4  # what went over the wire
    assert "content-encoding" not in plain.headers and "Accept-Encoding" in plain.headers["vary"]
    assert zipped.json()["explanations"] == plain.json()["explanations"]
    assert zipped.headers["x-lantern-deployment"] == zipped.json()["deployment"] == "blue"

    explained = row(png_bytes(), model_explainability=True,
                    xai_parameters={"xai_algorithm": "guided_gradcam", "attributions": True})
    scored = httpx.post(f"{server.url}/score", json=score_body(explained), headers=auth(key))  # httpx accepts gzip
    assert scored.status_code == 200 and scored.headers["content-encoding"] == "gzip"
    assert np.asarray(scored.json()[0]["attributions"]).shape == (3, 32, 32)
    predicted = httpx.post(f"{server.url}/predict", content=png_bytes(),
                           headers=auth(key, **{"Content-Type": "image/png"}))
    assert predicted.status_code == 200 and "content-encoding" not in predicted.headers  # a few hundred bytes

# deadlines, abandonment, admission ----------------------------------------------------------------------------------

def wait_for_metric(server: Server, name: str, at_least: float, timeout: float = 60, **labels: str) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = server.metric(name, **labels)
        if value >= at_least:
            return value
        time.sleep(0.25)
    return server.metric(name, **labels)


def slow_explain(server: Server, key: str, deployment: str, timeout: float = 120) -> httpx.Response:
    body = {"image_base64": base64.b64encode(png_bytes()).decode(), **SLOW_IG}
    return httpx.post(f"{server.url}/explain", json=body, headers=auth(key, **{"x-lantern-deployment": deployment}),
                      timeout=timeout)


def test_request_over_its_timeout_is_408_and_its_work_is_abandoned(server: Server, key: str) -> None:
    before = server.metric("lantern_explanation_runs_total", deployment="slow", outcome="abandoned")
    response = slow_explain(server, key, "slow")
    assert response.status_code == 408, response.text
    assert response.json()["error"]["code"] == "request_timeout"
    assert response.headers["x-lantern-deployment"] == "slow"
    # the explanation stops at its next forward pass instead of running its 1024 steps for nobody
    assert wait_for_metric(server, "lantern_explanation_runs_total", before + 1, deployment="slow",
                           outcome="abandoned") == before + 1
    assert server.metric("lantern_explanation_runs_total", deployment="slow", outcome="completed") == 0
    assert server.metric("lantern_abandoned_requests_total", deployment="slow", reason="timeout") >= 1


def test_client_disconnect_abandons_the_work(server: Server, key: str) -> None:
    before = server.metric("lantern_explanation_runs_total", deployment="torchy", outcome="abandoned")
    with pytest.raises(httpx.TimeoutException):
        slow_explain(server, key, "torchy", timeout=1.5)
    assert wait_for_metric(server, "lantern_explanation_runs_total", before + 1, deployment="torchy",
                           outcome="abandoned") == before + 1
    assert wait_for_metric(server, "lantern_abandoned_requests_total", 1, deployment="torchy",
                           reason="disconnect") >= 1
    assert server.metric("lantern_explanation_runs_total", deployment="torchy", outcome="completed") == 0


def test_more_in_flight_than_allowed_is_429_at_once(server: Server, key: str) -> None:
    # predictions: max 1 at a time on `slow`, no queue wait, so concurrent requests beyond one are refused
    image = png_bytes(size=448)
    statuses: list[int] = []
    together = threading.Barrier(24)

    def one() -> None:
        together.wait()  # all at once, so more than two are in flight however fast the server answers
        response = httpx.post(f"{server.url}/predict", content=image, timeout=60,
                              headers=auth(key, **{"Content-Type": "image/png", "x-lantern-deployment": "slow"}))
        statuses.append(response.status_code)

    threads = [threading.Thread(target=one) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(statuses) <= {200, 429} and statuses.count(429) > 0 and statuses.count(200) > 0

    # explanations have their own limit (1 at a time here): while one runs, another is refused at once (`slow` has no
    # queue wait) and prediction traffic still flows; the first is then abandoned by its client
    before = server.metric("lantern_explanation_runs_total", deployment="torchy", outcome="abandoned")
    first: list[BaseException] = []

    def long_explanation() -> None:
        body = {"image_base64": base64.b64encode(png_bytes()).decode(), "method": "xrai", "params": {"n_steps": 1024}}
        try:
            httpx.post(f"{server.url}/explain", json=body, headers=auth(key, **{"x-lantern-deployment": "torchy"}),
                       timeout=5)
        except httpx.TimeoutException as error:
            first.append(error)

    worker = threading.Thread(target=long_explanation)
    worker.start()
    time.sleep(1.0)
    second = slow_explain(server, key, "slow")
    assert second.status_code == 429 and second.json()["error"]["code"] == "too_many_requests"
    assert "explanations" in second.json()["error"]["message"]
    prediction = httpx.post(f"{server.url}/predict", content=png_bytes(), headers=auth(key, **{"Content-Type": "image/png"}))
    assert prediction.status_code == 200
    worker.join()
    assert first, "the long explanation should still have been running when its client gave up"
    assert wait_for_metric(server, "lantern_explanation_runs_total", before + 1, deployment="torchy",
                           outcome="abandoned") == before + 1


def test_adaptive_batching_batches_concurrent_requests(server: Server, key: str) -> None:
    image = png_bytes()
    before = server.metric("lantern_batch_size_count", deployment="blue")
    images_before = server.metric("lantern_images_total", deployment="blue")
    queued_before = server.metric("lantern_batch_queue_seconds_count", deployment="blue")
    prepared_before = server.metric("lantern_preprocess_seconds_count", deployment="blue")
    model_calls_before = server.metric("lantern_model_call_seconds_count", deployment="blue")
    model_seconds_before = server.metric("lantern_model_call_seconds_sum", deployment="blue")

    def one(_: int) -> int:
        return httpx.post(f"{server.url}/predict", content=image, timeout=60,
                          headers=auth(key, **{"Content-Type": "image/png"})).status_code

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(96)))
    assert statuses == [200] * 96
    calls = server.metric("lantern_batch_size_count", deployment="blue") - before
    images = server.metric("lantern_images_total", deployment="blue") - images_before
    print(f"96 concurrent predictions: {images:.0f} images in {calls:.0f} model calls")
    assert images == 96 and calls < images
    # where the time went: each request's decoding, each image's wait in the queue, and each model call
    assert server.metric("lantern_preprocess_seconds_count", deployment="blue") - prepared_before == 96
    assert server.metric("lantern_batch_queue_seconds_count", deployment="blue") - queued_before == 96
    assert server.metric("lantern_model_call_seconds_count", deployment="blue") - model_calls_before == calls
    assert server.metric("lantern_model_call_seconds_sum", deployment="blue") > model_seconds_before


def references(node: object) -> list[str]:
    """Every `$ref` in an OpenAPI document."""
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [ref for value in node.values() for ref in references(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in references(value)]
    return []


def test_openapi_describes_every_route_in_a_valid_document(server: Server) -> None:
    """The document validates as OpenAPI 3.1 (client generators and schemathesis refused BentoML's: "3.0.2" around
    JSON Schema 2020-12 forms such as a numeric exclusiveMinimum), at /docs.json as at /openapi.json."""
    from openapi_spec_validator import validate

    bentoml_document = httpx.get(f"{server.url}/docs.json").json()  # where BentoML serves its document
    document = httpx.get(f"{server.url}/openapi.json").json()  # the one /docs shows
    assert bentoml_document == document and document["openapi"] == "3.1.0"
    validate(document)
    for checked in (bentoml_document, document):
        for path in ("/score", "/predict", "/explain", "/manage/deployments"):
            assert path in checked["paths"]
        schemas = checked["components"]["schemas"]
        dangling = {ref for ref in references(checked) if ref.removeprefix("#/components/schemas/") not in schemas}
        assert not dangling, dangling
        bodies = {path: checked["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
                  for path in ("/score", "/explain", "/manage/deployments")}
        assert {"input_data"} <= set(bodies["/score"]["properties"])
        rows = bodies["/score"]["properties"]["input_data"]["properties"]["data"]["items"]["anyOf"]
        row = next(branch["contentSchema"] for branch in rows if "contentSchema" in branch)  # a data string's JSON
        assert {"image_base64", "model_explainability", "xai_parameters"} <= set(row["properties"])
        assert "xai_algorithm" in row["properties"]["xai_parameters"]["properties"]
        assert {"image_base64", "method"} <= set(bodies["/explain"]["properties"])
        assert {"name", "model", "request_settings"} <= set(bodies["/manage/deployments"]["properties"])
    for path in ("/livez", "/readyz", "/metrics"):
        assert path in bentoml_document["paths"]
        assert document["paths"][path]["get"]["security"] == []  # health and metrics need no key
    paths = document["paths"]
    score = paths["/score"]["post"]
    assert {"401", "404", "405", "408", "413", "424", "429", "503"} <= set(score["responses"])
    assert score["security"] == [{"scoringKey": []}]
    for path in ("/score", "/predict", "/explain"):  # the headers every answer carries
        responses = paths[path]["post"]["responses"]
        assert {"x-request-id", "x-lantern-deployment", "x-lantern-model-version"} <= set(responses["200"]["headers"])
        assert "x-request-id" in responses["404"]["headers"]
        assert ("content-encoding" in responses["200"]["headers"]) == (path != "/predict")  # gzip'd explanations
    for path in ("/manage/endpoint", "/manage/deployments", "/manage/deployments/{name}", "/manage/traffic",
                 "/manage/mirror-traffic", "/manage/keys/{kind}/regenerate"):
        for operation in paths[path].values():
            assert operation["security"] == [{"adminKey": []}] and "403" in operation["responses"]
    assert set(paths["/manage/deployments/{name}"]) == {"get", "patch", "delete"}


def test_bento_build_includes_the_endpoint_configuration(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true"}
    out = subprocess.run([str(Path(lantern_executable()).with_name("bentoml")), "build", str(root), "--output", "tag"],
                         capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    bentos = list((tmp_path / "bentoml" / "bentos" / "lantern").glob("*/bento.yaml"))
    assert len(bentos) == 1
    source = bentos[0].parent / "src"
    assert (source / "endpoint.yaml").read_text() == (root / "endpoint.yaml").read_text()
    assert (source / "serving" / "service.py").exists()
    assert (source / "serving" / "http" / "page.html").read_text() == (root / "serving" / "http" / "page.html").read_text()
    assert "serving.service:Lantern" in bentos[0].read_text()
    required = {Requirement(line).name.lower() for line in
                (bentos[0].parent / "env" / "python" / "requirements.txt").read_text().splitlines() if line.strip()}
    dependencies = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    missing = {Requirement(line).name.lower() for line in dependencies} - required
    assert not missing, f"the bento would be installed without {missing}"


def test_serve_over_https_beside_another_server_each_keeping_its_own_counts(server: Server, key: str,
                                                                           tmp_path: Path) -> None:
    """`--ssl-certfile/--ssl-keyfile`: a second endpoint on this host answers HTTPS only, and the management CLI
    reaches it with the certificate in $SSL_CERT_FILE. Each server keeps its own metrics: BentoML gave every server
    on a host one Prometheus folder and emptied it at each start, so this server's start wiped the first one's counts
    (and `lantern endpoint show` then reported 0 requests to the rollout gates)."""
    import ssl

    from support.servers import self_signed_certificate

    assert predict(server, key).status_code == 200
    before = server.metric("lantern_requests_total", deployment="blue", route="/predict", status="200")
    assert before >= 1
    cert, tls_key = self_signed_certificate(tmp_path / "tls")
    env = {**server.env, "LANTERN_API_KEY": "scoring-key", "LANTERN_ADMIN_KEY": "admin-key"}
    blue = {"name": "blue", "model": "models:/mc/1", "readiness_probe": {"initial_delay": 0, "period": 0.5}}
    other = Server({"name": "shop", "deployments": [blue], "traffic": {"blue": 100}}, tmp_path, env,
                   options=("--ssl-certfile", str(cert), "--ssl-keyfile", str(tls_key)),
                   tls=ssl.create_default_context(cafile=str(cert)))
    other.start()
    try:
        assert f"Endpoint shop on {other.url}: POST {other.url}/score" in " ".join(other.log().split())
        assert other.url.startswith("https://")
        answer = httpx.post(f"{other.url}/predict", content=png_bytes(), verify=other.verify, timeout=60,
                            headers={"Authorization": "Bearer scoring-key", "Content-Type": "image/png"})
        assert answer.status_code == 200 and answer.json()["deployment"] == "blue", answer.text
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the port: no answer
            httpx.get(other.url.replace("https://", "http://") + "/readyz", timeout=10)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # a client that does not trust it
            httpx.get(f"{other.url}/readyz", timeout=10)
        shown = subprocess.run([lantern_executable(), "endpoint", "show", "--json"], capture_output=True, text=True,
                               timeout=60, env={**env, "LANTERN_URL": other.url, "SSL_CERT_FILE": str(cert)})
        assert shown.returncode == 0, shown.stderr
        view = json.loads(shown.stdout)
        assert view["traffic"] == {"blue": 100}
        assert view["deployments"][0]["counters"]["requests"] == 1  # its own request, not the first server's
        assert other.metric("lantern_requests_total", deployment="blue", route="/predict", status="200") == 1
        assert server.metric("lantern_requests_total", deployment="blue", route="/predict", status="200") == before
    finally:
        other.stop()
    assert predict(server, key).status_code == 200  # the second server's end leaves the first one's folder alone
    assert server.metric("lantern_requests_total", deployment="blue", route="/predict", status="200") == before + 1
