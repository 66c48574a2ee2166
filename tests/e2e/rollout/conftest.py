"""One real two-worker endpoint (`lantern serve --workers 2`) shared by every test of this folder; each test starts
and ends with blue serving 100 % and no other deployment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.common import LABELS, SMALL_SETTINGS, own_store
from support.operations import Admin, credential, deployment
from support.servers import Server


@pytest.fixture(scope="package")
def registered(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> Iterator[str]:
    """This folder's registry (a store and Lantern home of its own) with versions 1 and 2 of `mc` (same weights)."""
    from registry.register import register_checkpoint

    with own_store(tmp_path_factory.mktemp("registry")) as uri:
        for _ in range(2):
            register_checkpoint("mc", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
        yield uri


@pytest.fixture(scope="package")
def server(registered: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANTERN_API_KEY", "LANTERN_ADMIN_KEY"))}
    config = {"name": "ops", "deployments": [deployment("blue")], "traffic": {"blue": 100}}
    running = Server(config, tmp_path_factory.mktemp("ops"), env, workers=2).start()
    yield running
    running.stop()


@pytest.fixture(scope="package")
def keys(server: Server) -> dict[str, str]:
    return {kind: credential(server, kind) for kind in ("primary", "secondary", "admin")}


@pytest.fixture()
def admin(server: Server, keys: dict[str, str]) -> Iterator[Admin]:
    client = Admin(server, keys["admin"])
    client.reset()
    yield client
    client.reset()
