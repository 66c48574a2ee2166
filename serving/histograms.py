"""Quantiles from Prometheus' cumulative histogram buckets: the server's live counters and the rollout's gates (the
client's, over the difference of two readings) compute them alike."""

from __future__ import annotations

import math


def quantile_ms(buckets: dict[str, int], q: float) -> float | None:
    """The `q` quantile of the requests counted in cumulative `buckets`, in ms, interpolated linearly inside its
    bucket as Prometheus' histogram_quantile does (the bucket's upper bound alone overstated a p99 by up to 2.5x).
    None when nothing was counted, or when the quantile lies in the unbounded bucket."""
    bounds = sorted((float(le), count) for le, count in buckets.items())
    if not bounds or bounds[-1][1] == 0:
        return None
    wanted = q * bounds[-1][1]
    lower, below = 0.0, 0
    for bound, count in bounds:
        if count >= wanted and count > below:
            if not math.isfinite(bound):
                return None
            return 1000 * (lower + (bound - lower) * (wanted - below) / (count - below))
        lower, below = bound, count
    return None
