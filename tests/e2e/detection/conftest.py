"""One real endpoint serving a small detector and a small instance segmenter trained on shapes (the session's
`trained_detector` and `trained_segmenter`), with deployments that differ in backend and settings; shared by every
test of this folder."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from support.common import LABELS, SMALL_SETTINGS, own_store
from support.operations import Admin, credential, deployment
from support.servers import Server

# the detectors work on 96 px images; `small` and `tiled` shrink a 288 px image to 96 px, `tiled` also runs each
# of its 3 x 3 tiles at 96 px (about the size the objects of a 96 px image have)
SMALL = {"min_size": 96, "max_size": 96}
TILED = {**SMALL, "tile_grid_size": "(3, 3)", "tile_overlap_ratio": 0.2}


@pytest.fixture(scope="package")
def registered(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path], trained_detector: Path,
               trained_segmenter: Path) -> Iterator[str]:
    """`boxes` 1 (a detector), `boxes` 2 (its weights with a higher score threshold), `segments` 1 (a segmenter),
    and `mc` 1 (a classifier)."""
    from registry.register import register_checkpoint, register_session_checkpoint, register_settings_update

    folder = tmp_path_factory.mktemp("detectors")
    with own_store(folder / "registry") as uri:
        register_session_checkpoint("boxes", trained_detector)
        register_settings_update("boxes", 1, {"box_score_thresh": 0.6})
        register_session_checkpoint("segments", trained_segmenter, settings_overrides={
            "box_score_thresh": 0.05, "max_number_of_polygon_points": 12, "export_as_image": True,
            "image_type": "PNG"})
        register_checkpoint("mc", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
        yield uri


@pytest.fixture(scope="package")
def server(registered: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANTERN_API_KEY", "LANTERN_ADMIN_KEY"))}
    config = {"name": "ops", "deployments": [
        deployment("blue", "models:/boxes/1"),
        deployment("torchy", "models:/boxes/1", backend="torch"),
        deployment("strict", "models:/boxes/1", settings={"box_score_thresh": 0.5, "box_detections_per_img": 2}),
        deployment("small", "models:/boxes/1", settings=SMALL),
        deployment("tiled", "models:/boxes/1", settings=TILED),
        deployment("segments", "models:/segments/1"),
    ], "traffic": {"blue": 100}}
    running = Server(config, tmp_path_factory.mktemp("ops"), env).start()
    running.wait_for_deployments()  # the tests pin each
    yield running
    running.stop()


@pytest.fixture(scope="package")
def keys(server: Server) -> dict[str, str]:
    return {kind: credential(server, kind) for kind in ("primary", "admin")}


@pytest.fixture()
def admin(server: Server, keys: dict[str, str]) -> Iterator[Admin]:
    client = Admin(server, keys["admin"])
    yield client
    view = client.endpoint()
    if view["traffic"].get("blue") != 100:
        client.traffic(blue=100)
    for name in {d["name"] for d in view["deployments"]} - {"blue", "torchy", "strict", "small", "tiled", "segments"}:
        client.remove(name)


@pytest.fixture(scope="package")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("images")
