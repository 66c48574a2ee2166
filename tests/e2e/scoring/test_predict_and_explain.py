"""/predict and /explain over HTTP: bodies, queries, answers, backends, probes, a model failing on an input."""

from __future__ import annotations

import base64
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from support.common import LABELS
from support.scoring import auth, expected_probs, row, score_body
from support.servers import Server, png_bytes


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
