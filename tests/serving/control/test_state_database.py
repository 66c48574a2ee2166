"""The endpoint state in its database, on the embedded SQLite file and on a real PostgreSQL server: changes made at
once by several processes (none lost), the move of an earlier state.json, where keys come from, the workers' rows,
and a database that stops answering."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from serving.config import parse_endpoint_config
from serving.control.auth import credentials_path
from serving.control.errors import ChangeConflict, StateUnavailable
from serving.control.state import DeploymentRecord, StateStore, legacy_state_path
from serving.control.workers import StatusBoard, WorkerStatus, host_id
from support.postgres import Postgres

WRITERS, CHANGES_EACH = 3, 8


def shop(**overrides) -> dict:
    return {"name": "shop", "deployments": [{"name": "blue", "model": "models:/m/1"}], "traffic": {"blue": 100},
            **overrides}


def as_named(model: str) -> str:
    return model


@pytest.fixture(params=["sqlite", "postgresql"])
def state_uri(request: pytest.FixtureRequest, store: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh state database of each kind (the embedded file of this test's Lantern home, or a new PostgreSQL
    database), with no keys in the environment."""
    for variable in ("LANTERN_API_KEY", "LANTERN_API_KEY_SECONDARY", "LANTERN_ADMIN_KEY"):
        monkeypatch.delenv(variable, raising=False)
    if request.param == "sqlite":
        return f"sqlite:///{Path(os.environ['LANTERN_HOME']) / 'state.db'}"
    server: Postgres = request.getfixturevalue("postgres")
    return server.database("state")


def _add_deployments(uri: str, home: str, writer: int, done: multiprocessing.Queue) -> None:
    """One process's changes: CHANGES_EACH deployments added, each sent again while others keep winning (as a client
    answered 409 would)."""
    os.environ["LANTERN_HOME"] = home
    store = StateStore("shop", uri)
    conflicts = 0
    for change in range(CHANGES_EACH):
        name = f"w{writer}-{change}"

        def add(state, name=name):  # noqa: ANN001, ANN202
            state.deployments.append(DeploymentRecord.model_validate(
                {"config": {"name": name, "model": "models:/m/1"}}))
            state.traffic[name] = 0
            return state

        while True:
            try:
                store.change(add, f"added {name}")
                break
            except ChangeConflict:
                conflicts += 1
    done.put(conflicts)


def test_changes_made_at_once_by_several_processes_are_all_kept(state_uri: str) -> None:
    store = StateStore("shop", state_uri)
    store.prepare(parse_endpoint_config(shop()), pin=as_named)
    context = multiprocessing.get_context("spawn")
    done = context.Queue()
    writers = [context.Process(target=_add_deployments, args=(state_uri, os.environ["LANTERN_HOME"], w, done))
               for w in range(WRITERS)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(120)
        assert writer.exitcode == 0
    state = store.read()
    expected = {f"w{w}-{c}" for w in range(WRITERS) for c in range(CHANGES_EACH)}
    assert set(state.names) == expected | {"blue"}
    assert state.revision == 1 + WRITERS * CHANGES_EACH == store.stamp()
    assert state.traffic == {"blue": 100} | {name: 0 for name in expected}


def test_an_earlier_state_file_is_moved_into_the_database_once(state_uri: str) -> None:
    store = StateStore("shop", state_uri)
    made, _ = store.prepare(parse_endpoint_config(shop()), pin=as_named)
    legacy = made.model_copy(update={"endpoint": "old", "revision": 7, "last_change": "traffic set to blue=100"})
    path = legacy_state_path("old")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(legacy.model_dump(mode="json")))
    old = StateStore("old", state_uri)
    restored, was_restored = old.prepare(parse_endpoint_config(shop(name="old", traffic={})), pin=as_named)
    assert was_restored and restored.revision >= 7 and restored.traffic == {"blue": 100}
    assert not path.exists() and path.with_name("state.json.migrated").exists()
    assert old.stamp() == restored.revision
    again, _ = old.prepare(parse_endpoint_config(shop(name="old")), pin=as_named)
    assert again.revision == restored.revision


def test_a_reset_continues_the_revisions(state_uri: str) -> None:
    """Workers follow the revision: a state made again from endpoint.yaml must not go back to revision 1."""
    store = StateStore("shop", state_uri)
    store.prepare(parse_endpoint_config(shop()), pin=as_named)
    store.change(lambda s: s, "nothing")
    reset, restored = store.prepare(parse_endpoint_config(shop()), pin=as_named, reset=True)
    assert not restored and reset.revision == 3 == store.stamp()


def test_keys_in_a_shared_state(state_uri: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keys given through the environment replace the state's when they change there; a host joining a shared
    state with a keys file of its own does not replace the state's keys (the embedded state follows its file)."""
    monkeypatch.setenv("LANTERN_API_KEY", "first")
    monkeypatch.setenv("LANTERN_ADMIN_KEY", "admin")
    store = StateStore("shop", state_uri)
    made, _ = store.prepare(parse_endpoint_config(shop()), pin=as_named)
    monkeypatch.setenv("LANTERN_API_KEY", "second")  # the Secret changed, then the hosts restarted
    changed, _ = store.prepare(parse_endpoint_config(shop()), pin=as_named)
    assert changed.keys.primary != made.keys.primary and changed.keys.admin == made.keys.admin
    assert changed.revision == made.revision + 1
    same, _ = store.prepare(parse_endpoint_config(shop()), pin=as_named)
    assert same == changed  # nothing changed in the environment: nothing to write
    monkeypatch.delenv("LANTERN_API_KEY")
    monkeypatch.delenv("LANTERN_ADMIN_KEY")
    monkeypatch.setenv("LANTERN_HOME", str(tmp_path / "another-host"))
    joined, _ = StateStore("shop", state_uri).prepare(parse_endpoint_config(shop()), pin=as_named)
    assert credentials_path("shop").exists()  # that host's own keys, generated
    embedded = state_uri == f"sqlite:///{tmp_path / 'another-host' / 'state.db'}"
    assert not embedded and joined.keys == changed.keys


def test_worker_rows_of_ended_or_silent_workers_are_left_out(state_uri: str) -> None:
    board = StatusBoard(StateStore("shop", state_uri).engine, "shop")
    ended = multiprocessing.get_context("spawn").Process(target=time.sleep, args=(0,))
    ended.start()
    ended.join()
    now = time.time()
    here = host_id()
    for worker, host, pid, heartbeat in (("a", here, os.getpid(), now), ("b", here, ended.pid, now),
                                         ("c", "elsewhere", ended.pid, now), ("d", "elsewhere", 1, now - 30)):
        board.publish(WorkerStatus(worker=f"{host}/{worker}", host=host, pid=pid, revision=1, heartbeat=heartbeat,
                                   deployments={}))
    assert [w.worker for w in board.live()] == ["elsewhere/c", f"{here}/a"]  # another host's pids are not ours


def test_a_database_that_stops_answering(postgres: Postgres, store: str) -> None:
    """PostgreSQL stopped: reads and changes raise StateUnavailable naming the database (the server answers 503 and
    keeps serving its last state); started again: the same store works on."""
    if postgres.folder is None:
        pytest.skip("the PostgreSQL server was given by URL: not ours to stop")
    uri = postgres.database("down")
    state_store = StateStore("shop", uri)
    state_store.prepare(parse_endpoint_config(shop()), pin=as_named)
    postgres.stop()
    try:
        for attempt in (state_store.stamp, state_store.read, lambda: state_store.change(lambda s: s, "x")):
            with pytest.raises(StateUnavailable, match=f"127.0.0.1:{postgres.port}.* does not answer"):
                attempt()
    finally:
        postgres.start()
    assert state_store.change(lambda s: s, "after").revision == 2


def test_tables_of_an_earlier_lantern_get_the_columns_added_since(state_uri: str) -> None:
    """A database made before a column was added (here the jobs' label totals) gets it when first opened, and a job
    kept in it reads as before."""
    from sqlalchemy import create_engine, insert, text

    from serving.control.database import explain_job_images, explain_jobs, metadata, state_engine
    from serving.control.jobs import ExplanationOptions, JobStore, NewImage

    earlier = create_engine(state_uri)
    metadata.create_all(earlier)
    with earlier.begin() as connection:
        connection.execute(text("ALTER TABLE lantern_explain_job DROP COLUMN labels_total"))
        connection.execute(text("ALTER TABLE lantern_explain_job_image DROP COLUMN targets"))
        values = {column.name: None for column in explain_jobs.columns if column.name != "labels_total"}
        values.update(id="kept", endpoint="shop", state="queued", deployment="blue", model_version="models:/m/1",
                      options=ExplanationOptions().model_dump_json(), total=1, batch=False, images_done=0,
                      labels_done=0, created_at=time.time(), attempts=0)
        connection.execute(insert(explain_jobs).values(values))
        connection.execute(insert(explain_job_images).values(job="kept", position=0, name="a.png", image=b"x",
                                                             state="pending"))
    earlier.dispose()

    state_engine(state_uri)
    jobs = JobStore("shop", state_uri)
    kept = jobs.get("kept")
    assert (kept.state, kept.labels_total, kept.images[0].targets) == ("queued", None, None)
    named = jobs.submit("blue", "models:/m/1", ExplanationOptions(targets=["a"]), [NewImage(name="b.png", data=b"y")],
                        False, max_queued=5)
    assert (named.labels_total, named.images[0].targets) == (1, ["a"])
