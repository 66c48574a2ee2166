"""What guards every request: keys, cross-origin calls, slow uploads, oversized heads, encodings, pinning."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import httpx

from support.common import lantern_executable
from support.scoring import WEB_APP, auth, row, score_body
from support.servers import Server, SlowUpload, png_bytes


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
