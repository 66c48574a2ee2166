"""`lantern rollout`: add a deployment, wait until it is ready, shift live traffic to it step by step, and roll the
traffic back when its error rate or p99 latency over a step goes past a threshold."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from registry.errors import LanternError
from serving.client.manage_client import ManageClient
from serving.histograms import quantile_ms

DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*")
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}


class RolloutFailed(LanternError):
    """The new deployment went past a threshold; the traffic was rolled back."""


def parse_duration(text: str) -> float:
    """Seconds from `30s`, `2m`, `500ms`, `1h` or a bare number of seconds."""
    match = DURATION.fullmatch(text)
    if not match:
        raise LanternError(f"{text!r} is not a duration; use e.g. 30s, 2m, 500ms")
    return float(match.group(1)) * UNITS[match.group(2)]


def parse_steps(text: str) -> list[int]:
    """Increasing whole percents from 1 to 100: `10,50,100`."""
    try:
        steps = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LanternError(f"steps must be whole percents separated by commas, e.g. 10,50,100; got {text!r}") from None
    if not steps or any(not 1 <= s <= 100 for s in steps) or steps != sorted(set(steps)):
        raise LanternError(f"steps must increase, each from 1 to 100; got {text!r}")
    return steps


def shifted_split(current: dict[str, int], new: str, percent: int) -> dict[str, int]:
    """`percent` to `new`; the rest shared by the other live deployments in proportion to their current shares
    (largest remainders get the leftover points, so the split sums to 100)."""
    others = {name: share for name, share in current.items() if name != new and share > 0}
    rest = 100 - percent
    if rest and not others:
        raise LanternError("no other deployment has live traffic to share the rest; set the traffic directly")
    total = sum(others.values())
    exact = {name: rest * share / total for name, share in others.items()} if total else {}
    split = {name: int(value) for name, value in exact.items()}
    leftover = rest - sum(split.values())
    for name in sorted(exact, key=lambda n: exact[n] - split[n], reverse=True)[:leftover]:
        split[name] += 1
    return {**{name: 0 for name in current}, **split, new: percent}


@dataclass
class Window:
    """A deployment's requests, failures and latency between two readings of its counters."""

    requests: int
    failed: int
    p99_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    @classmethod
    def between(cls, before: dict[str, Any], after: dict[str, Any]) -> "Window":
        buckets = {le: count - before["latency_buckets"].get(le, 0) for le, count in after["latency_buckets"].items()}
        return cls(after["requests"] - before["requests"], after["failed"] - before["failed"],
                   quantile_ms(buckets, 0.99))


@dataclass
class Thresholds:
    max_error_rate: float
    max_p99_ms: float
    min_requests: int

    def breach(self, window: Window) -> str | None:
        """Why `window` fails the rollout, or None."""
        if window.requests < self.min_requests:
            return None
        if window.error_rate > self.max_error_rate:
            return (f"error rate {window.error_rate:.1%} ({window.failed} of {window.requests} requests) is over "
                    f"{self.max_error_rate:.1%}")
        if window.p99_ms is None or window.p99_ms > self.max_p99_ms:
            shown = "over the largest latency bucket" if window.p99_ms is None else f"{window.p99_ms:.0f} ms"
            return f"p99 latency {shown} is over {self.max_p99_ms:.0f} ms ({window.requests} requests)"
        return None


def rollout(client: ManageClient, config: dict[str, Any], steps: list[int], interval_s: float,
            thresholds: Thresholds, report: Callable[[str], None], progress: Callable[[str], None],
            ready_timeout_s: float = 600) -> dict[str, int]:
    """Run the rollout of the deployment `config`; returns the final split. RolloutFailed after a rollback."""
    name = config["name"]
    original = {n: p for n, p in client.endpoint()["traffic"].items() if p > 0}
    shifted_split(original, name, steps[0])  # fails now, before anything changes, when no split is possible
    client.add(config)
    report(f"added deployment {name} ({config['model']}) with 0 % traffic")
    client.wait_ready(name, ready_timeout_s, progress)
    report(f"deployment {name} is ready in every worker")
    split: dict[str, int] = {}
    for step in steps:
        split = shifted_split({**original, name: 0}, name, step)
        revision = client.set_traffic(split)["revision"]
        client.wait_applied(revision, progress=progress)
        report("traffic " + ", ".join(f"{n}={p}" for n, p in split.items()))
        baseline = client.deployment(name)["counters"]
        deadline = time.monotonic() + interval_s
        while True:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            window = Window.between(baseline, client.deployment(name)["counters"])
            reason = thresholds.breach(window)
            if reason is not None:
                restored = {n: original.get(n, 0) for n in split}
                client.wait_applied(client.set_traffic(restored)["revision"], progress=progress)
                raise RolloutFailed(f"{name} at {step} %: {reason}; traffic rolled back to "
                                    + ", ".join(f"{n}={p}" for n, p in restored.items() if p)
                                    + f". {name} stays with 0 % for inspection (`lantern deploy remove {name}`)")
            if time.monotonic() >= deadline:
                break
            progress(f"{name} at {step} %: {window.requests} requests, {window.failed} failed, p99 "
                     f"{'-' if window.p99_ms is None else f'{window.p99_ms:.0f} ms'}; "
                     f"{deadline - time.monotonic():.0f} s left")
        judged = "" if window.requests >= thresholds.min_requests else (
            f" (fewer than {thresholds.min_requests} requests: not enough to judge)")
        report(f"{name} at {step} % held for {interval_s:g} s: {window.requests} requests, {window.failed} failed"
               + judged)
    return split
