"""Hostile bodies, run by hand: `.venv/bin/python bench/hostile.py [--repeats N]`.

One `lantern serve` (the small CNN at 64 px, bodies up to 1 MiB) gets each hostile request below, `--repeats` times,
while a second client asks `/livez` every 5 ms. For each it prints how long the refusal took (the client's time, over
loopback) against a valid one-image `/predict` measured in the same run, and the slowest `/livez` answer meanwhile
(goal: each refused in under 50 ms, `/livez` under 100 ms throughout). Results go to bench/results/hostile.json.

- json_open_string: `[]` x 70, one `"`, then `\\"` to 1 MiB (the nesting pre-scan was quadratic on it);
- json_deep: 1 MiB of `[` then `]`;
- json_utf16: a valid /score body in UTF-16;
- score_rows: 1 MiB of tiny rows (about 120 000: they were parsed one by one before the 64-row limit);
- explain_targets: an /explain body of 350 000 bad `targets` (each used to be described in the answer);
- many_names: an object of 90 000 names (each an unknown field);
- gzip_members: 52 428 empty gzip members, 1 MiB (each member copied the rest of the body);
- gzip_bomb: 1 MiB of gzip that inflates past the body limit;
- multipart_files: 65 image files;
- head_1mib: a 1 MiB header (no key needed to send one);
- stalled_body: half a body, then silence (answered at the deployment's request_timeout_ms, 1 s here: its time is
  the timeout by design; `/livez` meanwhile is what counts).
"""

from __future__ import annotations

import argparse
import base64
import gzip
import io
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.load import Process, free_port  # noqa: E402
from bench.models import register_tiny  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "hostile.json"
LIMIT = 1 << 20
TIMEOUT_MS = 1000


def png(size: int = 64) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(out, format="PNG")
    return out.getvalue()


def zeros_gzip(size: int) -> bytes:
    """`size` bytes of a gzip stream of zeros (about a thousand times as many once inflated), cut off there."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out, zeros = b"", bytes(1 << 20)
    while len(out) < size:
        out += compressor.compress(zeros)
    return out[:size]


def raw_request(port: int, head: bytes, body: bytes, pause_after: int | None = None) -> tuple[float, int]:
    """(seconds to the answer's status line, status) of a request written on a socket; with `pause_after`, only that
    many body bytes are sent before waiting for the answer."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head + (body if pause_after is None else body[:pause_after]))
        answer = b""
        while b"\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else 0
    return time.perf_counter() - started, status


def http_head(path: str, key: str, length: int, content_type: str, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: bench", f"Authorization: Bearer {key}", f"Content-Type: {content_type}",
             f"Content-Length: {length}", "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def cases(key: str) -> dict[str, Callable[[int], tuple[float, int]]]:
    image = png()
    score_json = json.dumps({"input_data": {"columns": ["image"], "data": [base64.b64encode(image).decode()]}}).encode()
    open_string = b"[]" * 70 + b'"' + b'\\"' * ((LIMIT - 141) // 2)
    deep = b"[" * (LIMIT // 2) + b"]" * (LIMIT // 2)
    utf16 = score_json.decode().encode("utf-16")
    targets = json.dumps({"image_base64": "QUJD", "targets": [1] * ((LIMIT - 40) // 3)}).encode()
    names = json.dumps({f"k{i}": 0 for i in range(LIMIT // 16)}).encode()
    rows = json.dumps({"input_data": {"data": ["QQ=="] * ((LIMIT - 40) // 8)}}).encode()
    members = gzip.compress(b"", mtime=0) * (LIMIT // 20)
    bomb = zeros_gzip(LIMIT)
    boundary = "benchboundary"
    parts = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"{i}.png\"\r\n"
                     f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n" for i in range(65))
    multipart = parts + f"--{boundary}--\r\n".encode()

    def post(path: str, body: bytes, content_type: str, **headers: str) -> Callable[[int], tuple[float, int]]:
        return lambda port: raw_request(port, http_head(path, key, len(body), content_type, **headers), body)

    def huge_head(port: int) -> tuple[float, int]:
        filler = b"X-Filler: " + b"a" * LIMIT + b"\r\n"
        return raw_request(port, b"POST /predict HTTP/1.1\r\nHost: bench\r\n" + filler + b"\r\n", b"")

    def stalled(port: int) -> tuple[float, int]:
        return raw_request(port, http_head("/score", key, len(score_json), "application/json"), score_json,
                           pause_after=len(score_json) // 2)

    return {
        "valid_predict": post("/predict", image, "image/png"),
        "json_open_string": post("/score", open_string, "application/json"),
        "json_deep": post("/score", deep, "application/json"),
        "json_utf16": post("/score", utf16, "application/json"),
        "score_rows": post("/score", rows, "application/json"),
        "explain_targets": post("/explain", targets, "application/json"),
        "many_names": post("/score", names, "application/json"),
        "gzip_members": post("/score", members, "application/json", **{"Content-Encoding": "gzip"}),
        "gzip_bomb": post("/score", bomb, "application/json", **{"Content-Encoding": "gzip"}),
        "multipart_files": post("/predict", multipart, f"multipart/form-data; boundary={boundary}"),
        "head_1mib": huge_head,
        "stalled_body": stalled,
    }


class LivezWatch:
    """Asks /livez every 5 ms on a kept-alive connection; `worst()` is the slowest answer since the last reset."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.times: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self.stop.is_set():
                started = time.perf_counter()
                http.get(f"{self.url}/livez")
                self.times.append(time.perf_counter() - started)
                time.sleep(0.005)

    def reset(self) -> None:
        self.times = []

    def worst(self) -> float:
        return max(self.times, default=0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lantern-hostile-") as temporary:
        folder = Path(temporary)
        home = folder / "home"
        env = {**os.environ, "LANTERN_HOME": str(home), "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
               "LANTERN_API_KEY": "bench-key"}
        os.environ.update({k: env[k] for k in ("LANTERN_HOME", "MLFLOW_TRACKING_URI")})
        uri = register_tiny(folder)
        port = free_port()
        config = {"name": "hostile", "limits": {"max_body_bytes": LIMIT},
                  "deployments": [{"name": "blue", "model": uri, "device": "cpu",
                                   "readiness_probe": {"initial_delay": 0, "period": 0.5},
                                   "request_settings": {"request_timeout_ms": TIMEOUT_MS,
                                                        "max_concurrent_requests_per_instance": 4}}],
                  "traffic": {"blue": 100}}
        (folder / "endpoint.yaml").write_text(yaml.safe_dump(config))
        server = Process([sys.executable, "-m", "lantern", "serve", str(folder / "endpoint.yaml"), "--port", str(port)],
                         env, folder / "server.log", f"http://127.0.0.1:{port}/readyz")
        results: dict[str, dict] = {}
        try:
            watch = LivezWatch(f"http://127.0.0.1:{port}")
            for name, send in cases("bench-key").items():
                send(port)  # warm-up
                watch.reset()
                runs = [send(port) for _ in range(args.repeats)]
                seconds = [s for s, _ in runs]
                results[name] = {"status": sorted({status for _, status in runs}),
                                 "median_s": statistics.median(seconds), "max_s": max(seconds),
                                 "livez_worst_s": watch.worst(), "livez_answers": len(watch.times)}
            watch.stop.set()
        finally:
            server.stop()
    reference = results["valid_predict"]["median_s"]
    print(f"{'case':<18} {'status':<8} {'median ms':>10} {'max ms':>8} {'x valid':>8} {'worst livez ms':>15}")
    for name, result in results.items():
        print(f"{name:<18} {','.join(map(str, result['status'])):<8} {result['median_s'] * 1000:>10.1f} "
              f"{result['max_s'] * 1000:>8.1f} {result['median_s'] / reference:>8.1f} "
              f"{result['livez_worst_s'] * 1000:>15.1f}")
    refused = {n: r for n, r in results.items() if n not in ("valid_predict", "stalled_body")}
    goals = {"every_refusal_under_50ms": all(r["max_s"] < 0.05 for r in refused.values()),
             "livez_under_100ms_throughout": all(r["livez_worst_s"] < 0.1 for r in results.values())}
    print(goals)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
                                   "body_limit_bytes": LIMIT, "repeats": args.repeats, "cases": results,
                                   "goals": goals}, indent=1))
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
