"""Draining at shutdown: SIGTERM first marks the worker as draining, and stops it (the handler it deferred) later."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.http.draining import CloseWhileDraining, Drain


@pytest.fixture()
def stops() -> Iterator[list[float]]:
    """A SIGTERM handler standing for the server's (uvicorn's stops it), recording when it ran; restored after."""
    ran: list[float] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: ran.append(time.monotonic()))
    yield ran
    signal.signal(signal.SIGTERM, previous)


def wait_for(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_sigterm_drains_first_and_stops_after_the_drain(stops: list[float]) -> None:
    drain = Drain(0.3)
    assert drain.install()
    sent = time.monotonic()
    os.kill(os.getpid(), signal.SIGTERM)
    assert wait_for(lambda: drain.draining)
    assert stops == []  # not stopped yet: draining
    os.kill(os.getpid(), signal.SIGTERM)  # the arbiter forwards the one the process group got: nothing more happens
    assert wait_for(lambda: len(stops) == 1)
    assert stops[0] - sent >= 0.3
    time.sleep(0.4)
    assert len(stops) == 1


def test_without_a_drain_sigterm_stops_at_once(stops: list[float]) -> None:
    drain = Drain(0)
    assert not drain.install()
    os.kill(os.getpid(), signal.SIGTERM)
    assert wait_for(lambda: len(stops) == 1)
    assert not drain.draining


def test_no_drain_is_installed_outside_the_main_thread(stops: list[float]) -> None:
    installed: list[bool] = []
    handler = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=lambda: installed.append(Drain(5).install()))
    thread.start()
    thread.join()
    assert installed == [False]
    assert signal.getsignal(signal.SIGTERM) is handler


def test_answers_close_their_connection_while_draining() -> None:
    drain = Drain(5)
    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("ok", headers={"connection": "keep-alive"}))])
    client = TestClient(CloseWhileDraining(app, drain=drain))
    assert client.get("/").headers["connection"] == "keep-alive"
    drain.draining = True
    answer = client.get("/")
    assert (answer.status_code, answer.text, answer.headers.get_list("connection")) == (200, "ok", ["close"])
