"""Live counters of each deployment: this host's, read from Lantern's Prometheus metrics (summed over its worker
processes, the same numbers its `/metrics` serves), and the endpoint's, summed over the hosts' published counters."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable

from pydantic import BaseModel, Field

from serving.histograms import quantile_ms

FAILED_STATUSES = {"408", "424"}  # with every 5xx: what counts against a deployment (not the caller's mistakes)


class DeploymentCounters(BaseModel):
    """Totals since the server started; compare two readings for a rate."""

    requests: int = Field(0, description="requests answered (every route and status)")
    failed: int = Field(0, description="answers that are the deployment's fault: 408, 424 and 5xx")
    by_status: dict[str, int] = Field(default_factory=dict)
    latency_buckets: dict[str, int] = Field(default_factory=dict,
                                            description="cumulative count of requests answered within each bound (s)")
    latency_sum_s: float = 0.0
    p50_ms: float | None = Field(None, description="median latency, interpolated in its histogram bucket")
    p99_ms: float | None = Field(None, description="99th percentile latency, interpolated in its histogram bucket")
    images: int = 0
    mirrored: dict[str, int] = Field(default_factory=dict, description="mirrored copies by outcome")

    def plus(self, other: DeploymentCounters) -> DeploymentCounters:
        """These counters and `other`'s added (another host's), the quantiles taken again over the sum."""
        def added(mine: dict, theirs: dict) -> dict:
            return {key: mine.get(key, 0) + theirs.get(key, 0) for key in {*mine, *theirs}}

        buckets = added(self.latency_buckets, other.latency_buckets)
        return DeploymentCounters(
            requests=self.requests + other.requests, failed=self.failed + other.failed,
            by_status=added(self.by_status, other.by_status), latency_buckets=buckets,
            latency_sum_s=self.latency_sum_s + other.latency_sum_s, images=self.images + other.images,
            mirrored=added(self.mirrored, other.mirrored),
            p50_ms=quantile_ms(buckets, 0.5), p99_ms=quantile_ms(buckets, 0.99))


def summed(readings: Iterable[dict[str, DeploymentCounters]]) -> dict[str, DeploymentCounters]:
    """Counters per deployment added over `readings` (one per host)."""
    total: dict[str, DeploymentCounters] = {}
    for reading in readings:
        for name, counters in reading.items():
            total[name] = total[name].plus(counters) if name in total else counters
    return total


def _registry():
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, folder)
    return registry


def deployment_counters() -> dict[str, DeploymentCounters]:
    """Counters per deployment name, from every worker's samples."""
    found: dict[str, DeploymentCounters] = defaultdict(DeploymentCounters)
    for family in _registry().collect():
        for sample in family.samples:
            name = sample.labels.get("deployment")
            if not name:
                continue
            counters, value = found[name], sample.value
            if sample.name == "lantern_requests_total":
                status = sample.labels["status"]
                counters.requests += int(value)
                counters.by_status[status] = counters.by_status.get(status, 0) + int(value)
                if status in FAILED_STATUSES or status.startswith("5"):
                    counters.failed += int(value)
            elif sample.name == "lantern_request_duration_seconds_bucket":
                bound = sample.labels["le"]
                counters.latency_buckets[bound] = counters.latency_buckets.get(bound, 0) + int(value)
            elif sample.name == "lantern_request_duration_seconds_sum":
                counters.latency_sum_s += value
            elif sample.name == "lantern_images_total":
                counters.images += int(value)
            elif sample.name == "lantern_mirrored_requests_total":
                outcome = sample.labels["outcome"]
                counters.mirrored[outcome] = counters.mirrored.get(outcome, 0) + int(value)
    for counters in found.values():
        counters.p50_ms = quantile_ms(counters.latency_buckets, 0.5)
        counters.p99_ms = quantile_ms(counters.latency_buckets, 0.99)
    return dict(found)
