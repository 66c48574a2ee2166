"""The routes of a worker's HTTP app: `/score`, `/predict`, `/explain` (score.py, predict.py, explain.py), explanation
jobs, the management API, the web page and the OpenAPI document."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response

from serving.http.errors import ApiError, method_not_allowed
from serving.http.explain import explain
from serving.http.explain_jobs import cancel_job, job_result, job_status, submit_job
from serving.http.guard import endpoint_of
from serving.http.manage_api import build_router
from serving.http.openapi import ANSWERED_BY, ERRORS, EXPLAINED_BY, SCORED_BY, openapi_document
from serving.http.page import POLICY, render_page
from serving.http.predict import predict
from serving.http.schemas import (
    DetectionScoreItem,
    ExplainJobRequest,
    ExplainJobResult,
    ExplainJobView,
    ExplainRequest,
    ExplainResponse,
    PredictResponse,
    ScoreItem,
    ScoreRequest,
    inline_schema,
)
from serving.http.score import score


def add_routes(app: FastAPI) -> None:
    """Every route of the endpoint, its error handler and its OpenAPI document, on `app` (from app.new_app)."""
    app.include_router(build_router())

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        """Routing errors (a method a route does not take) in Lantern's error format, not FastAPI's `detail`."""
        headers = dict(error.headers or {})
        allowed = next((value for name, value in headers.items() if name.lower() == "allow"), None)
        if error.status_code == 405 and allowed is not None:  # Starlette's 405 always names them
            others = {name: value for name, value in headers.items() if name.lower() != "allow"}
            return method_not_allowed(request.method, request.url.path, allowed, others).response()
        return ApiError(error.status_code, "http_error", str(error.detail), headers).response()

    @app.post("/score", responses={200: {"model": list[ScoreItem] | list[DetectionScoreItem],
                                         "headers": {**EXPLAINED_BY, **SCORED_BY}}, **ERRORS},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": inline_schema(ScoreRequest)}}}})
    async def score_route(request: Request) -> Response:
        """Score images in the cloud's format (SPEC.md section 3): one item per image, explanations on request (a
        classifier's; a detector answers boxes)."""
        return await score(request)

    @app.post("/predict", responses={200: {"model": PredictResponse, "headers": ANSWERED_BY}, **ERRORS},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
                  "image/*": {"schema": {"type": "string", "format": "binary"}}}},
                  "parameters": [{"name": "top_k", "in": "query",
                                  "schema": {"type": "integer", "default": 5, "minimum": 1}}]})
    async def predict_route(request: Request) -> Response:
        """Top-k labels with probabilities for one or more images (multipart field `images`, or a raw image body)."""
        return await predict(request)

    @app.post("/explain", responses={200: {"model": ExplainResponse, "headers": EXPLAINED_BY,
                                         "content": {"image/png": {}}}, **ERRORS},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": inline_schema(ExplainRequest)},
                  "image/*": {"schema": {"type": "string", "format": "binary"}},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "image": {"type": "string", "format": "binary"}}}}}}})
    async def explain_route(request: Request) -> Response:
        """Explain one image: JSON (attributions, base64 visualisation, fidelity report), or the PNG itself with
        `Accept: image/png`. With a raw or multipart image, options go in the query: `?method=xrai&n_steps=20`."""
        return await explain(request)

    job_id = {"job_id": "$response.body#/id"}
    job_links = {"status": {"operationId": "job_status", "parameters": job_id},
                 "result": {"operationId": "job_result", "parameters": job_id},
                 "cancel": {"operationId": "cancel_job", "parameters": job_id}}

    @app.post("/explain/jobs", status_code=202, operation_id="submit_job", responses={202: {
        "model": ExplainJobView, "links": job_links,
        "headers": {**ANSWERED_BY, "Location": {"description": "the job's URL", "schema": {"type": "string"}}}},
        **ERRORS},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": inline_schema(ExplainJobRequest)},
                  "image/*": {"schema": {"type": "string", "format": "binary"}},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "image": {"type": "string", "format": "binary"},
                      "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}}})
    async def submit_job_route(request: Request) -> Response:
        """Explain one image or a batch in the background: answers 202 at once with the job (its URL in
        `Location`); poll it, fetch its result, or cancel it. The deployment (pinned, or picked by the traffic split)
        and its model version are fixed now. Options as for `/explain`: in a JSON body (`image_base64`, or `images`
        for a batch), or in the query with a raw image or multipart `image` / `images` files."""
        return await submit_job(request)

    @app.get("/explain/jobs/{job_id}", operation_id="job_status", responses={200: {"model": ExplainJobView},
                                                                              **ERRORS})
    async def job_status_route(request: Request, job_id: str) -> Response:
        """A job's state, progress (images and labels done), times, deployment and version, and each image's
        error if it failed; 410 once its result expired (limits.job_result_seconds)."""
        return await job_status(request)

    results = {"model": ExplainResponse | ExplainJobResult,
               "content": {"image/png": {}, "application/zip": {}, "application/x-ndjson": {}}}

    @app.get("/explain/jobs/{job_id}/result", operation_id="job_result", responses={200: results, **ERRORS})
    async def job_result_route(request: Request, job_id: str) -> Response:
        """A succeeded job's result. One image: as `/explain` answers (JSON, or the PNG with `Accept: image/png`).
        A batch: a zip of `result.json` with each explanation's PNG and attributions (.npy), or JSON lines (one per
        image) with `Accept: application/x-ndjson`, or one JSON document with `Accept: application/json`. 409 while
        the job is queued or running."""
        return await job_result(request)

    @app.delete("/explain/jobs/{job_id}", operation_id="cancel_job", responses={200: {"model": ExplainJobView},
                                                                                 **ERRORS})
    async def cancel_job_route(request: Request, job_id: str) -> Response:
        """Cancel a queued or running job: its running explanation stops within one step of the method."""
        return await cancel_job(request)

    @app.get("/", include_in_schema=False)
    async def page(request: Request) -> Response:
        """The web page: an image in, its top labels and a heat map out (no key needed to load it)."""
        try:
            config = endpoint_of(request).config
        except ApiError as error:
            return error.response()
        return HTMLResponse(render_page(config), headers={
            "Content-Security-Policy": POLICY, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    @app.get("/docs.json", include_in_schema=False)
    async def document() -> Response:
        """The OpenAPI document, as at /openapi.json: BentoML's own at this path declared OpenAPI 3.0.2 around JSON
        Schema 2020-12 forms (pydantic's), which validators and client generators refuse; this one is 3.1."""
        return JSONResponse(app.openapi())

    def openapi() -> dict[str, Any]:
        return openapi_document(app)

    app.openapi = openapi  # type: ignore[method-assign]

