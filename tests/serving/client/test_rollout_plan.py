"""The operator's rollout plan (serving/client/rollout.py): traffic splits, steps and durations as typed, the gates
over a window of counters, and the quantiles both sides compute from histogram buckets (serving/histograms.py)."""

from __future__ import annotations

import pytest

from registry.errors import LanternError
from serving.client.manage_cli import deployment_fields
from serving.client.rollout import Thresholds, Window, parse_duration, parse_steps, shifted_split
from serving.histograms import quantile_ms


def test_rollout_splits_steps_durations_and_gates() -> None:
    assert shifted_split({"blue": 100}, "green", 10) == {"blue": 90, "green": 10}
    assert shifted_split({"blue": 100, "green": 0}, "green", 100) == {"blue": 0, "green": 100}
    three = shifted_split({"a": 50, "b": 50}, "c", 33)
    assert sum(three.values()) == 100 and three["c"] == 33 and abs(three["a"] - three["b"]) <= 1
    with pytest.raises(LanternError, match="no other deployment"):
        shifted_split({}, "green", 10)
    assert parse_steps("10, 50,100") == [10, 50, 100]
    for bad in ("50,10", "0,100", "10,101", "ten", ""):
        with pytest.raises(LanternError):
            parse_steps(bad)
    assert parse_duration("30s") == 30 and parse_duration("2m") == 120 and parse_duration("500ms") == 0.5
    assert parse_duration("7") == 7
    with pytest.raises(LanternError, match="duration"):
        parse_duration("soon")
    before = {"requests": 10, "failed": 0, "latency_buckets": {"0.01": 10, "0.1": 10, "+Inf": 10}}
    after = {"requests": 110, "failed": 5, "latency_buckets": {"0.01": 50, "0.1": 109, "+Inf": 110}}
    window = Window.between(before, after)
    assert (window.requests, window.failed, window.error_rate) == (100, 5, 0.05)
    assert window.p99_ms == pytest.approx(100)
    assert "error rate" in Thresholds(0.01, 1000, 20).breach(window)
    assert "p99" in Thresholds(0.1, 50, 20).breach(window)
    assert Thresholds(0.1, 1000, 20).breach(window) is None
    assert Thresholds(0.0, 1, 1000).breach(window) is None  # too few requests to judge


def test_quantiles_are_interpolated_inside_their_bucket() -> None:
    assert quantile_ms({"0.01": 0, "+Inf": 0}, 0.5) is None and quantile_ms({"0.5": 3, "+Inf": 4}, 0.99) is None
    # inside its bucket, as Prometheus' histogram_quantile: not the bucket's upper bound
    assert quantile_ms({"0.25": 0, "0.5": 100, "+Inf": 100}, 0.99) == pytest.approx(497.5)
    assert quantile_ms({"0.1": 50, "0.2": 100, "+Inf": 100}, 0.5) == pytest.approx(100)
    assert quantile_ms({"0.1": 0, "0.2": 50, "0.3": 50, "0.5": 100, "+Inf": 100}, 0.75) == pytest.approx(400)
    assert quantile_ms({"0.1": 40, "+Inf": 40}, 0.5) == pytest.approx(50)  # the first bucket starts at 0


def test_set_options_become_nested_deployment_fields() -> None:
    assert deployment_fields(("valid_crop_size=224", "device=cpu", "request_settings.request_timeout_ms=90000")) == {
        "settings": {"valid_crop_size": 224}, "device": "cpu", "request_settings": {"request_timeout_ms": 90000}}


def test_the_client_loads_without_the_server_torch_or_mlflow() -> None:
    """The operator's commands run where only the client is needed: importing them loads no server code, torch or
    MLflow (import-linter checks the imports as written; this checks what Python actually loads)."""
    import subprocess
    import sys

    code = ("import sys, serving.client.manage_cli, serving.client.rollout; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlflow', 'bentoml', 'onnxruntime') "
            "or m.startswith(('serving.http', 'serving.runtime', 'serving.control'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
