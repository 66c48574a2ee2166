"""Shared fixtures: a temporary MLflow store and Lantern home per test, small checkpoints, shapes data."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from registry.small_cnn import SmallCNN
from support.common import LABELS, MINUTE_ITERATIONS, new_mlflow_store, own_store
from support.postgres import Postgres, postgres_server
from support.training import train_shapes_detector

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh SQLite MLflow store and Lantern home in a temp dir; returns the tracking URI."""
    home = tmp_path / "lantern-home"
    uri = new_mlflow_store(home)
    monkeypatch.setenv("LANTERN_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture(scope="module")
def module_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Like `store`, shared by the tests of one module (for read-only checks on registered versions)."""
    with own_store(tmp_path_factory.mktemp("module-store")) as uri:
        yield uri


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One throwaway PostgreSQL server for the session (support/postgres.py: skipped without one, required in CI)."""
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def small_model() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(len(LABELS)).eval()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory, small_model: SmallCNN) -> dict[str, Path]:
    """The same small CNN weights as a torch state dict and as safetensors, plus a labels file."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("checkpoints")
    state = small_model.state_dict()
    torch.save(state, folder / "small.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "small.safetensors"))
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return {"pt": folder / "small.pt", "safetensors": folder / "small.safetensors", "labels": folder / "labels.txt"}


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small multi-class shapes dataset on disk."""
    from training.shapes import ShapesConfig, write_shapes_dataset

    folder = tmp_path_factory.mktemp("shapes")
    write_shapes_dataset(folder, ShapesConfig(count=12, image_size=48, seed=3))
    return folder




@pytest.fixture(scope="session")
def trained_shapes(tmp_path_factory: pytest.TempPathFactory):
    """The small CNN trained for about a minute on 3000 shapes images at 64 px (shared by the tests that need a
    model that has learnt something: the accuracy test and the explanation quality tests)."""
    from training.loop import RunOptions, train

    session_dir = tmp_path_factory.mktemp("trained-shapes") / "session"
    config = {"data": "shapes:3000", "arch": "small_cnn", "image_size": 64, "batch_size": 64, "lr": 1e-2}
    return train(session_dir, config, RunOptions(iterations=MINUTE_ITERATIONS, checkpoint_interval=250,
                                                 report_interval=50, mlflow=False))


@pytest.fixture(scope="session")
def trained_detector(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session directory of the small detector trained 300 iterations on 160 instance-shapes images at 96 px
    (a checkpoint every 100), shared by the test that checks it learnt, the detector registration tests and the
    detection endpoint's tests."""
    return train_shapes_detector(tmp_path_factory.mktemp("trained-detector"), "object_detection", iterations=300,
                                 checkpoint_interval=100)


@pytest.fixture(scope="session")
def trained_segmenter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session directory of the small instance segmenter trained 60 iterations on the same images (shared by the
    registration and endpoint tests)."""
    return train_shapes_detector(tmp_path_factory.mktemp("trained-segmenter"), "instance_segmentation",
                                 iterations=60)
