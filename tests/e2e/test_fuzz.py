"""Schemathesis over the served OpenAPI document, all phases (examples, coverage, fuzzing, stateful), a bounded number
of examples: once with a scoring key on the scoring, health and metrics routes, then with the admin key on the
management routes. No answer may be a 5xx, and every 4xx must be in Lantern's error format (tests/support/fuzz_checks.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.common import LABELS, SMALL_SETTINGS, TESTS_DIR
from support.servers import Server

SCORING_KEY, ADMIN_KEY = "fuzz-scoring-key", "fuzz-admin-key"  # from the environment: regenerating them is refused
MAX_EXAMPLES = 50
PHASES = "examples,coverage,fuzzing,stateful"


@pytest.fixture(scope="module")
def server(module_store: str, checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    from registry.register import register_checkpoint

    register_checkpoint("fz", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    probe = {"initial_delay": 0, "period": 0.5}
    settings = {"request_timeout_ms": 30000, "max_concurrent_requests_per_instance": 4}
    config = {"name": "fuzz", "limits": {"max_body_bytes": 1_000_000},
              "deployments": [{"name": "blue", "model": "models:/fz/1", "device": "cpu", "readiness_probe": probe,
                               "request_settings": settings},
                              {"name": "green", "model": "models:/fz/1", "device": "cpu", "readiness_probe": probe,
                               "request_settings": settings}],
              "traffic": {"blue": 100}}
    env = {**os.environ, "LANTERN_API_KEY": SCORING_KEY, "LANTERN_ADMIN_KEY": ADMIN_KEY}
    running = Server(config, tmp_path_factory.mktemp("fuzz"), env).start()
    running.wait_for_deployments()
    yield running
    running.stop()


def schemathesis(server: Server, key: str, *selection: str) -> subprocess.CompletedProcess:
    """`schemathesis run` on the served document with `key`, Lantern's checks, and the operations `selection` picks."""
    command = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{server.url}/openapi.json",
               "--header", f"Authorization: Bearer {key}", "--checks", "not_a_server_error,lantern_error_format",
               "--phases", PHASES, "--max-examples", str(MAX_EXAMPLES), "--request-timeout", "60", "--workers", "1",
               "--no-color", *selection]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "support.fuzz_checks",
           "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, cwd=server.folder)


def generated(run: subprocess.CompletedProcess, server: Server) -> int:
    """How many test cases the run generated; it fails the test, showing what schemathesis found, unless all passed."""
    found = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
    assert run.returncode == 0 and found and found.group(1) == found.group(2), \
        f"{run.stdout[-12000:]}\n{run.stderr[-3000:]}\n{server.log()[-3000:]}"
    print(run.stdout[-1500:])
    return int(found.group(1))


def test_scoring_routes_answer_every_generated_request_in_lantern_format(server: Server) -> None:
    run = schemathesis(server, SCORING_KEY, "--exclude-path-regex", "^/manage")
    assert generated(run, server) >= 100
    # /score, /predict, /explain, /livez, /readyz, /metrics and the four of explanation jobs (chained by their links)
    assert re.search(r"Tested: 10\b", run.stdout) and "✅ Stateful" in run.stdout


def test_management_routes_answer_every_generated_request_in_lantern_format(server: Server) -> None:
    """The stateful phase chains the routes (add a deployment, read it, change it, remove it) by the links it infers
    from the document."""
    run = schemathesis(server, ADMIN_KEY, "--include-path-regex", "^/manage")
    assert generated(run, server) >= 100
    assert re.search(r"Tested: 9\b", run.stdout) and "✅ Stateful" in run.stdout
