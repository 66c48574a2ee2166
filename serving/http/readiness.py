"""`/readyz` with its reasons. BentoML's probe answers an empty 200 or a bare 503; Lantern answers the same status with
a JSON body saying why: the state of each deployment in this worker, whether it drains, the revision it serves, and
whether it reaches the state database (a replica serves on while the database is down: still ready, saying so)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson
from pydantic import BaseModel, Field
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.http.draining import Drain

if TYPE_CHECKING:
    from serving.runtime.endpoint import Endpoint

PATH = "/readyz"


class StateDatabaseProbe(BaseModel):
    reachable: bool = Field(description="following the endpoint state works (false: serving goes on with the "
                                        "revision applied last; changes are refused with 503 until it answers)")
    problem: str | None = None


class Readiness(BaseModel):
    """Ready when every deployment with live traffic (with no traffic set: every deployment) is ready, unless the
    worker drains."""

    ready: bool
    draining: bool
    revision: int | None = Field(None, description="the endpoint state's revision this worker serves")
    deployments: dict[str, str] = Field(default_factory=dict,
                                        description="each deployment's state in this worker (ready, loading, ...)")
    state_database: StateDatabaseProbe


def readiness(endpoint: Endpoint | None, drain: Drain) -> Readiness:
    if endpoint is None:  # the worker is still starting
        return Readiness(ready=False, draining=drain.draining,
                         state_database=StateDatabaseProbe(reachable=False, problem="the worker is starting"))
    return Readiness(
        ready=not drain.draining and endpoint.is_ready(), draining=drain.draining, revision=endpoint.state.revision,
        deployments={name: instance.deployment.state for name, instance in endpoint.instances.items()},
        state_database=StateDatabaseProbe(reachable=endpoint.state_problem is None, problem=endpoint.state_problem))


class ReadinessAnswer:
    """ASGI middleware: GET and HEAD `/readyz` answered with `Readiness` as JSON, 200 when ready, else 503."""

    def __init__(self, app: ASGIApp, endpoint_of: Callable[[], Endpoint | None], drain: Drain) -> None:
        self.app = app
        self.endpoint_of = endpoint_of
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] not in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        answer = readiness(self.endpoint_of(), self.drain)
        body = orjson.dumps(answer.model_dump(mode="json"))
        await send({"type": "http.response.start", "status": 200 if answer.ready else 503,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
