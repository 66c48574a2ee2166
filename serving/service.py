"""The BentoML service: one instance per worker process, serving the endpoint configured by `endpoint.yaml`.

Start it with `lantern serve endpoint.yaml`, or `bentoml serve` (from a checkout or a built bento) with
`--arg config=PATH`, `--arg workers=N`, `--arg drain_seconds=S` and `--arg ssl_certfile=PEM --arg ssl_keyfile=PEM`;
without them it reads `$LANTERN_ENDPOINT_CONFIG`, else `endpoint.yaml` in the working directory, stops at once on
SIGTERM and serves plain HTTP."""

from __future__ import annotations

import logging
import os
from typing import Any

import bentoml
from pydantic import BaseModel, Field

from serving.config import CONFIG_ENV, MAX_REQUEST_TIMEOUT_MS, WORKERS_ENV, EndpointConfig, load_endpoint_config
from serving.control.auth import endpoint_dir
from serving.http.app import new_app
from serving.http.cors import LanternCors
from serving.http.draining import MAX_DRAIN_SECONDS, CloseWhileDraining, Drain
from serving.http.header_limit import bound_request_heads
from serving.http.readiness import ReadinessAnswer
from serving.http.request_ids import RequestIds
from serving.http.request_timer import cancel_request_timers
from serving.http.trace_spans import drop_message_spans
from serving.http.unrouted import UnroutedRequests
from serving.runtime.metrics_folder import use_own_metrics_folder

logger = logging.getLogger("lantern.serving")
logger.setLevel(logging.INFO)  # lifecycle lines (loaded, ready, serving generation N, retired) beside the access log


class ServeArguments(BaseModel):
    """`bentoml serve ... --arg config=endpoint.yaml --arg workers=2 --arg drain_seconds=10`."""

    config: str = os.environ.get(CONFIG_ENV, "endpoint.yaml")
    workers: int = int(os.environ.get(WORKERS_ENV, "1"))
    drain_seconds: float = Field(0, ge=0, le=MAX_DRAIN_SECONDS)
    ssl_certfile: str | None = None  # HTTPS with this certificate chain and key (PEM); `lantern serve` checks them
    ssl_keyfile: str | None = None

    def tls(self) -> dict[str, Any]:
        """BentoML's `ssl` service setting (uvicorn's TLS) when a certificate is given."""
        if not self.ssl_certfile:
            return {}
        key = {"keyfile": self.ssl_keyfile} if self.ssl_keyfile else {}  # else the certificate file holds it
        return {"ssl": {"enabled": True, "certfile": self.ssl_certfile, **key}}


cancel_request_timers()  # before BentoML builds the app around ours
bound_request_heads()  # before BentoML's worker configures uvicorn
drop_message_spans()
arguments = bentoml.use_arguments(ServeArguments)
os.environ[WORKERS_ENV] = str(arguments.workers)  # ONNX Runtime shares the cores among the workers
endpoint_config: EndpointConfig = load_endpoint_config(arguments.config)
use_own_metrics_folder(endpoint_dir(endpoint_config.name))  # in the serving process, before BentoML prepares it
app = new_app()  # routes added in the worker (serving/http/app.py says why)
drain = Drain(arguments.drain_seconds)


@bentoml.service(
    name="lantern",
    workers=arguments.workers,
    traffic={"timeout": MAX_REQUEST_TIMEOUT_MS / 1000 + 30},  # deployments added later may take the longest
    **arguments.tls(),
)
@bentoml.asgi_app(app, path="/")
class Lantern:
    """Serves the deployments of one endpoint: predictions through adaptive batching, explanations on the side."""

    def __init__(self) -> None:
        from serving.http.routes import add_routes  # the runtime: torch, MLflow, ... (in workers only)
        from serving.runtime.endpoint import Endpoint

        add_routes(app)
        self.endpoint = Endpoint(endpoint_config)
        app.state.endpoint = self.endpoint
        self.endpoint.start()
        drain.install()  # BentoML makes the instance in the worker's main thread, after uvicorn took SIGTERM

    @bentoml.on_startup
    async def run_explanation_jobs(self) -> None:
        """Explanation jobs run on the worker's event loop, which exists from here on."""
        self.endpoint.start_jobs()

    def __is_ready__(self) -> bool:
        return not drain.draining and self.endpoint.is_ready()

    @bentoml.on_shutdown
    def shutdown(self) -> None:
        self.endpoint.stop()


if endpoint_config.cors is not None:  # outermost of ours: UnroutedRequests would answer a preflight's OPTIONS with 405
    Lantern.add_asgi_middleware(LanternCors, cors=endpoint_config.cors)
Lantern.add_asgi_middleware(CloseWhileDraining, drain=drain)
Lantern.add_asgi_middleware(ReadinessAnswer, endpoint_of=lambda: getattr(app.state, "endpoint", None), drain=drain)
Lantern.add_asgi_middleware(RequestIds)  # x-request-id: the trace id of the access log's line
Lantern.add_asgi_middleware(UnroutedRequests)  # JSON 404/405 for paths and methods no route serves
