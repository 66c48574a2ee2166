"""One real endpoint for the web page's tests, driven in headless Chromium: `blue` (models:/mc/1), `green`
(models:/mc/2: the same weights, so its explanations equal blue's) and `other` (other weights), blue taking the
traffic; and the browser."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from registry.small_cnn import SmallCNN
from support.browser import chromium
from support.common import LABELS, SMALL_SETTINGS, own_store
from support.operations import deployment
from support.servers import Server

SCORING_KEY, ADMIN_KEY = "page-scoring-key", "page-admin-key"


@pytest.fixture(scope="package")
def browser() -> Iterator[object]:
    with chromium() as running:
        yield running


@pytest.fixture(scope="package")
def server(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path],
           browser: object) -> Iterator[Server]:
    from safetensors.torch import save_file

    from registry.register import register_checkpoint

    folder = tmp_path_factory.mktemp("page")
    torch.manual_seed(7)
    other = folder / "other.safetensors"
    save_file(SmallCNN(len(LABELS)).state_dict(), str(other))
    with own_store(folder / "registry"):
        for _ in range(2):
            register_checkpoint("mc", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
        register_checkpoint("other", other, "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
        config = {"name": "page", "deployments": [deployment("blue"), deployment("green", "models:/mc/2"),
                                                  deployment("other", "models:/other/1")],
                  "traffic": {"blue": 100}}
        env = {**os.environ, "LANTERN_API_KEY": SCORING_KEY, "LANTERN_ADMIN_KEY": ADMIN_KEY}
        running = Server(config, tmp_path_factory.mktemp("page-endpoint"), env).start()
        running.wait_for_deployments()  # the page compares them
        yield running
        running.stop()


@pytest.fixture(scope="package")
def keys() -> dict[str, str]:
    """The endpoint's scoring and admin keys (given in the environment)."""
    return {"scoring": SCORING_KEY, "admin": ADMIN_KEY}
