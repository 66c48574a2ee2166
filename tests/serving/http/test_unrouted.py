"""UnroutedRequests remembers routed requests; what it answers must not change with what it has seen before."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from serving.http.unrouted import UnroutedRequests


async def ok(_: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def test_answers_stay_the_same_once_routed_requests_are_remembered() -> None:
    app = Starlette(routes=[Route("/score", ok, methods=["POST"])], middleware=[Middleware(UnroutedRequests)])
    client = TestClient(app)
    for _ in range(3):  # the first round matches the routes; later rounds find /score remembered
        assert client.post("/score").text == "ok"
        wrong_method = client.get("/score")
        assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
        unknown = client.post("/scores")
        assert unknown.status_code == 404 and "did you mean /score?" in unknown.json()["error"]["message"]


def test_the_memory_of_routed_requests_is_bounded() -> None:
    seen: list[str] = []

    async def anything(request: Request) -> PlainTextResponse:
        seen.append(request.url.path)
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/files/{name}", anything)], middleware=[Middleware(UnroutedRequests)])
    client = TestClient(app)
    for i in range(UnroutedRequests.ROUTED_CACHE_SIZE + 20):  # endless distinct paths, all routed
        assert client.get(f"/files/{i}").text == "ok"
    assert len(seen) == UnroutedRequests.ROUTED_CACHE_SIZE + 20
    middleware = app.middleware_stack
    while not isinstance(middleware, UnroutedRequests):
        middleware = middleware.app
    assert len(middleware._routed) == UnroutedRequests.ROUTED_CACHE_SIZE
