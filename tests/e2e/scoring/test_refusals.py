"""Bad input over HTTP: each refusal a clear 4xx JSON error naming what was wrong; request ids, the web page."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from support.scoring import auth, row, score_body
from support.servers import Server, png_bytes


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
