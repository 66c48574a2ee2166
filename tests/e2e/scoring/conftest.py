"""One real scoring server (`lantern serve` on a free loopback port) shared by every test of this folder."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.common import LABELS, SMALL_SETTINGS, lantern_executable, own_store
from support.scoring import Sick, endpoint_config, make_picky
from support.servers import Server


@pytest.fixture(scope="package")
def registered(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Iterator[str]:
    """This folder's registry (a store and Lantern home of its own): `mc` (alias champion), multi-label `ml` (which
    predicts every label), and `picky` and `sick`, whose ONNX models fail on some inputs or on the probes' blank
    image."""
    from registry.register import register_checkpoint

    with own_store(tmp_path_factory.mktemp("registry")) as uri:
        weights = checkpoints["safetensors"]
        register_checkpoint("mc", weights, "small_cnn", LABELS, "multiclass", SMALL_SETTINGS, alias="champion")
        # a low threshold: the untrained weights' scores pass it for every label (none passes the default 0.5), so
        # the multi-label deployment explains several labels an image
        register_checkpoint("ml", weights, "small_cnn", LABELS, "multilabel",
                            {**SMALL_SETTINGS, "confidence_score_threshold_multilabel": 0.05})
        register_checkpoint("picky", weights, "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
        make_picky("models:/picky/1")
        register_checkpoint("sick", weights, "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
        make_picky("models:/sick/1", Sick())
        yield uri


@pytest.fixture(scope="package")
def server(registered: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANTERN_API_KEY")}
    running = Server(endpoint_config(), tmp_path_factory.mktemp("endpoint"), env).start()
    never_ready = ("late", "sick")  # a probe delayed an hour; probes that always fail
    running.wait_for_deployments(tuple(name for name in running.deployments if name not in never_ready))
    yield running
    running.stop()


@pytest.fixture(scope="package")
def key(server: Server) -> str:
    """The primary scoring key, as `lantern endpoint get-credentials` prints it."""
    out = subprocess.run([lantern_executable(), "endpoint", "get-credentials", str(server.config_path)],
                         capture_output=True, text=True, check=True, env=server.env)
    return json.loads(out.stdout)["primary"]
