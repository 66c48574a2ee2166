"""Lantern's Prometheus metrics, served by BentoML's `/metrics` beside its own.

They are created on first use, inside the worker: BentoML sets PROMETHEUS_MULTIPROC_DIR when a worker starts, and
prometheus_client must see it before the metrics exist, or `/metrics` of a multi-worker service would not show them."""

from __future__ import annotations

import functools
from dataclasses import dataclass

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 180)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
STAGE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


@dataclass(frozen=True)
class Metrics:
    requests: object
    latency: object
    explanation_seconds: object
    abandoned: object
    preprocess_seconds: object
    batch_size: object
    queue_seconds: object
    model_call_seconds: object
    images: object
    explanation_runs: object
    mirrored: object
    mirror_latency: object
    reloads: object
    jobs: object
    job_queue_seconds: object


JOB_QUEUE_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)


@functools.cache
def metrics() -> Metrics:
    from prometheus_client import Counter, Histogram

    return Metrics(
        requests=Counter("lantern_requests_total", "Requests answered, by deployment, route and status code",
                         ["deployment", "route", "status"]),
        latency=Histogram("lantern_request_duration_seconds", "Time to answer a request, by deployment and route",
                          ["deployment", "route"], buckets=LATENCY_BUCKETS),
        explanation_seconds=Histogram("lantern_explanation_duration_seconds",
                                      "Time to compute one explanation, by deployment and method",
                                      ["deployment", "method"], buckets=LATENCY_BUCKETS),
        abandoned=Counter("lantern_abandoned_requests_total",
                          "Requests whose work was abandoned (timeout or client disconnect)",
                          ["deployment", "route", "reason"]),
        preprocess_seconds=Histogram("lantern_preprocess_seconds",
                                     "Time to decode, crop and normalise one request's images for prediction, from "
                                     "handing them to the work pool (waiting for a free thread included) to having "
                                     "them back", ["deployment"], buckets=STAGE_BUCKETS),
        batch_size=Histogram("lantern_batch_size", "Images per model call made by adaptive batching (a call mixing "
                             "deployments of one model counts for each of them)",
                             ["deployment"], buckets=BATCH_BUCKETS),
        queue_seconds=Histogram("lantern_batch_queue_seconds",
                                "Time an image waited for its model call: from joining the batching queue to the "
                                "start of its batch", ["deployment"], buckets=STAGE_BUCKETS),
        model_call_seconds=Histogram("lantern_model_call_seconds",
                                     "Time of one batched model call (stacking the batch, the backend's run, the "
                                     "logits back; a call mixing deployments counts for each)", ["deployment"],
                                     buckets=STAGE_BUCKETS),
        images=Counter("lantern_images_total", "Images predicted, by deployment", ["deployment"]),
        explanation_runs=Counter("lantern_explanation_runs_total",
                                 "Explanation computations by how they ended: completed, abandoned (stopped early "
                                 "because the request timed out or its client left) or failed",
                                 ["deployment", "method", "outcome"]),
        mirrored=Counter("lantern_mirrored_requests_total",
                         "Mirrored copies of live requests (shadow traffic), by how they ended: completed, failed, "
                         "timeout, dropped (the mirrored deployment was full) or skipped_unready; never counted in "
                         "lantern_requests_total", ["deployment", "route", "outcome"]),
        mirror_latency=Histogram("lantern_mirror_duration_seconds", "Time to answer a mirrored copy",
                                 ["deployment", "route"], buckets=LATENCY_BUCKETS),
        reloads=Counter("lantern_deployment_reloads_total",
                        "Deployments reloaded because their liveness probe failed failure_threshold times in a row",
                        ["deployment"]),
        jobs=Counter("lantern_explanation_jobs_total",
                     "Explanation jobs by state reached: queued (accepted through this worker), then succeeded, "
                     "failed or cancelled (counted by the worker that ran them, or the one a queued job was "
                     "cancelled through)", ["deployment", "state"]),
        job_queue_seconds=Histogram("lantern_explanation_job_queue_seconds",
                                    "Time an explanation job waited in the queue, from being accepted to a worker "
                                    "starting it", ["deployment"], buckets=JOB_QUEUE_BUCKETS),
    )
