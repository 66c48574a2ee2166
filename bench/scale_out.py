"""Scale-out benchmark, run by hand: `.venv/bin/python bench/scale_out.py [--state-uri URL] [--changes N]
[--idle-seconds S]`.

Two hosts (`lantern serve`, each with its own Lantern home and port, one worker each) serve one endpoint from one
PostgreSQL state database: `--state-uri` (a database of its own: the bench reads that database's statistics), else a
throwaway cluster made with the machine's PostgreSQL binaries as the tests make it. One run measures:
1. change propagation: N traffic changes made through host A's management API, each timed from A's answer until host
   B serves the new revision (its /readyz names the revision it serves; polled every 5 ms): p50 and p99 (goal: p99 < 1 s
   on every host), against the followers' poll period (the floor of polling) and A's own answer time (the reference
   measured in the same run: what the change itself costs);
2. what the replicas cost the database: its transactions per second (pg_stat_database) at idle, and while a change is
   made every second, per worker.
Writes bench/results/scale_out.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))  # the throwaway PostgreSQL server the tests use

from bench.load import Process, free_port  # noqa: E402
from bench.models import register_tiny  # noqa: E402
from serving.runtime.endpoint import WATCH_S  # noqa: E402
from support.postgres import postgres_server  # noqa: E402

KEYS = {"LANTERN_API_KEY": "bench-primary-key", "LANTERN_API_KEY_SECONDARY": "bench-secondary-key",
        "LANTERN_ADMIN_KEY": "bench-admin-key"}


def transactions(uri: str) -> int:
    """Committed and rolled back transactions of the database `uri` names, so far."""
    import psycopg

    plain = uri.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as connection:
        row = connection.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                                 "WHERE datname = current_database()").fetchone()
    return int(row[0])


def transactions_per_second(uri: str, seconds: float, during=None) -> float:  # noqa: ANN001
    """The database's transactions per second over `seconds` (statistics are flushed about every second: long
    windows), with `during()` called once a second meanwhile; the bench's own two readings left out."""
    time.sleep(1.5)
    before, started = transactions(uri), time.monotonic()
    while time.monotonic() - started < seconds:
        if during is not None:
            during()
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started) % 1.0))
    time.sleep(1.5)  # let the last second's statistics reach pg_stat_database
    return (transactions(uri) - before - 2) / (time.monotonic() - started - 1.5)


def serving_revision(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/readyz", timeout=5).json().get("revision")
    except (httpx.HTTPError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-uri", default=None, help="a PostgreSQL database for the state (default: a throwaway "
                                                          "cluster)")
    parser.add_argument("--changes", type=int, default=60)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    arguments = parser.parse_args()

    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lantern-bench-scale-")))
        state_uri = arguments.state_uri or stack.enter_context(postgres_server()).database("bench_state")
        registry = f"sqlite:///{folder / 'registry' / 'mlflow.db'}"
        os.environ.update({"LANTERN_HOME": str(folder / "registry"), "MLFLOW_TRACKING_URI": registry})
        model = register_tiny(folder)
        config = {"name": "bench", "deployments": [{"name": "blue", "model": model}], "traffic": {"blue": 100}}
        (folder / "endpoint.yaml").write_text(yaml.safe_dump(config))
        hosts = []
        for name in ("a", "b"):
            port = free_port()
            env = {**os.environ, **KEYS, "LANTERN_HOME": str(folder / f"host-{name}"), "LANTERN_STATE_URI": state_uri,
                   "LANTERN_HOST_ID": f"host-{name}"}
            server = Process([str(Path(sys.executable).with_name("lantern")), "serve", str(folder / "endpoint.yaml"),
                              "--port", str(port), "--workers", "1"], env, folder / f"host-{name}.log",
                             f"http://127.0.0.1:{port}/readyz")
            stack.callback(server.stop)
            hosts.append(f"http://127.0.0.1:{port}")
        manage = httpx.Client(base_url=f"{hosts[0]}/manage", timeout=30,
                              headers={"Authorization": f"Bearer {KEYS['LANTERN_ADMIN_KEY']}"})

        def change() -> tuple[float, int, float]:
            """One change through host A: seconds until A answered, the revision it made, when A answered."""
            started = time.perf_counter()
            answer = manage.put("/traffic", json={"blue": 100})
            answered = time.perf_counter()
            assert answer.status_code == 200, answer.text
            return answered - started, answer.json()["revision"], answered

        print(f"state database: {state_uri.split('@')[-1]}; hosts {hosts}; {platform.node()}")
        answer_s, propagation_s = [], []
        for _ in range(arguments.changes):
            time.sleep(np.random.default_rng(len(answer_s)).uniform(0.05, 0.3))  # not in step with the polls
            took, wanted, answered = change()
            answer_s.append(took)
            while (serving_revision(hosts[1]) or 0) < wanted:
                time.sleep(0.005)
            propagation_s.append(time.perf_counter() - answered)
        idle = transactions_per_second(state_uri, arguments.idle_seconds)
        busy = transactions_per_second(state_uri, arguments.idle_seconds, during=change)
        workers = 2
        result = {
            "changes": arguments.changes, "hosts": 2, "workers": workers,
            "propagation_p50_s": float(np.percentile(propagation_s, 50)),
            "propagation_p99_s": float(np.percentile(propagation_s, 99)),
            "propagation_max_s": max(propagation_s), "poll_period_s": WATCH_S,
            "change_answer_p50_s": statistics.median(answer_s),
            "database_tps_idle": idle, "database_tps_idle_per_worker": idle / workers,
            "database_tps_one_change_a_second": busy, "database_tps_per_change": busy - idle,
        }
    print(f"change propagation to the other host over {arguments.changes} changes: p50 "
          f"{result['propagation_p50_s'] * 1000:.0f} ms, p99 {result['propagation_p99_s'] * 1000:.0f} ms "
          f"(goal < 1000 ms: {result['propagation_p99_s'] / 1.0:.2f} of it; poll period {WATCH_S * 1000:.0f} ms; the "
          f"change's own answer on host A: p50 {result['change_answer_p50_s'] * 1000:.0f} ms)")
    print(f"the state database: {idle:.1f} transactions/s at idle ({idle / workers:.1f} per worker), {busy:.1f} with "
          f"one change a second ({busy - idle:.1f} per change)")
    out = ROOT / "bench" / "results" / "scale_out.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
