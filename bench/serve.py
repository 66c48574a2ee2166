"""Serving benchmark, run by hand:
`.venv/bin/python bench/serve.py [--quick] [--device cuda] [--workers N] [--loaders N] [--skip-mlflow]
[--skip-overhead] [--images-per-request N] [--image-size PX] [--explain METHOD [--explain-answer json]
[--explanation-threads N]]`.

One run, one registered resnet50 (random weights, 224 px), measured three ways, and bench/results/serve.json:
1. in-process ONNX Runtime on preprocessed batches, at each batch size: the best throughput is the limit; the
   in-process latency of one image is decode + preprocess + a batch-1 run;
2. Lantern served over HTTP (`lantern serve`, POST /predict with a JPEG) at concurrency 1, 8 and 32: throughput and
   p50/p99 latency;
3. `mlflow models serve` on the same registered model (its pyfunc flavour) at the same concurrencies.
It prints the ratios behind the goals: served throughput at concurrency 32 vs the limit (goal >= 90 %), p50 at
concurrency 1 vs in-process latency (goal <= 1.3x), and served throughput vs `mlflow models serve` (goal >= 3x).
4. Serving overhead: both servers again at concurrency 32 on a tiny model (the small CNN at 64 px), where the model
   costs next to nothing: requests per second and the server's CPU milliseconds per request. On a CPU the resnet50
   comparison measures the same ONNX Runtime on both sides; this one shows what each server adds, which is what bounds
   a GPU server. Lantern at concurrency 1 too, against the tiny model's in-process latency: the latency a model as
   fast as a GPU's sees. At each level, Lantern's own metrics split a request's time: the client's mean latency, the
   time in Lantern's handler, the decoding in it, an image's wait in the batching queue, and the model calls.
5. With `--images-per-request N`: Lantern on resnet50 again with 32 images in flight as at concurrency 32, but in
   32 / N requests of N images (multipart), so HTTP's cost is shared by N images; against the limit, it tells how much
   of the gap at one image per request is HTTP.
6. With `--explain METHOD`: Lantern on resnet50 at concurrency 8 again while a client asks for METHOD explanations
   back to back, against concurrency 8 without them: explanations have their own admission and pool, so predictions
   should keep flowing. `--explain-answer json` has that client take JSON with float32 attribution lists (3.5 MB, not
   gzip'd) rather than the PNG: writing it must not hold up the worker's predictions either.
`--image-size PX` sends a larger JPEG (default 256 px): decoding a phone photo costs more than the model on a GPU.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import serving  # noqa: F401  (before torch: the server's OpenMP spin setting, so the in-process reference runs as served)
import httpx
import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import (  # noqa: E402
    Process,
    Request,
    batching_split,
    batching_totals,
    free_port,
    load,
    server_cpu_seconds,
)
from bench.models import jpeg_image, register_resnet50, register_tiny  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "serve.json"
CONCURRENCY = (1, 8, 32)


def served_predictor(uri: str, device: str, backend: str) -> tuple:
    """The version's bundle, its preprocessing, the torch device, and the predictor a served deployment would run."""
    from registry.devices import torch_device
    from registry.preprocess import Preprocess
    from registry.resolve import load_bundle
    from serving.runtime.predictors import OnnxPredictor, TorchPredictor

    bundle = load_bundle(uri)
    chosen = torch_device(device)
    predictor = OnnxPredictor(bundle.onnx_path, chosen) if backend == "onnxruntime" else \
        TorchPredictor(bundle.module, chosen)
    return bundle, Preprocess.for_model(bundle.spec, bundle.settings), chosen, predictor


def in_process(uri: str, image: bytes, device: str, backend: str, quick: bool) -> dict:
    """The limit and the in-process latency, on the backend the served deployment uses (the same predictor class)."""
    from registry.images import decode_image
    from serving.runtime.predictors import OnnxPredictor, shape_buckets

    bundle, preprocess, chosen, predictor = served_predictor(uri, device, backend)
    x = preprocess(decode_image(image, shorter_side=preprocess.resize_size))[None].numpy()
    throughput = {}
    for batch_size in (1, 2, 4, 8, 16, 32, 64):
        batch = np.repeat(x, batch_size, axis=0)
        predictor(batch)
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < (1.5 if quick else 4) or runs < 3:
            predictor(batch)  # logits come back to the CPU, as served
            runs += 1
        throughput[batch_size] = runs * batch_size / (time.perf_counter() - start)
        print(f"  in-process {predictor.description}, batch {batch_size:2d}: {throughput[batch_size]:7.1f} images/s")
    mixed = {"one_session": mixed_batch_sizes(predictor, x, throughput, quick, "one session")}
    buckets = shape_buckets(chosen, backend, max(MIXED_SIZES))
    if buckets is not None:  # as served on a GPU: a session per batch size
        bucketed = OnnxPredictor(bundle.onnx_path, chosen, buckets=buckets)
        for size in buckets:
            bucketed(np.repeat(x, size, axis=0))
        mixed["session_per_batch_size"] = mixed_batch_sizes(bucketed, x, throughput, quick, "a session per size")
    best = max(throughput, key=throughput.get)
    return {"throughput_by_batch": throughput, "best_batch": best, "limit_images_per_s": throughput[best],
            "latency_p50_s": one_image_latency(predictor, preprocess, image, 10 if quick else 30),
            "predictor": predictor.description, "mixed_batch_sizes": mixed}


def in_process_latency(uri: str, image: bytes, device: str, backend: str, runs: int) -> float:
    """The median in-process latency of one image (decode + preprocess + a batch-1 run), on the served backend."""
    _bundle, preprocess, _device, predictor = served_predictor(uri, device, backend)
    return one_image_latency(predictor, preprocess, image, runs)


def one_image_latency(predictor, preprocess, image: bytes, runs: int) -> float:
    from registry.images import decode_image

    latencies = []
    for _ in range(runs + 1):  # the first one warms up
        start = time.perf_counter()
        predictor(preprocess(decode_image(image, shorter_side=preprocess.resize_size))[None].numpy())
        latencies.append(time.perf_counter() - start)
    return float(np.median(latencies[1:]))


MIXED_SIZES = (1, 8, 2, 4, 1, 2, 8, 4)


def mixed_batch_sizes(predictor, x: np.ndarray, throughput: dict[int, float], quick: bool, label: str) -> dict:
    """Model calls whose batch size changes from one call to the next, as adaptive batching makes them, against the
    same sizes run one size at a time (from `throughput`): what a change of input shape costs this backend."""
    batches = [np.repeat(x, size, axis=0) for size in MIXED_SIZES]
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < (1.5 if quick else 4) or calls < 2 * len(batches):
        predictor(batches[calls % len(batches)])
        calls += 1
    measured_ms = 1000 * (time.perf_counter() - start) / calls
    expected_ms = 1000 * float(np.mean([size / throughput[size] for size in MIXED_SIZES]))
    print(f"  in-process, {label}, batch sizes changing each call ({', '.join(map(str, MIXED_SIZES))}): "
          f"{measured_ms:.2f} ms per call, {measured_ms / expected_ms:.2f}x the same sizes run one size at a time")
    return {"sizes": list(MIXED_SIZES), "ms_per_call": measured_ms, "ms_per_call_fixed_sizes": expected_ms,
            "ratio": measured_ms / expected_ms}


def measured(server: "Process", url: str, request: Request, concurrency: int, seconds: float, loaders: int,
             what: str, images_per_request: int = 1, lantern: bool = True) -> dict:
    """One load level, with the server's CPU milliseconds per answered request (and for Lantern, where the time
    went: the batching queue vs the model calls)."""
    before = server_cpu_seconds(server)
    totals = batching_totals(url) if lantern else None
    result = load(url, request, concurrency, seconds, loaders)
    result["images_per_request"] = images_per_request
    result["images_per_s"] = result["requests_per_s"] * images_per_request
    answered = result["requests"] + result["errors"] + result["warm_up_requests"]
    result["server_cpu_ms_per_request"] = 1000 * (server_cpu_seconds(server) - before) / max(1, answered)
    print(f"  {what}, concurrency {concurrency:2d}: {result['images_per_s']:7.1f} images/s, "
          f"p50 {result['p50_s'] * 1000:7.1f} ms, p99 {result['p99_s'] * 1000:7.1f} ms, "
          f"server CPU {result['server_cpu_ms_per_request']:5.1f} ms/request, errors {result['errors']}")
    if totals is not None:
        split = result["batching"] = batching_split(totals, batching_totals(url))
        if split["mean_batch_size"] is not None:
            print(f"      batches of {split['mean_batch_size']:.1f} images on average; an image waited "
                  f"{split['mean_queue_wait_s'] * 1000:.1f} ms in the queue, a model call took "
                  f"{split['mean_model_call_s'] * 1000:.1f} ms")
        if split["mean_handler_s"] is not None and result["mean_s"] is not None:
            print(f"      a request took {result['mean_s'] * 1000:.2f} ms at the client on average, "
                  f"{split['mean_handler_s'] * 1000:.2f} ms of it in Lantern's handler, of which "
                  f"{split['mean_preprocess_s'] * 1000:.2f} ms decoding and preprocessing")
    return result


def served(uri: str, image: bytes, folder: Path, env: dict[str, str], device: str, backend: str, workers: int,
           best_batch: int, seconds: float, loaders: int, concurrencies: tuple[int, ...] = CONCURRENCY,
           images_per_request: int = 1, explain_method: str | None = None, explain_answer: str = "png",
           during_explanations: dict | None = None, explanation_threads: int | None = None) -> list[dict]:
    """Lantern serving `uri` at each concurrency. With `explain_method`, concurrency 8 once more while a client asks
    for that explanation back to back; its figures go into `during_explanations`."""
    config = {"name": "bench", "auth_mode": "key", "traffic": {"resnet": 100}, "deployments": [{
        "name": "resnet", "model": uri, "device": device, "backend": backend, "max_batch_size": max(2, best_batch),
        "max_latency_ms": 60000,
        "request_settings": {"request_timeout_ms": 120000, "max_concurrent_requests_per_instance": 64,
                             "max_queue_wait_ms": 60000},
        "readiness_probe": {"initial_delay": 0, "period": 5}}]}
    if explanation_threads is not None:
        config["limits"] = {"explanation_threads": explanation_threads}
    path = folder / "endpoint.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    lantern = [sys.executable, "-m", "lantern"]  # also where the console script is not installed
    server = Process([*lantern, "serve", str(path), "--port", str(port), "--workers", str(workers),
                      "--reset-state"],  # the endpoint's state is kept between starts: this run's YAML decides
                     env, folder / "lantern.log", f"http://127.0.0.1:{port}/readyz")
    key = subprocess.run([*lantern, "endpoint", "get-credentials", str(path), "--key", "primary"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    request = predict_request(image, key, images_per_request)
    what = "lantern" if images_per_request == 1 else f"lantern, {images_per_request} images per request"
    url = f"http://127.0.0.1:{port}"
    try:
        levels = [measured(server, url, request, concurrency, seconds, loaders, what, images_per_request)
                  for concurrency in concurrencies]
        if explain_method is not None and during_explanations is not None:
            during_explanations.update(predicting_while_explaining(server, url, request, image, key, explain_method,
                                                                   explain_answer, seconds, loaders))
            during_explanations["explanations"]["threads"] = explanation_threads  # None: torch's default
        return levels
    finally:
        server.stop()


def predicting_while_explaining(server: "Process", url: str, request: Request, image: bytes, key: str, method: str,
                                answer_as: str, seconds: float, loaders: int) -> dict:
    """Predictions at concurrency 8 while one client asks for `method` explanations back to back (the endpoint
    explains one at a time by default): explanations have their own admission and pool, so predictions should keep
    flowing, slowed only by the device (and on a CPU, the cores) they share. `answer_as` "json" asks for the
    attributions as float32 lists, not gzip'd (3.5 MB at 224 px, as the cloud's client snippet takes them): writing
    that answer must not hold up the worker's other requests either."""
    stop, answers = threading.Event(), []
    if answer_as == "json":
        params = {"method": method, "attributions": "true", "attributions_encoding": "float32"}
        accept = {"Accept": "application/json", "Accept-Encoding": "identity"}
    else:
        params, accept = {"method": method}, {"Accept": "image/png"}  # the picture, not MBs of JSON

    def explaining() -> None:
        with httpx.Client(timeout=600) as client:
            while not stop.is_set():
                began = time.perf_counter()
                answer = client.post(f"{url}/explain", params=params, content=image,
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "image/jpeg",
                                              **accept})
                answers.append((answer.status_code, time.perf_counter() - began))

    client = threading.Thread(target=explaining, daemon=True)
    client.start()
    while not answers and client.is_alive():  # the first explanation has run: its model is warm
        time.sleep(0.1)
    result = measured(server, url, request, 8, seconds, loaders, f"lantern while explaining ({method})")
    stop.set()
    client.join()
    statuses = sorted({status for status, _ in answers})
    answered = [took for status, took in answers if status == 200]
    result["explanations"] = {"method": method, "answer": answer_as,
                              "statuses": {str(s): sum(a == s for a, _ in answers) for s in statuses},
                              "mean_s": float(np.mean(answered)) if answered else None}
    print(f"      meanwhile {len(answers)} {method} explanations answered (statuses "
          f"{result['explanations']['statuses']}), {result['explanations']['mean_s'] or 0:.2f} s each on average")
    return result


def predict_request(image: bytes, key: str, images: int) -> Request:
    """POST /predict with the JPEG as the raw body, or `images` copies of it as multipart files."""
    if images == 1:
        return Request("/predict", image, {"Authorization": f"Bearer {key}", "Content-Type": "image/jpeg"})
    files = [("images", (f"{i}.jpg", image, "image/jpeg")) for i in range(images)]
    built = httpx.Request("POST", "http://bench/predict", files=files)
    return Request("/predict", built.read(), {"Authorization": f"Bearer {key}",
                                               "Content-Type": built.headers["content-type"]})


def mlflow_served(uri: str, image: bytes, folder: Path, env: dict[str, str], seconds: float, loaders: int,
                  concurrencies: tuple[int, ...] = CONCURRENCY) -> list[dict]:
    port = free_port()
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}  # it runs `uvicorn`
    server = Process([sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
                      "local", "--port", str(port), "--host", "127.0.0.1"], env, folder / "mlflow.log",
                     f"http://127.0.0.1:{port}/ping")
    frame = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode()]]}}
    request = Request("/invocations", json.dumps(frame).encode(), {"Content-Type": "application/json"})
    try:
        return [measured(server, f"http://127.0.0.1:{port}", request, concurrency, seconds, loaders,
                         "mlflow models serve", lantern=False) for concurrency in concurrencies]
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter measurements")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--backend", default="onnxruntime", choices=["onnxruntime", "torch"],
                        help="what runs the model, in-process and served (mlflow models serve runs its ONNX pyfunc)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=None, help="per concurrency level (default 20, quick 8)")
    parser.add_argument("--skip-mlflow", action="store_true", help="leave out `mlflow models serve`")
    parser.add_argument("--skip-overhead", action="store_true", help="leave out the tiny-model serving overhead run")
    parser.add_argument("--images-per-request", type=int, default=0, metavar="N",
                        help="also serve resnet50 with 32 images in flight in 32/N requests of N images (multipart): "
                             "HTTP's cost shared by N images (a GPU server is bound by it)")
    parser.add_argument("--explain", metavar="METHOD", choices=["xrai", "integrated_gradients", "guided_gradcam",
                                                                  "guided_backprop"],
                        help="also serve resnet50 at concurrency 8 while a client asks for METHOD explanations back to "
                             "back: does prediction traffic keep flowing?")
    parser.add_argument("--explain-answer", choices=["png", "json"], default="png",
                        help="with --explain, the answer asked for: the PNG (default), or JSON with float32 "
                             "attribution lists, not gzip'd (megabytes to write while predictions wait for the same "
                             "worker)")
    parser.add_argument("--explanation-threads", type=int, metavar="N",
                        help="with --explain, the endpoint's limits.explanation_threads (default: torch's, every "
                             "physical core)")
    parser.add_argument("--image-size", type=int, default=256, metavar="PX",
                        help="side of the square JPEG sent (default 256; a phone photo is about 3000): decoding it is "
                             "part of every figure, in-process included")
    parser.add_argument("--loaders", type=int, default=max(1, (os.cpu_count() or 1) // 4),
                        help="load-generating processes (default: a quarter of the cores, at least one)")
    args = parser.parse_args()
    seconds = args.seconds or (8 if args.quick else 20)

    with tempfile.TemporaryDirectory(prefix="lantern-bench-serve-") as temporary:
        folder = Path(temporary)
        home = folder / "lantern-home"
        env = {**os.environ, "LANTERN_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}
        os.environ.update(env)
        print("registering resnet50 (random weights) ...")
        uri = register_resnet50(folder)
        image = jpeg_image(args.image_size)
        print("in-process:")
        reference = in_process(uri, image, args.device, args.backend, args.quick)
        print("lantern serve:")
        during_explanations: dict = {}
        lantern = served(uri, image, folder, env, args.device, args.backend, args.workers, reference["best_batch"],
                         seconds, args.loaders, explain_method=args.explain, explain_answer=args.explain_answer,
                         during_explanations=during_explanations, explanation_threads=args.explanation_threads)
        print("mlflow models serve:")
        mlflow = [] if args.skip_mlflow else mlflow_served(uri, image, folder, env, seconds, args.loaders)
        multi = None
        if args.images_per_request > 1:
            print(f"lantern serve, {args.images_per_request} images per request:")
            multi = served(uri, image, folder, env, args.device, args.backend, args.workers, reference["best_batch"],
                           seconds, args.loaders, (max(1, 32 // args.images_per_request),), args.images_per_request)[0]
        overhead = {}
        if not args.skip_overhead:
            print("serving overhead (a tiny model at 64 px, concurrency 1 and 32):")
            tiny = register_tiny(folder)
            overhead["in_process_latency_p50_s"] = in_process_latency(tiny, image, args.device, args.backend, 200)
            print(f"  in-process latency of one image (decode + preprocess + run): "
                  f"{overhead['in_process_latency_p50_s'] * 1000:.2f} ms")
            overhead["lantern_c1"], overhead["lantern"] = served(tiny, image, folder, env, args.device, args.backend,
                                                                 args.workers, 32, seconds, args.loaders, (1, 32))
            if not args.skip_mlflow:
                overhead["mlflow_models_serve"] = mlflow_served(tiny, image, folder, env, seconds, args.loaders,
                                                                (32,))[0]

    at32 = lantern[-1]["images_per_s"] / reference["limit_images_per_s"]
    p50_ratio = lantern[0]["p50_s"] / reference["latency_p50_s"]
    vs_mlflow = {r["concurrency"]: r["images_per_s"] / m["images_per_s"] for r, m in zip(lantern, mlflow)}  # {} if skipped
    print(f"\nserved throughput at concurrency 32 vs in-process limit: {at32:.0%} (goal >= 90 %)")
    print(f"p50 at concurrency 1 vs in-process latency: {p50_ratio:.2f}x (goal <= 1.3x)")
    print("served vs mlflow models serve: " + ", ".join(f"c{c} {v:.1f}x" for c, v in vs_mlflow.items())
          + " (goal >= 3x)")
    explaining_ratio = None
    if during_explanations:
        c8 = next(level for level in lantern if level["concurrency"] == 8)
        explaining_ratio = during_explanations["images_per_s"] / c8["images_per_s"]
        print(f"predictions at concurrency 8 while explaining ({args.explain}, answered as {args.explain_answer}) vs "
              f"without: {explaining_ratio:.0%}; p99 {during_explanations['p99_s'] * 1000:.0f} ms vs "
              f"{c8['p99_s'] * 1000:.0f} ms")
    multi_ratio = None
    if multi is not None:
        multi_ratio = multi["images_per_s"] / reference["limit_images_per_s"]
        print(f"served with 32 images in flight, {args.images_per_request} per request, vs the limit: "
              f"{multi_ratio:.0%}")
    overhead_ratio = tiny_p50_ratio = None
    if overhead:
        tiny_p50_ratio = overhead["lantern_c1"]["p50_s"] / overhead["in_process_latency_p50_s"]
        print(f"tiny model at concurrency 1: p50 {overhead['lantern_c1']['p50_s'] * 1000:.2f} ms vs in-process "
              f"{overhead['in_process_latency_p50_s'] * 1000:.2f} ms ({tiny_p50_ratio:.2f}x: what a model as fast as "
              f"a GPU's would see)")
    if "mlflow_models_serve" in overhead:
        ours, theirs = overhead["lantern"], overhead["mlflow_models_serve"]
        overhead_ratio = ours["images_per_s"] / theirs["images_per_s"]
        print(f"tiny model at concurrency 32: lantern {ours['images_per_s']:.0f} vs mlflow models serve "
              f"{theirs['images_per_s']:.0f} requests/s ({overhead_ratio:.1f}x); server CPU per request "
              f"{ours['server_cpu_ms_per_request']:.1f} vs {theirs['server_cpu_ms_per_request']:.1f} ms")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "model": f"resnet50, random weights, 10 classes, 224 px (JPEG {args.image_size} px in)", "backend": args.backend,
        "workers": args.workers,
        "loaders": args.loaders,
        "seconds_per_level": seconds, "in_process": reference, "lantern": lantern, "mlflow_models_serve": mlflow,
        "overhead_tiny_model": overhead,
        "lantern_c8_while_explaining": during_explanations or None, "lantern_multi_image_32_in_flight": multi,
        "ratios": {"served_c32_vs_limit": at32, "p50_c1_vs_in_process": p50_ratio, "served_vs_mlflow": vs_mlflow,
                   "tiny_model_served_vs_mlflow": overhead_ratio,
                   "tiny_model_p50_c1_vs_in_process": tiny_p50_ratio,
                   "c8_while_explaining_vs_c8": explaining_ratio, "multi_image_vs_limit": multi_ratio},
    }, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
