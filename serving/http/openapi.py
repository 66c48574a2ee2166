"""The OpenAPI document: the tables the routes declare (answers, headers, errors), BentoML's own routes beside
Lantern's, and the security each path takes."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from serving.http.content_coding import MIN_COMPRESSED_BYTES
from serving.http.paths import MANAGEMENT_PREFIX
from serving.http.readiness import Readiness

REQUEST_ID = {"x-request-id": {"description": "the request's trace id, as the server's log lines name it (trace=...)",
                                "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}}
ANSWERED_BY = {**REQUEST_ID,
               "x-lantern-deployment": {"description": "the deployment that answered", "schema": {"type": "string"}},
               "x-lantern-model-version": {"description": "its model version (models:/NAME/VERSION)",
                                           "schema": {"type": "string"}}}
IGNORED_PARAMETERS = "x-lantern-ignored-parameters"
SCORED_BY = {IGNORED_PARAMETERS: {
    "description": "parameters in a row's xai_parameters that the row's xai_algorithm does not take (another "
                   "algorithm's, such as xrai_fast with integrated_gradients): accepted and ignored, named here",
    "schema": {"type": "string"}}}
EXPLAINED_BY = {**ANSWERED_BY, "content-encoding": {
    "description": f"gzip when the JSON answer is over {MIN_COMPRESSED_BYTES // 1024} KiB and the request's "
                   "Accept-Encoding admits gzip (an explanation's attributions: megabytes as float lists)",
    "schema": {"type": "string", "enum": ["gzip"]}}}
ERRORS = {status: {"description": text, "headers": REQUEST_ID, "content": {"application/json": {"example": {
    "error": {"code": code, "message": "what was wrong and what is accepted"}}}}}
    for status, code, text in [
        (400, "bad_request", "malformed body, JSON or base64; a URL where image bytes belong"),
        (401, "unauthorized", "missing or wrong scoring key"),
        (404, "no_deployment", "no deployment to route to, or an unknown pinned deployment (`unknown_route`: no "
                               "such path)"),
        (405, "method_not_allowed", "a method the route does not take (the Allow header names those it does)"),
        (408, "request_timeout", "the request exceeded request_timeout_ms; its work was abandoned"),
        (413, "payload_too_large", "body or image (pixel count) over the limit"),
        (415, "unsupported_media_type", "not an image, or a content type the route does not take"),
        (422, "invalid_request", "a field or parameter out of range, unknown, or of the wrong type"),
        (424, "model_error", "the model failed on this input; the reason is in the message"),
        (429, "too_many_requests", "more requests in flight than the deployment allows"),
        (503, "not_ready", "the deployment is loading, unready or failed (`out_of_memory`: its device ran out of "
                           "memory for this request; retry it later)"),
    ]}


# The server's own routes (BentoML's, and /readyz as serving/http/readiness.py answers it), in the document /docs
# shows too; they take no key.
READINESS_SCHEMA = Readiness.model_json_schema(ref_template="#/components/schemas/{model}")
SERVER_ROUTES = {path: {"get": {"summary": summary, "description": description, "security": [], "responses": {
    "200": {"description": ok, "content": {media: schema}},
    **({"503": {"description": failing, "content": {media: schema}}} if failing else {})}}}
    for path, summary, description, ok, media, schema, failing in [
        ("/livez", "Liveness", "The worker process answers (a liveness probe).", "alive", "text/plain", {}, None),
        ("/readyz", "Readiness", "Ready when every deployment with live traffic (with no traffic set: every "
                                 "deployment) has loaded and warmed up, unless the worker drains (a readiness "
                                 "probe); the body says why, and whether the state database answers.", "ready",
         "application/json", {"schema": {"$ref": "#/components/schemas/Readiness"}},
         "a deployment that takes traffic is loading, unready or failed, or the worker drains"),
        ("/metrics", "Prometheus metrics", "BentoML's request metrics, and Lantern's per-deployment request counts, "
                                           "latencies, batch sizes and explanation timings.", "the metrics",
         "text/plain; version=0.0.4", {}, None),
    ]}


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """The app's document, made once: its routes, the two keys' security schemes, and BentoML's routes."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {
            "scoringKey": {"type": "http", "scheme": "bearer"}, "adminKey": {"type": "http", "scheme": "bearer"}}
        for path, operations in schema["paths"].items():
            for operation in operations.values():
                operation["security"] = [{"adminKey" if path.startswith(MANAGEMENT_PREFIX) else "scoringKey": []}]
        schema["paths"].update(SERVER_ROUTES)
        components = schema["components"].setdefault("schemas", {})
        components.update({**READINESS_SCHEMA.get("$defs", {}),
                           "Readiness": {k: v for k, v in READINESS_SCHEMA.items() if k != "$defs"}})
        app.openapi_schema = schema
    return app.openapi_schema
