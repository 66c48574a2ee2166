"""The HTTP app of a worker (FastAPI, mounted on the BentoML service); its routes are in routes.py.

The app is made without its routes by `new_app`, which imports nothing heavy: BentoML's arbiter imports the service
module only to read the service's settings, and would otherwise import torch, MLflow and the rest of the runtime
(seconds) before it starts a worker, which imports them again. The worker adds the routes (routes.py `add_routes`)
when it makes the service, before it takes a request."""

from __future__ import annotations

import inspect

from fastapi import FastAPI

# BentoML's OpenTelemetry middleware already traces every request (its trace ids are in the access log); FastAPI's own
# telemetry (0.16x) would trace each one a second time, at a cost in CPU per request. Older FastAPI versions have no
# such option.
NO_TELEMETRY = ({"telemetry": {"tracing": False, "metrics": False, "logs": False}}
                if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


def new_app() -> FastAPI:
    """The endpoint's FastAPI app, with no routes yet."""
    return FastAPI(title="Lantern endpoint", version="1", docs_url="/docs", redoc_url=None, **NO_TELEMETRY,
                   description="Predictions and explanations from registered image models. Scoring routes take "
                               "`Authorization: Bearer <key>`; `x-lantern-deployment` (or "
                               "`azureml-model-deployment`) pins a deployment. The management routes under "
                               "`/manage` take the admin key.")


def build_app() -> FastAPI:
    """The endpoint's app with its routes (imports the runtime: torch, MLflow, ...)."""
    from serving.http.routes import add_routes

    app = new_app()
    add_routes(app)
    return app
