"""Sizes over HTTP: large images decoded one at a time, body and pixel limits, compressed bodies and answers."""

from __future__ import annotations

import base64
import gzip
import io
import json
import zlib
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
from PIL import Image

from support.scoring import auth, row, score_body
from support.servers import Server, png_bytes


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
