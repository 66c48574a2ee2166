"""Work of one request that takes milliseconds runs in the work pool, not on the event loop, where it held up every
other request of the worker for as long as it took: an explanation's answer (its PNGs, attribution lists and JSON
text: hundreds of ms at 224 px), a large JSON body's parsing and base64 decoding (19 MB: 130-180 ms each) and a large
multipart body's parsing (16 MB: 14 ms)."""

from __future__ import annotations

import base64
import io
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

import explain.attribute
import serving.http.explain
import serving.http.guard
import serving.http.score
import serving.runtime.images
from serving.config import DeploymentConfig, EndpointConfig, Probe
from serving.runtime.endpoint import Endpoint
from support.common import LABELS, SMALL_SETTINGS
from support.servers import in_process_client, png_bytes


@pytest.fixture(scope="module")
def client(module_store: str, checkpoints: dict[str, Path]) -> Iterator[TestClient]:
    """The HTTP app in-process, serving a real endpoint with one deployment of the small CNN."""
    from registry.register import register_checkpoint

    register_checkpoint("rendered", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    blue = DeploymentConfig(name="blue", model="models:/rendered/1", device="cpu",
                            readiness_probe=Probe(initial_delay=0, period=0.05))
    endpoint = Endpoint(EndpointConfig(name="rendering", auth_mode="none", deployments=[blue], traffic={"blue": 100}),
                        tracking_uri=module_store)
    with in_process_client(endpoint) as test_client:
        yield test_client


Watch = Callable[[Any, str], list[str]]


@pytest.fixture()
def watch(monkeypatch: pytest.MonkeyPatch) -> Watch:
    """`watch(module, name)`: the names of the threads that call `module.name` from now on (it still does its work);
    `module` may be a tuple of modules that each import `name`."""

    def watching(module: Any, name: str) -> list[str]:
        threads: list[str] = []
        for each in module if isinstance(module, tuple) else (module,):  # one list for every module given
            work = getattr(each, name)

            def run(*args: Any, work: Callable[..., Any] = work, **kwargs: Any) -> Any:
                threads.append(threading.current_thread().name)
                return work(*args, **kwargs)

            monkeypatch.setattr(each, name, run)
        return threads

    return watching


@pytest.fixture()
def renderers(watch: Watch) -> dict[str, list[str]]:
    """The threads that encode PNGs, attribution lists and JSON answers."""
    return {"png": watch(explain.attribute, "png_bytes"),
            "attributions": watch(explain.attribute, "encode_attributions"),
            "json": watch((serving.http.explain, serving.http.score), "json_response")}


def off_the_event_loop(threads: list[str]) -> bool:
    return bool(threads) and all(name.startswith("lantern-decode") for name in threads)


def test_an_explain_answer_is_rendered_off_the_event_loop(client: TestClient,
                                                          renderers: dict[str, list[str]]) -> None:
    answer = client.post("/explain?method=guided_backprop&attributions=true&attributions_encoding=float32",
                         content=png_bytes(48, "square"), headers={"Content-Type": "image/png"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["deployment"] == "blue" and len(body["explanations"][0]["attributions"]) == 3
    assert base64.b64decode(body["explanations"][0]["visualization"]).startswith(b"\x89PNG")
    for kind in ("png", "attributions", "json"):
        assert off_the_event_loop(renderers[kind]), renderers

    renderers["png"].clear()
    picture = client.post("/explain?method=guided_backprop", content=png_bytes(48, "square"),
                          headers={"Content-Type": "image/png", "Accept": "image/png"})
    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
    assert off_the_event_loop(renderers["png"]), renderers


def test_a_score_answer_with_explanations_is_rendered_off_the_event_loop(client: TestClient,
                                                                         renderers: dict[str, list[str]]) -> None:
    image = base64.b64encode(png_bytes(48, "circle")).decode()
    row = {"image_base64": image, "model_explainability": True,
           "xai_parameters": {"xai_algorithm": "guided_gradcam", "attributions": True}}
    body = {"input_data": {"columns": ["image"], "data": [json.dumps(row), image]}}
    answer = client.post("/score", json=body)
    assert answer.status_code == 200, answer.text
    explained, plain = answer.json()
    assert len(explained["attributions"]) == 3 and "visualizations" in explained
    assert "attributions" not in plain and "visualizations" not in plain
    for kind in ("png", "attributions", "json"):
        assert off_the_event_loop(renderers[kind]), renderers


def noise_png(side: int = 640) -> bytes:
    """A PNG of random pixels: it does not compress, so its base64 makes a body of over a megabyte."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def test_a_large_json_body_is_parsed_and_decoded_off_the_event_loop(client: TestClient, watch: Watch) -> None:
    threads = {"score": watch(serving.http.score, "read_score_rows"),
               "explain": watch(serving.http.explain, "parse_json_body"),
               "base64": watch(serving.runtime.images, "decode_base64_image")}
    image = base64.b64encode(noise_png()).decode()
    assert len(image) > serving.http.guard.INLINE_PARSE_BYTES
    score = client.post("/score", json={"input_data": {"columns": ["image"], "data": [image, image]}})
    assert score.status_code == 200, score.text
    assert [len(item["probs"]) for item in score.json()] == [3, 3]
    explained = client.post("/explain", json={"image_base64": image, "method": "guided_backprop"})
    assert explained.status_code == 200, explained.text
    assert explained.json()["explanations"][0]["label"] in LABELS
    assert len(threads["score"]) == len(threads["explain"]) == 1 and len(threads["base64"]) == 3, threads
    for kind in ("score", "explain", "base64"):
        assert off_the_event_loop(threads[kind]), threads

    broken = client.post("/score", json={"input_data": {"columns": ["image"], "data": [image[:-5] + "*" * 5]}})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_base64", broken.text


@pytest.mark.parametrize("route, body, status, code", [
    ("/score", b'{"input_data": {"columns": ["image"], "data": ["' + b"A" * (1 << 20) + b'"', 400, "invalid_json"),
    ("/score", b'{"input_data": {"columns": ["image"], "data": ["' + b"A" * (1 << 20) + b'"]}, "extra": 1}', 422,
     "invalid_request"),
    ("/score", b'{"input_data": {"columns": ["image"], "data": ["' + b"A" * (1 << 20) + b'*"]}}', 400,
     "invalid_base64"),
    ("/explain", b'{"image_base64": "' + b"A" * (1 << 20) + b'", "method": "nope"}', 422, "invalid_request"),
    ("/explain", b'{"image_base64": "' + b"A" * (1 << 20) + b'!"}', 400, "invalid_base64"),
    ("/explain", b'{"image_base64": "' + b"QUJD" * (1 << 18) + b'"}', 415, "unsupported_media_type"),
])
def test_a_large_bad_body_parsed_in_the_pool_is_answered_as_a_small_one_is(client: TestClient, route: str,
                                                                           body: bytes, status: int, code: str) -> None:
    assert len(body) > serving.http.guard.INLINE_PARSE_BYTES
    answer = client.post(route, content=body, headers={"Content-Type": "application/json"})
    assert answer.status_code == status and answer.json()["error"]["code"] == code, answer.text


def test_a_large_multipart_body_is_parsed_off_the_event_loop(client: TestClient, watch: Watch) -> None:
    threads = watch(serving.http.guard, "uploaded_files")
    large, small = noise_png(240), png_bytes(48, "square")
    assert len(large) > serving.http.guard.INLINE_FORM_BYTES > len(small)
    predicted = client.post("/predict", files=[("images", ("a.png", large)), ("images", ("b.png", small))])
    assert predicted.status_code == 200, predicted.text
    assert len(predicted.json()["predictions"]) == 2
    explained = client.post("/explain?method=guided_backprop", files={"image": ("a.png", large)})
    assert explained.status_code == 200, explained.text
    assert off_the_event_loop(threads) and len(threads) == 2, threads

    threads.clear()  # a one-image body is parsed where it is: the hop to the pool would cost more than the parse
    assert client.post("/predict", files={"images": ("b.png", small)}).status_code == 200
    assert len(threads) == 1 and not off_the_event_loop(threads), threads
    refused = client.post("/predict", files=[("images", (f"{i}.png", large)) for i in range(65)])
    assert refused.status_code == 413 and refused.json()["error"] == {
        "code": "too_many_images", "message": "more images in one request than the limit; the limit is 64"}
