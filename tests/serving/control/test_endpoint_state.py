"""The persisted endpoint state and the rules every change is checked against, without a server."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from registry.errors import LanternError
from serving.config import DeploymentConfig, parse_endpoint_config
from serving.control.auth import KeySourceError, admin_key, regenerate_key, scoring_keys
from serving.control.control import _aggregate, merge_patch
from serving.control.state import DeploymentRecord, InvalidChange, StateStore
from serving.control.workers import InstanceStatus, StatusBoard, WorkerStatus


@pytest.fixture()
def keyless(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("LANTERN_API_KEY", "LANTERN_API_KEY_SECONDARY", "LANTERN_ADMIN_KEY"):
        monkeypatch.delenv(variable, raising=False)


def as_named(model: str) -> str:
    """The version a `models:/NAME/N` URI names: itself (these tests have no registry)."""
    return model


def shop(**overrides) -> dict:
    return {"name": "shop", "deployments": [{"name": "blue", "model": "models:/m/1"},
                                            {"name": "green", "model": "models:/m/2"}],
            "traffic": {"blue": 100}, **overrides}


def test_state_is_created_from_the_configuration_then_restored(keyless: None) -> None:
    store = StateStore("shop")
    state, restored = store.prepare(parse_endpoint_config(shop()), pin=as_named)
    assert not restored and state.revision == 1 and state.names == ["blue", "green"] and state.traffic == {"blue": 100}
    changed = store.change(lambda s: s.model_copy(update={"traffic": {"blue": 50, "green": 50}}), "half")
    assert changed.revision == 2 and changed.last_change == "half"
    again, restored = store.prepare(parse_endpoint_config(shop(traffic={"green": 100})), pin=as_named)
    assert restored and again.revision == 2 and again.traffic == {"blue": 50, "green": 50}
    reset, restored = store.prepare(parse_endpoint_config(shop(traffic={"green": 100})), pin=as_named, reset=True)
    assert not restored and reset.traffic == {"green": 100}


def test_state_keeps_key_digests_only(keyless: None) -> None:
    store = StateStore("shop")
    state, _ = store.prepare(parse_endpoint_config(shop()), pin=as_named)
    text = store.path.read_text()
    keys = scoring_keys("shop")
    for key in (keys.primary, keys.secondary, admin_key("shop").key):
        assert key not in text
    assert len({state.keys.primary, state.keys.secondary, state.keys.admin}) == 3
    new = regenerate_key("shop", "secondary")
    assert scoring_keys("shop").secondary == new and scoring_keys("shop").primary == keys.primary
    refreshed, _ = store.prepare(parse_endpoint_config(shop()), pin=as_named)
    assert refreshed.keys.secondary != state.keys.secondary and refreshed.keys.primary == state.keys.primary


def test_keys_from_the_environment_cannot_be_regenerated(keyless: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANTERN_ADMIN_KEY", "admin-from-env")
    assert admin_key("shop").key == "admin-from-env" and admin_key("shop").source == "environment"
    with pytest.raises(KeySourceError, match="LANTERN_ADMIN_KEY"):
        regenerate_key("shop", "admin")
    monkeypatch.setenv("LANTERN_API_KEY", "k1")
    with pytest.raises(KeySourceError, match="LANTERN_API_KEY"):
        regenerate_key("shop", "primary")


@pytest.mark.parametrize(("traffic", "mirror", "message"), [
    ({"blue": 90}, {}, "sum to 100"),
    ({"blue": 90, "green": 20}, {}, "sum to 100"),
    ({"blue": 100, "red": 0}, {}, "unknown deployment"),
    ({"blue": 101}, {}, "from 0 to 100"),
    ({"blue": 100}, {"green": 51}, "at most 50"),
    ({"blue": 100}, {"blue": 10}, "live or mirrored"),
    ({"blue": 100}, {"green": 10, "red": 10}, "unknown deployment"),
    ({"blue": 50, "green": 50}, {"green": 10}, "live or mirrored"),
])
def test_a_refused_change_leaves_the_state_untouched(keyless: None, traffic: dict, mirror: dict,
                                                     message: str) -> None:
    store = StateStore("shop")
    store.prepare(parse_endpoint_config(shop()), pin=as_named)
    before = store.path.read_text()
    with pytest.raises(InvalidChange, match=message):
        store.change(lambda s: s.model_copy(update={"traffic": traffic, "mirror_traffic": mirror}), "bad")
    assert store.path.read_text() == before


def test_a_failing_mutation_changes_nothing(keyless: None) -> None:
    store = StateStore("shop")
    store.prepare(parse_endpoint_config(shop()), pin=as_named)
    before = store.path.read_text()

    def mutate(state):
        state.deployments.append(DeploymentRecord(config=DeploymentConfig(name="red", model="models:/m/3")))
        raise LanternError("refused")

    with pytest.raises(LanternError, match="refused"):
        store.change(mutate, "x")
    assert store.path.read_text() == before
    assert json.loads(before)["revision"] == 1


def test_a_damaged_state_file_is_named(keyless: None) -> None:
    store = StateStore("shop")
    store.path.write_text("{not json")
    with pytest.raises(LanternError, match="damaged"):
        store.read()


def test_merge_patch() -> None:
    config = {"model": "models:/m/1", "settings": {"valid_crop_size": 32, "valid_resize_size": 40}}
    assert merge_patch(config, {"settings": {"valid_crop_size": 28}}) == {
        "model": "models:/m/1", "settings": {"valid_crop_size": 28, "valid_resize_size": 40}}
    assert merge_patch(config, {"settings": None}) == {"model": "models:/m/1"}


def test_aggregate_state_over_workers() -> None:
    record = DeploymentRecord(config=DeploymentConfig(name="blue", model="models:/m/1"), generation=2)
    ready = InstanceStatus(generation=2, state="ready")
    assert _aggregate(record, [ready, ready]) == ("ready", None)
    assert _aggregate(record, [ready, None])[0] == "loading"
    old = InstanceStatus(generation=1, state="ready", next_generation=2, next_state="loading")
    assert _aggregate(record, [ready, old])[0] == "updating"
    broken = InstanceStatus(generation=1, state="ready", next_generation=2, next_state="failed", next_reason="boom")
    state, reason = _aggregate(record, [ready, broken])
    assert state == "failed" and "boom" in reason and "still serves" in reason


def test_status_published_from_several_threads_at_once(tmp_path: Path) -> None:
    """A worker publishes from its state thread and from the request that changed the state: concurrent writes
    each land whole (this failed with FileNotFoundError when the threads shared one temporary file)."""
    board = StatusBoard(tmp_path)
    errors: list[BaseException] = []

    def publish(revision: int) -> None:
        status = WorkerStatus(worker="7", pid=os.getpid(), revision=revision, heartbeat=time.time(), deployments={})
        for _ in range(300):
            try:
                board.publish(status)
            except OSError as error:
                errors.append(error)

    threads = [threading.Thread(target=publish, args=(revision,)) for revision in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [status.revision in (1, 2, 3) for status in board.live()] == [True]
    assert sorted(path.name for path in board.folder.iterdir()) == ["7.json"]


def test_state_and_worker_statuses_are_readable_by_their_owner_only(keyless: None, tmp_path: Path) -> None:
    """The state holds the keys' digests and the statuses what every worker serves: 0600, like the keys file, also
    when an existing file is replaced."""
    store = StateStore("shop")
    store.prepare(parse_endpoint_config(shop()), pin=as_named)
    store.path.chmod(0o644)  # as earlier versions wrote it
    store.change(lambda s: s.model_copy(update={"traffic": {"blue": 50, "green": 50}}), "half")
    board = StatusBoard(tmp_path / "workers")
    board.publish(WorkerStatus(worker="7", pid=os.getpid(), revision=1, heartbeat=time.time(), deployments={}))
    for path in (store.path, board.folder / "7.json", store.folder / "credentials.json"):
        assert path.stat().st_mode & 0o777 == 0o600, path
