"""Explanation-job benchmark, run by hand: `.venv/bin/python bench/explain_jobs.py [--images 64] [--seconds 20]
[--device auto] [--workers 1] [--quick]`.

One `lantern serve` of resnet50 (random weights, as registered by a user) at 224 px. One run measures:
1. a single XRAI through a job, polled every second by a client whose every request must answer within 30 s (a
   proxy's limit): the job's time, the longest poll, and the same XRAI as one `/explain` request (the reference: what
   a client behind that proxy could not wait for when it takes over 30 s);
2. `/predict` throughput (8 clients) while an XRAI batch job of `--images` images runs, against the same load with no
   job (the reference, measured in the same run); goal: predictions keep >= 80 % of their rate;
3. `/explain` latency (guided backprop, one client back to back) with the job queued, against none: live explanations
   take the pool back from the job.
Writes bench/results/explain_jobs.json.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

from bench.load import Process, Request, free_port, load  # noqa: E402
from bench.models import jpeg_image, register_resnet50  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "explain_jobs.json"
KEY = "bench-scoring-key"
PROXY_TIMEOUT_S = 30.0


def headers(**extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}", **extra}


def job_through_polls(url: str, image: bytes, params: dict) -> dict:
    """A single XRAI as a job, polled every second with each request limited to PROXY_TIMEOUT_S."""
    with httpx.Client(base_url=url, timeout=PROXY_TIMEOUT_S, headers=headers()) as http:
        started = time.perf_counter()
        answer = http.post("/explain/jobs", json={"image_base64": base64.b64encode(image).decode(),
                                                  "method": "xrai", "params": params})
        answer.raise_for_status()
        job, polls, longest = answer.json(), 0, time.perf_counter() - started
        while job["state"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(1.0)
            sent = time.perf_counter()
            job = http.get(f"/explain/jobs/{job['id']}").json()
            longest, polls = max(longest, time.perf_counter() - sent), polls + 1
        sent = time.perf_counter()
        png = http.get(f"/explain/jobs/{job['id']}/result", headers={"Accept": "image/png"})
        longest = max(longest, time.perf_counter() - sent)
        return {"state": job["state"], "seconds": time.perf_counter() - started, "polls": polls,
                "longest_request_s": longest, "png_bytes": len(png.content), "png_status": png.status_code}


def direct_xrai(url: str, image: bytes, params: dict) -> float:
    """The same XRAI as one `/explain` request (no proxy limit): its time."""
    started = time.perf_counter()
    answer = httpx.post(f"{url}/explain", json={"image_base64": base64.b64encode(image).decode(), "method": "xrai",
                                                "params": params}, headers=headers(), timeout=3600)
    answer.raise_for_status()
    return time.perf_counter() - started


def explain_latencies(url: str, image: bytes, seconds: float) -> list[float]:
    """One client sending guided-backprop `/explain` requests back to back for `seconds`."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    with httpx.Client(timeout=600, headers=headers(**{"Content-Type": "image/jpeg"})) as http:
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            answer = http.post(f"{url}/explain", params={"method": "guided_backprop"}, content=image)
            if answer.status_code == 200:
                latencies.append(time.perf_counter() - sent)
    return latencies


def predictions(url: str, image: bytes, seconds: float) -> dict:
    """`/predict` throughput and median latency, 8 clients."""
    found = load(url, Request("/predict", image, headers(**{"Content-Type": "image/jpeg"})), 8, seconds, 1)
    return {"per_s": found["requests_per_s"], "p50_s": found["p50_s"], "errors": found["errors"]}


def job_progress(url: str, job_id: str) -> int:
    return httpx.get(f"{url}/explain/jobs/{job_id}", headers=headers(), timeout=30).json()["progress"]["images_done"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="XRAI with 10 steps (a smoke run)")
    arguments = parser.parse_args()
    params = {"n_steps": 10 if arguments.quick else 50}

    with tempfile.TemporaryDirectory(prefix="lantern-bench-jobs-") as name:
        folder = Path(name)
        os.environ.update({"LANTERN_HOME": str(folder / "home"),
                           "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'home' / 'mlflow.db'}"})
        model = register_resnet50(folder)
        timeouts = {"request_timeout_ms": 180000, "max_concurrent_requests_per_instance": 16,
                    "max_queue_wait_ms": 120000}
        config = {"name": "bench-jobs", "limits": {"max_images_per_job": max(64, arguments.images)},
                  "deployments": [{"name": "blue", "model": model, "device": arguments.device,
                                   "request_settings": timeouts,
                                   "readiness_probe": {"initial_delay": 0, "period": 10}}],
                  "traffic": {"blue": 100}}
        (folder / "endpoint.yaml").write_text(yaml.safe_dump(config))
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = Process([str(Path(sys.executable).with_name("lantern")), "serve", str(folder / "endpoint.yaml"),
                          "--port", str(port), "--workers", str(arguments.workers)],
                         {**os.environ, "LANTERN_API_KEY": KEY}, folder / "server.log", f"{url}/readyz")
        try:
            image = jpeg_image(256)
            print(f"resnet50 at 224 px, device {arguments.device}, {arguments.workers} worker(s); {platform.node()}")
            reference_s = direct_xrai(url, image, params)
            single = job_through_polls(url, image, params)
            print(f"1. one XRAI ({params['n_steps']} steps): {single['seconds']:.1f} s as a job, {single['polls']} "
                  f"polls, longest request {single['longest_request_s']:.2f} s (limit {PROXY_TIMEOUT_S:.0f} s); "
                  f"{reference_s:.1f} s as one /explain request")

            alone = predictions(url, image, arguments.seconds)
            explain_alone = explain_latencies(url, image, arguments.seconds)
            files = [("images", (f"{i}.jpg", image, "image/jpeg")) for i in range(arguments.images)]
            accepted = httpx.post(f"{url}/explain/jobs", params={"method": "xrai", **params}, files=files,
                                  headers=headers(), timeout=120)
            accepted.raise_for_status()
            job_id = accepted.json()["id"]
            time.sleep(2.0)  # the job under way
            started = job_progress(url, job_id)
            during = predictions(url, image, arguments.seconds)
            predicted_meanwhile = job_progress(url, job_id) - started
            explain_during = explain_latencies(url, image, arguments.seconds)
            explained_meanwhile = job_progress(url, job_id) - started - predicted_meanwhile
            httpx.delete(f"{url}/explain/jobs/{job_id}", headers=headers(), timeout=30)
            kept = during["per_s"] / alone["per_s"]
            print(f"2. /predict {alone['per_s']:.1f}/s alone, {during['per_s']:.1f}/s while the "
                  f"{arguments.images}-image XRAI job runs ({predicted_meanwhile} of its images done meanwhile): "
                  f"{kept:.0%} kept (goal >= 80 %)")
            print(f"3. /explain (guided backprop, one client back to back) median "
                  f"{statistics.median(explain_alone):.3f} s alone, {statistics.median(explain_during):.3f} s with the "
                  f"job queued (it takes the pool back between requests: {explained_meanwhile} of its images done)")
        finally:
            server.stop()
    result = {"host": platform.node(), "device": arguments.device, "workers": arguments.workers,
              "xrai_steps": params["n_steps"], "single_job": single, "single_direct_s": reference_s,
              "predict_alone": alone, "predict_during_job": during, "predict_rate_kept": kept,
              "job_images_during_predict": predicted_meanwhile,
              "explain_alone_median_s": statistics.median(explain_alone),
              "explain_during_job_median_s": statistics.median(explain_during),
              "job_images_during_explain": explained_meanwhile, "images": arguments.images}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
