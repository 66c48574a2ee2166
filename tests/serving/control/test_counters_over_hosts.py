"""The endpoint's counters are the sum of every host's: totals, statuses, histogram buckets and the quantiles taken
again over the summed buckets."""

from __future__ import annotations

from serving.control.counters import DeploymentCounters, summed


def reading(requests: int, failed: int, fast: int, slow: int) -> DeploymentCounters:
    """`fast` requests within 10 ms, `slow` ones within 1 s (cumulative buckets as Prometheus keeps them)."""
    return DeploymentCounters(requests=requests, failed=failed, by_status={"200": requests - failed, "503": failed},
                              latency_buckets={"0.01": fast, "1.0": fast + slow, "+Inf": fast + slow},
                              latency_sum_s=0.005 * fast + 0.5 * slow, images=requests, mirrored={"ok": 1})


def test_counters_are_added_over_hosts_and_quantiles_taken_again() -> None:
    healthy = {"blue": reading(100, 0, 100, 0), "green": reading(10, 0, 10, 0)}
    failing = {"green": reading(10, 10, 0, 10)}  # the canary fails on this host only
    total = summed([healthy, failing])
    assert total["blue"] == healthy["blue"]
    green = total["green"]
    assert (green.requests, green.failed, green.by_status) == (20, 10, {"200": 10, "503": 10})
    assert green.latency_buckets == {"0.01": 10, "1.0": 20, "+Inf": 20} and green.mirrored == {"ok": 2}
    assert green.p50_ms is not None and green.p50_ms <= 10 < green.p99_ms <= 1000  # half fast, half slow
    assert summed([]) == {}
