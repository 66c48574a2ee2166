"""The scoring server the end-to-end tests share (tests/e2e/scoring/): its endpoint, the models that fail on purpose,
and request helpers."""

from __future__ import annotations

import base64
import json
import time

import httpx
import numpy as np
import torch

from support.servers import Server, png_bytes

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
        "limits": {"max_body_bytes": 1_000_000, "max_image_pixels": 1_000_000, "max_concurrent_explanations": 1,
                   "max_images_per_job": 4, "max_queued_jobs": 3},
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
