"""The persisted endpoint state and the rules every change is checked against, without a server."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import update

from registry.errors import LanternError
from serving.config import DeploymentConfig, parse_endpoint_config
from serving.control.auth import admin_key, key_digest, regenerate_key, scoring_keys
from serving.control.control import _aggregate, merge_patch
from serving.control.database import _ENGINES, endpoint_states
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
    stored = (Path(os.environ["LANTERN_HOME"]) / "state.db").read_bytes()
    keys = scoring_keys("shop")
    for key in (keys.primary, keys.secondary, admin_key("shop").key):
        assert key.encode() not in stored
    assert len({state.keys.primary, state.keys.secondary, state.keys.admin}) == 3
    new, _ = regenerate_key("shop", "secondary")  # the embedded state follows this host's keys file at the next start
    assert scoring_keys("shop").secondary == new and scoring_keys("shop").primary == keys.primary
    refreshed, _ = store.prepare(parse_endpoint_config(shop()), pin=as_named)
    assert refreshed.keys.secondary != state.keys.secondary and refreshed.keys.primary == state.keys.primary
    assert refreshed.revision == state.revision + 1 and "keys" in refreshed.last_change  # other workers follow it


def test_a_key_from_the_environment_is_regenerated_into_the_state_only(keyless: None,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Regenerated where the environment gives the keys (a Secret shared by every host): the new key is not written
    to a keys file, and its digest, once in the state, stays there across restarts until the environment's key
    changes."""
    monkeypatch.setenv("LANTERN_ADMIN_KEY", "admin-from-env")
    assert admin_key("shop").key == "admin-from-env" and admin_key("shop").source == "environment"
    store = StateStore("shop")
    store.prepare(parse_endpoint_config(shop()), pin=as_named)
    key, stored_in = regenerate_key("shop", "admin")
    assert stored_in is None and key != "admin-from-env" and admin_key("shop").key == "admin-from-env"
    store.change(lambda s: s.model_copy(update={"keys": s.keys.model_copy(update={"admin": key_digest(key)})}), "new")
    restarted, _ = store.prepare(parse_endpoint_config(shop()), pin=as_named)
    assert restarted.keys.admin == key_digest(key)
    monkeypatch.setenv("LANTERN_ADMIN_KEY", "admin-changed-in-the-secret")
    changed, _ = store.prepare(parse_endpoint_config(shop()), pin=as_named)
    assert changed.keys.admin == key_digest("admin-changed-in-the-secret")


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
    before = store.read()
    with pytest.raises(InvalidChange, match=message):
        store.change(lambda s: s.model_copy(update={"traffic": traffic, "mirror_traffic": mirror}), "bad")
    assert store.read() == before and store.stamp() == 1


def test_a_failing_mutation_changes_nothing(keyless: None) -> None:
    store = StateStore("shop")
    store.prepare(parse_endpoint_config(shop()), pin=as_named)
    before = store.read()

    def mutate(state):
        state.deployments.append(DeploymentRecord(config=DeploymentConfig(name="red", model="models:/m/3")))
        raise LanternError("refused")

    with pytest.raises(LanternError, match="refused"):
        store.change(mutate, "x")
    assert store.read() == before and before.revision == 1


def test_a_damaged_state_is_named(keyless: None) -> None:
    store = StateStore("shop")
    store.prepare(parse_endpoint_config(shop()), pin=as_named)
    with store.engine.begin() as connection:
        connection.execute(update(endpoint_states).values(document="{not json"))
    with pytest.raises(LanternError, match=r"damaged.*--reset-state"):
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
    board = StatusBoard(StateStore("shop").engine, "shop")
    errors: list[BaseException] = []

    def publish(revision: int) -> None:
        status = WorkerStatus(worker="h/7", host="h", pid=os.getpid(), revision=revision, heartbeat=time.time(),
                              deployments={})
        for _ in range(100):
            try:
                board.publish(status)
            except Exception as error:  # noqa: BLE001 - any failure fails the test
                errors.append(error)

    threads = [threading.Thread(target=publish, args=(revision,)) for revision in (1, 2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [status.revision in (1, 2, 3) for status in board.live()] == [True]


def test_state_database_and_keys_are_readable_by_their_owner_only(keyless: None) -> None:
    """The state database holds the keys' digests and what every worker serves: 0600 (its WAL files too), like the
    keys file, also when an existing file was made 0644."""
    store = StateStore("shop")
    store.prepare(parse_endpoint_config(shop()), pin=as_named)
    database = Path(os.environ["LANTERN_HOME"]) / "state.db"
    database.chmod(0o644)
    _ENGINES.clear()  # as a new process opens it
    store = StateStore("shop")
    store.change(lambda s: s.model_copy(update={"traffic": {"blue": 50, "green": 50}}), "half")
    StatusBoard(store.engine, "shop").publish(WorkerStatus(worker="h/7", host="h", pid=os.getpid(), revision=1,
                                                           heartbeat=time.time(), deployments={}))
    with store.engine.connect():  # its WAL files exist while a connection is open
        files = [database, *database.parent.glob("state.db-*"), store.folder / "credentials.json"]
        assert len(files) == 4, files
        for path in files:
            assert path.stat().st_mode & 0o777 == 0o600, path
