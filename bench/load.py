"""The benchmarks' load generator and server processes: aiohttp clients sending one request back to back, spread
over loader processes; a server started and stopped as a process group; its CPU time and Lantern's batching
histograms read from /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import psutil


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class Request:
    """One POST the load generator repeats (picklable: it is sent to the loader processes)."""

    path: str
    body: bytes
    headers: dict[str, str]


async def _clients(url: str, request: Request, clients: int, seconds: float, barrier) -> tuple[list[float], int, float]:
    """`clients` aiohttp clients in this process, each sending `request` back to back for `seconds` once every loader
    has warmed up (`barrier`): latencies, errors and the seconds from the start to the last answer."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base_url=url, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=120)) as session:
        async def send() -> int:
            async with session.post(request.path, data=request.body, headers=request.headers) as response:
                await response.read()
                return response.status

        await asyncio.gather(*(send() for _ in range(2 * clients)))  # connections open, the server warm
        await asyncio.to_thread(barrier.wait)
        start = time.perf_counter()
        deadline = start + seconds

        async def one_client() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                if await send() == 200:
                    latencies.append(time.perf_counter() - began)
                else:
                    errors += 1

        await asyncio.gather(*(one_client() for _ in range(clients)))
        return latencies, errors, time.perf_counter() - start


def _loader(url: str, request: Request, clients: int, seconds: float, barrier, results) -> None:
    results.put(asyncio.run(_clients(url, request, clients, seconds, barrier)))


def load(url: str, request: Request, concurrency: int, seconds: float, loaders: int) -> dict:
    """`concurrency` clients sending back to back for `seconds`, spread over `loaders` processes (one process spends
    ~0.15 ms of CPU a request, 5,000-7,000 requests a second against a bare aiohttp server on 2 cores: with one, a fast
    GPU server would partly measure the load generator): throughput and latency percentiles."""
    loaders = max(1, min(loaders, concurrency))
    shares = [concurrency // loaders + (i < concurrency % loaders) for i in range(loaders)]
    if loaders == 1:
        results = [asyncio.run(_clients(url, request, concurrency, seconds, threading.Barrier(1)))]
    else:
        context = multiprocessing.get_context("spawn")
        barrier, queue = context.Barrier(loaders), context.Queue()
        processes = [context.Process(target=_loader, args=(url, request, share, seconds, barrier, queue))
                     for share in shares]
        for process in processes:
            process.start()
        results = [queue.get(timeout=seconds + 600) for _ in processes]
        for process in processes:
            process.join()
    latencies = [latency for found, _, _ in results for latency in found]
    elapsed = max(e for _, _, e in results)
    return {"concurrency": concurrency, "loaders": loaders, "requests": len(latencies),
            "warm_up_requests": 2 * concurrency,
            "errors": sum(e for _, e, _ in results), "requests_per_s": len(latencies) / elapsed,
            "mean_s": float(np.mean(latencies)) if latencies else None,
            "p50_s": float(np.percentile(latencies, 50)) if latencies else None,
            "p99_s": float(np.percentile(latencies, 99)) if latencies else None}


class Process:
    def __init__(self, command: list[str], env: dict[str, str], log: Path, ready_url: str) -> None:
        self.log = log
        self.process = subprocess.Popen(command, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(ready_url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{command[:3]} not ready:\n{log.read_text()[-3000:]}")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)


def server_cpu_seconds(server: "Process") -> float:
    """CPU time used so far by a server process and its children (BentoML's workers)."""
    root = psutil.Process(server.process.pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            total += times.user + times.system
    return total


BATCHING_METRICS = ("lantern_batch_size", "lantern_batch_queue_seconds", "lantern_model_call_seconds",
                    "lantern_request_duration_seconds", "lantern_preprocess_seconds")


def batching_totals(url: str) -> dict[str, float]:
    """The `_sum` and `_count` of Lantern's batching and request histograms, over every deployment and worker."""
    totals = {f"{name}_{part}": 0.0 for name in BATCHING_METRICS for part in ("sum", "count")}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        match = re.match(r"^(\w+)(?:\{.*\})? (\S+)$", line)
        if match and match.group(1) in totals:
            totals[match.group(1)] += float(match.group(2))
    return totals


def batching_split(before: dict[str, float], after: dict[str, float]) -> dict[str, float | None]:
    """Means over a load level (its warm-up included): images per model call, an image's wait in the batching
    queue, a model call, and per request the time in Lantern's handler and the decoding in it. A queue wait far above
    the model call means batches wait for the device, or the dispatcher holds them back for larger batches; a
    client's latency far above the handler's time is HTTP's and the middlewares' (or the load generator's)."""
    def mean(name: str) -> float | None:
        count = after[f"{name}_count"] - before[f"{name}_count"]
        return (after[f"{name}_sum"] - before[f"{name}_sum"]) / count if count else None

    return {"mean_batch_size": mean("lantern_batch_size"), "mean_queue_wait_s": mean("lantern_batch_queue_seconds"),
            "mean_model_call_s": mean("lantern_model_call_seconds"),
            "mean_handler_s": mean("lantern_request_duration_seconds"),
            "mean_preprocess_s": mean("lantern_preprocess_seconds")}
