"""The HTTP API: `/score`, `/predict`, `/explain` (FastAPI, mounted on the BentoML service)."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from PIL import Image
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response

from explain.attribute import Explanation
from registry.errors import describe_validation_error
from serving.runtime.abandon import CancelToken
from serving.http.content_coding import MIN_COMPRESSED_BYTES, compress_answer
from serving.runtime.deployment import Deployment
from serving.runtime.endpoint import Endpoint, Route, endpoint_of
from serving.http.errors import ApiError, bad_request, method_not_allowed, timed_out, unprocessable, unsupported_media
from serving.http.inputs import decode, decode_base64_image, media_type, read_body, uploaded_images
from serving.http.json_answer import json_response
from serving.runtime.limits import CLIENT_CLOSED, ClientGone, Deadline, within_deadline
from serving.http.manage_api import PREFIX, build_router
from serving.runtime.metrics import metrics
from serving.http.negotiation import prefers_png
from serving.http.page import POLICY, render_page
from serving.http.schemas import (
    ExplainRequest,
    ExplainResponse,
    PredictItem,
    PredictQuery,
    PredictResponse,
    ScoreItem,
    ScoreRequest,
    ScoreRow,
    TargetExplanation,
    TopLabel,
    XaiParameters,
    inline_schema,
    parse_json_body,
    read_score_rows,
    refuse_deep_nesting,
)

logger = logging.getLogger("lantern.serving")
T = TypeVar("T")
# A JSON body over this is parsed in the work pool, where the worker goes on answering other requests meanwhile; a
# body under it is parsed where it is (milliseconds at worst): the thread hop would cost more than the parse.
INLINE_PARSE_BYTES = 128 << 10
# The same for a multipart body (python-multipart's parse grows with the image data).
INLINE_FORM_BYTES = 128 << 10
# BentoML's OpenTelemetry middleware already traces every request (its trace ids are in the access log); FastAPI's own
# telemetry (0.16x) would trace each one a second time, at a cost in CPU per request. Older FastAPI versions have no
# such option.
NO_TELEMETRY = ({"telemetry": {"tracing": False, "metrics": False, "logs": False}}
                if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})
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


# BentoML's own routes (outside our app), in the document /docs shows too; they take no key.
SERVER_ROUTES = {path: {"get": {"summary": summary, "description": description, "security": [], "responses": {
    "200": {"description": ok, "content": {media: {}}},
    **({"503": {"description": failing, "content": {"text/plain": {}}}} if failing else {})}}}
    for path, summary, description, ok, media, failing in [
        ("/livez", "Liveness", "The worker process answers (a liveness probe).", "alive", "text/plain", None),
        ("/readyz", "Readiness", "Ready when every deployment with live traffic (with no traffic set: every "
                                 "deployment) has loaded and warmed up (a readiness probe).", "ready", "text/plain",
         "a deployment that takes traffic is loading, unready or failed"),
        ("/metrics", "Prometheus metrics", "BentoML's request metrics, and Lantern's per-deployment request counts, "
                                           "latencies, batch sizes and explanation timings.", "the metrics",
         "text/plain; version=0.0.4", None),
    ]}


class Context:
    """One request's routed deployment instance (and mirror), its body (read, within the limits, by `handle`) and its
    cancellation token."""

    def __init__(self, route: Route, body: bytes) -> None:
        self.body = body
        self.instance = route.instance
        self.mirror = route.mirror
        self.deployment = route.instance.deployment
        self.token = CancelToken()

    def headers(self) -> dict[str, str]:
        return deployment_headers(self.deployment)


def deployment_headers(deployment: Deployment | None) -> dict[str, str]:
    if deployment is None:
        return {}
    return {"x-lantern-deployment": deployment.name, "x-lantern-model-version": deployment.model_version or ""}


async def handle(request: Request, path: str, explains: Callable[[Endpoint, bytes], Awaitable[bool]] | bool,
                 work: Callable[[Endpoint, Context], Awaitable[Response]]) -> Response:
    """Auth, routing, admission, deadline, metrics and error answers around a route's `work`; `explains` says
    (reading the body once it is in) whether the request takes an explanation slot rather than a prediction one.

    The request holds the deployment generation it was routed to until its answer is ready (an update retires the
    old one only then). Its deadline runs from routing: the body's upload (counted in flight by the deployment's
    admission, so slow uploaders are bounded too), the wait for a slot and the work all come out of it."""
    start = time.perf_counter()
    deployment: Deployment | None = None
    status = 500
    try:
        endpoint = endpoint_of(request)
        endpoint.authenticate(request.headers.get("authorization"))
        route = endpoint.route(request.headers)
        deployment = route.instance.deployment
        settings = deployment.config.request_settings
        deadline = Deadline(settings.request_timeout_ms / 1000)
        what = f"{path} on deployment {deployment.name}"
        with route.instance.serving():
            with route.instance.admission.counted():
                body = await read_body(request, endpoint.config.limits.max_body_bytes, deadline.remaining())
                context = Context(route, body)
                wants_explanation = await reading(explains(endpoint, body), deadline, what) if callable(explains) \
                    else explains
            admission = endpoint.explain_admission if wants_explanation else route.instance.admission
            async with admission.enter(settings.max_queue_wait_ms / 1000):
                response = await within_deadline(request, work(endpoint, context), deadline.remaining(),
                                                 context.token, what)
        response.headers.update(context.headers())
        status = response.status_code
        return response
    except ApiError as error:
        status = error.status
        if error.status == 408 and deployment is not None:
            metrics().abandoned.labels(deployment.name, path, "timeout").inc()
        return error.response(deployment_headers(deployment))
    except ClientGone:
        status = CLIENT_CLOSED
        if deployment is not None:
            metrics().abandoned.labels(deployment.name, path, "disconnect").inc()
        return Response(status_code=CLIENT_CLOSED)
    except Exception:
        logger.exception("unexpected error on %s", path)
        return ApiError(500, "internal_error", "an unexpected error occurred; see the server log").response(
            deployment_headers(deployment))
    finally:
        name = deployment.name if deployment else ""
        metrics().requests.labels(name, path, str(status)).inc()
        metrics().latency.labels(name, path).observe(time.perf_counter() - start)


async def reading(parse: Awaitable[T], deadline: Deadline, what: str) -> T:
    """`await parse` (a body's parse, in the work pool when it is large), or 408 once the deadline passes."""
    try:
        async with asyncio.timeout(deadline.remaining()):
            return await parse
    except TimeoutError:
        raise timed_out(f"{what}: the body was not read within request_timeout_ms "
                        f"({deadline.seconds * 1000:.0f} ms)") from None


async def parse_body(endpoint: Endpoint, body: bytes, parse: Callable[[], T],
                     inline_bytes: int = INLINE_PARSE_BYTES) -> T:
    """`parse()` of a body: in the work pool when the body is over `inline_bytes`, else where it is."""
    return await endpoint.in_thread(parse) if len(body) > inline_bytes else parse()


async def read_uploads(endpoint: Endpoint, request: Request, body: bytes, field: str,
                       max_files: int) -> list[tuple[str, bytes]]:
    """(filename, bytes) of the files in `field` of the request's multipart `body`."""
    parse = partial(uploaded_images, request.headers.get("content-type", ""), body, field, max_files)
    return await parse_body(endpoint, body, parse, INLINE_FORM_BYTES)


# /score -------------------------------------------------------------------------------------------------------------

async def score_rows(endpoint: Endpoint, context: Context, rows: list[ScoreRow]) -> list[ScoreItem]:
    deployment = context.deployment
    limits = endpoint.config.limits
    sources = [partial(decode_base64, row.image_base64, f"input_data.data[{i}]", limits.max_image_pixels)
               for i, row in enumerate(rows)]
    prepared = await endpoint.prepare(context.instance, sources)
    model = deployment.require_model()
    endpoint.mirror(context.mirror, sources, "/score")
    predictions = await endpoint.predict(context.instance, prepared,
                                         [row.confidence_score_threshold_multilabel for row in rows])
    multilabel = model.bundle.spec.task == "multilabel"
    items = []
    for row, cropped, prediction in zip(rows, prepared.crops, predictions):
        item = ScoreItem(probs=[float(p) for p in prediction.probs], labels=list(model.bundle.labels),
                         deployment=deployment.name, model_version=deployment.model_version or "")
        if row.wants_explanation:
            xai = row.xai_parameters
            explanation = await endpoint.explain(context.instance, cropped, xai.xai_algorithm, xai.method_params(),
                                                 context.token, targets=prediction.predicted,
                                                 threshold=row.confidence_score_threshold_multilabel)
            await endpoint.in_thread(add_explanation, item, explanation, xai, multilabel)
        items.append(item)
    return items


def decode_base64(text: str, where: str, max_pixels: int, shorter_side: int | None = None) -> Image.Image:
    """A row's image from its base64 text: both decodings in the work pool (megabytes of base64 take ms)."""
    return decode(decode_base64_image(text, where), where, max_pixels, shorter_side)


def add_explanation(item: ScoreItem, explanation: Explanation, xai: XaiParameters, multilabel: bool) -> None:
    """A row's visualisations and attributions as its `xai_parameters` ask, one per target for multi-label (PNG
    encoding and float lists: work for the work pool, not the event loop)."""
    count = len(explanation.targets)
    if xai.visualizations:
        maps = [explanation.visualization_base64(i) for i in range(count)]
        item.visualizations = maps if multilabel else (maps[0] if maps else None)
    if xai.attributions:
        arrays = [explanation.encoded_attributions(i, xai.attributions_encoding) for i in range(count)]
        item.attributions = arrays if multilabel else (arrays[0] if arrays else None)


# /explain -----------------------------------------------------------------------------------------------------------

async def explain_request(endpoint: Endpoint, request: Request, body: bytes) -> tuple[ExplainRequest | None, bytes]:
    """The JSON body, or (query parameters, image bytes) for a raw or multipart image."""
    kind = media_type(request)
    if kind == "application/json":
        if request.query_params:  # they would be ignored without a word
            raise unprocessable(f"with a JSON body, the options go in it, not in the query (got "
                                f"{', '.join(sorted(request.query_params))})", "invalid_query")

        def parse() -> tuple[ExplainRequest, bytes]:
            parsed = parse_json_body(body, ExplainRequest, "explain")
            return parsed, decode_base64_image(parsed.image_base64, "image_base64")

        return await parse_body(endpoint, body, parse)
    if kind == "multipart/form-data":
        files = await read_uploads(endpoint, request, body, "image", 1)
        if not files:
            raise bad_request("the multipart body has no 'image' file", "missing_image")
        return None, files[0][1]
    if not body:
        raise bad_request("send an image: raw bytes, a multipart 'image' file, or JSON with image_base64",
                          "missing_image")
    return None, body


def query_values(request: Request, repeatable: tuple[str, ...] = ()) -> dict[str, str]:
    """The query as one value per name. A name given twice is a 422 (the last would silently win), except the
    `repeatable` ones, whose values are joined with commas (`?targets=circle&targets=square`)."""
    values: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if name not in values:
            values[name] = value
        elif name in repeatable:
            values[name] += "," + value
        else:
            raise unprocessable(f"the query parameter {name} is given more than once", "invalid_query")
    return values


def query_explain_options(request: Request) -> ExplainRequest:
    """`?method=xrai&n_steps=20&targets=circle&attributions_encoding=float16` for raw and multipart images."""
    query = query_values(request, repeatable=("targets",))
    options: dict[str, Any] = {"image_base64": ""}
    for key in ("method", "visualizations", "attributions", "attributions_encoding"):
        if key in query:
            options[key] = query.pop(key)
    if "targets" in query:
        options["targets"] = [t for t in query.pop("targets").split(",") if t]
    params: dict[str, Any] = {}
    for key, value in query.items():
        refuse_deep_nesting(value, f"the query parameter {key}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    options["params"] = params
    try:
        return ExplainRequest.model_validate(options)
    except ValidationError as error:
        raise unprocessable(describe_validation_error(error, "explain query")) from None


async def explain_work(endpoint: Endpoint, context: Context, request: Request) -> Response:
    limits = endpoint.config.limits
    parsed, blob = await explain_request(endpoint, request, context.body)
    options = parsed or query_explain_options(request)
    if "internal_batch_size" in options.params:
        raise unprocessable("params: internal_batch_size is set by the server, not per request", "invalid_params")
    deployment = context.deployment
    model = deployment.require_model()
    unknown = [label for label in options.targets or [] if label not in model.bundle.labels]
    if unknown:
        raise unprocessable(f"unknown target label(s) {', '.join(unknown)}; {deployment.model_version} knows "
                            f"{', '.join(model.bundle.labels)}", "invalid_targets")
    cropped = await endpoint.in_thread(
        lambda: model.preprocess.crop(decode(blob, "the image", limits.max_image_pixels,  # off the event loop
                                             model.preprocess.resize_size)))
    targets = [model.bundle.labels.index(label) for label in options.targets] if options.targets else None
    explanation = await endpoint.explain(context.instance, cropped, options.method, options.params, context.token,
                                         targets=targets)
    labels = [model.bundle.labels[t] for t in explanation.targets]
    if prefers_png(request.headers.get("accept")):
        if not labels:
            raise unprocessable("no label reached the threshold, so there is no visualisation", "nothing_to_explain")
        png = await endpoint.in_thread(explanation.visualization_png, 0)
        return Response(png, media_type="image/png", headers={"x-lantern-explained-label": labels[0]})

    def answer() -> Response:  # PNGs, float lists, their JSON text and its gzip: hundreds of ms at 224 px
        items = [TargetExplanation(
            label=label,
            visualization=explanation.visualization_base64(i) if options.visualizations else None,
            attributions=explanation.encoded_attributions(i, options.attributions_encoding) if options.attributions
            else None) for i, label in enumerate(labels)]
        return compress_answer(json_response(ExplainResponse(
            deployment=deployment.name, model_version=deployment.model_version or "", method=options.method,
            explanations=items, fidelity=explanation.fidelity.model_dump())), request.headers.get("accept-encoding"))

    return await endpoint.in_thread(answer)


# /predict -----------------------------------------------------------------------------------------------------------

async def predict_work(endpoint: Endpoint, context: Context, request: Request) -> Response:
    try:
        top_k = PredictQuery.model_validate(query_values(request)).top_k
    except ValidationError as error:
        message = describe_validation_error(error, "predict query")
        raise unprocessable(message.replace("unknown setting", "unknown parameter (accepted: top_k)"),
                            "invalid_query") from None
    limits = endpoint.config.limits
    kind = media_type(request)
    body = context.body
    if kind == "multipart/form-data":
        named = await read_uploads(endpoint, request, body, "images", limits.max_images_per_request)
        if not named:
            raise bad_request("the multipart body has no 'images' files", "missing_images")
    elif kind in ("application/json", "application/x-www-form-urlencoded", "text/plain"):
        raise unsupported_media(f"/predict takes images as multipart files (field 'images') or a raw image body, "
                                f"not {kind}; /score takes JSON")
    else:
        if not body:
            raise bad_request("send an image: a raw body or multipart files in the field 'images'", "missing_image")
        named = [("body", body)]
    sources = [partial(decode, data, name, limits.max_image_pixels) for name, data in named]
    prepared = await endpoint.prepare(context.instance, sources)
    deployment = context.deployment
    labels = deployment.require_model().bundle.labels
    endpoint.mirror(context.mirror, sources, "/predict")
    predictions = await endpoint.predict(context.instance, prepared)
    items = []
    for prediction in predictions:
        order = sorted(range(len(labels)), key=lambda i: -prediction.probs[i])[:top_k]
        items.append(PredictItem(predicted=[labels[i] for i in prediction.predicted],
                                 top_k=[TopLabel(label=labels[i], probability=float(prediction.probs[i]))
                                        for i in order]))
    return json_response(PredictResponse(deployment=deployment.name, model_version=deployment.model_version or "",
                                         predictions=items))


# the app ------------------------------------------------------------------------------------------------------------

def build_app() -> FastAPI:
    app = FastAPI(title="Lantern endpoint", version="1", docs_url="/docs", redoc_url=None, **NO_TELEMETRY,
                  description="Predictions and explanations from registered image models. Scoring routes take "
                              "`Authorization: Bearer <key>`; `x-lantern-deployment` (or "
                              "`azureml-model-deployment`) pins a deployment. The management routes under "
                              "`/manage` take the admin key.")
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

    @app.post("/score", responses={200: {"model": list[ScoreItem], "headers": {**EXPLAINED_BY, **SCORED_BY}},
                                   **ERRORS},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": inline_schema(ScoreRequest)}}}})
    async def score(request: Request) -> Response:
        """Score images in the cloud's format (SPEC.md section 3): one item per image, explanations on request."""
        rows: list[ScoreRow] = []

        async def wants_explanation(endpoint: Endpoint, body: bytes) -> bool:
            nonlocal rows
            if media_type(request) not in ("application/json", ""):
                raise unsupported_media(f"/score takes application/json, not {media_type(request)}")
            rows = await parse_body(endpoint, body, partial(
                read_score_rows, body, endpoint.config.limits.max_images_per_request))
            return any(row.wants_explanation for row in rows)

        async def work(endpoint: Endpoint, context: Context) -> Response:
            items = await score_rows(endpoint, context, rows)
            if any(row.wants_explanation for row in rows):  # megabytes of JSON with attributions: off the event loop
                accepted = request.headers.get("accept-encoding")
                response = await endpoint.in_thread(lambda: compress_answer(json_response(items), accepted))
            else:
                response = json_response(items)
            ignored = sorted({name for row in rows for name in row.xai_parameters.ignored})
            if ignored:
                response.headers[IGNORED_PARAMETERS] = ", ".join(ignored)
            return response

        return await handle(request, "/score", wants_explanation, work)

    @app.post("/predict", responses={200: {"model": PredictResponse, "headers": ANSWERED_BY}, **ERRORS},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "images": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
                  "image/*": {"schema": {"type": "string", "format": "binary"}}}},
                  "parameters": [{"name": "top_k", "in": "query",
                                  "schema": {"type": "integer", "default": 5, "minimum": 1}}]})
    async def predict(request: Request) -> Response:
        """Top-k labels with probabilities for one or more images (multipart field `images`, or a raw image body)."""
        return await handle(request, "/predict", False, lambda e, c: predict_work(e, c, request))

    @app.post("/explain", responses={200: {"model": ExplainResponse, "headers": EXPLAINED_BY,
                                         "content": {"image/png": {}}}, **ERRORS},
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": inline_schema(ExplainRequest)},
                  "image/*": {"schema": {"type": "string", "format": "binary"}},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "image": {"type": "string", "format": "binary"}}}}}}})
    async def explain(request: Request) -> Response:
        """Explain one image: JSON (attributions, base64 visualisation, fidelity report), or the PNG itself with
        `Accept: image/png`. With a raw or multipart image, options go in the query: `?method=xrai&n_steps=20`."""
        return await handle(request, "/explain", True, lambda e, c: explain_work(e, c, request))

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
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "scoringKey": {"type": "http", "scheme": "bearer"}, "adminKey": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    operation["security"] = [{"adminKey" if path.startswith(PREFIX) else "scoringKey": []}]
            schema["paths"].update(SERVER_ROUTES)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app

