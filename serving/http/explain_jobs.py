"""Explanation jobs over HTTP: `POST /explain/jobs` (one image or a batch; 202 with the job), `GET
/explain/jobs/{id}` (state and progress), `GET /explain/jobs/{id}/result` (as `/explain` answers; a batch as a zip,
JSON lines or one JSON document) and `DELETE /explain/jobs/{id}` (cancel). Every one takes a scoring key."""

from __future__ import annotations

import base64
import io
import logging
import time
import zipfile
from collections.abc import Awaitable, Callable

import orjson
from starlette.requests import Request
from starlette.responses import Response

from explain.encoding import encode_attributions
from explain.params import ExplainError, parse_params
from serving.control.jobs import ExplanationOptions, ImageResult, Job, NewImage
from serving.http.content_coding import compress_answer
from serving.http.errors import ANSWERED, ApiError, api_error, bad_request, unprocessable
from serving.http.explain import check_options
from serving.http.guard import Context, authenticate, endpoint_of, handle, parse_body, read_upload_fields
from serving.http.inputs import media_type
from serving.http.json_answer import json_response
from serving.http.negotiation import media_quality, prefers_png, qualities
from serving.http.query import query_explain_options
from serving.http.schemas import (
    ExplainJobRequest,
    ExplainJobResult,
    ExplainJobView,
    ExplainResponse,
    JobImageResult,
    JobLinks,
    JobProgress,
    NamedImage,
    TargetExplanation,
    parse_json_body,
)
from serving.runtime.endpoint import Endpoint
from serving.runtime.errors import InvalidExplanation
from serving.runtime.images import decode_base64_image
from serving.runtime.inference import not_explainable
from serving.runtime.metrics import metrics

logger = logging.getLogger("lantern.serving")
JOBS_PATH = "/explain/jobs"
JSON_LINES = ("application/x-ndjson", "application/jsonl")


def iso(seconds: float | None) -> str | None:
    return None if seconds is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def job_progress(job: Job) -> JobProgress:
    """How far a job is: in explanations once their total is known, else in images (a succeeded job: all of it)."""
    if job.state == "succeeded" or not job.total:
        fraction = 1.0
    elif job.labels_total:
        fraction = job.labels_done / job.labels_total
    else:
        fraction = job.images_done / job.total
    return JobProgress(images_done=job.images_done, images_total=job.total, labels_done=job.labels_done,
                       labels_total=job.labels_total, fraction=round(min(fraction, 1.0), 4))


def job_view(job: Job, lifetime_s: float) -> ExplainJobView:
    """What a poll answers."""
    queued = (job.started_at or time.time()) - job.created_at
    return ExplainJobView(
        id=job.id, state=job.state, batch=job.batch, deployment=job.deployment, model_version=job.model_version,
        method=job.options.method,
        progress=job_progress(job),
        created_at=iso(job.created_at), started_at=iso(job.started_at), finished_at=iso(job.finished_at),
        queued_seconds=round(max(queued, 0.0), 3),
        expires_at=iso(job.finished_at + lifetime_s) if job.finished_at is not None else None,
        attempts=job.attempts, error=job.error, images=job.images,
        links=JobLinks(status=f"{JOBS_PATH}/{job.id}", result=f"{JOBS_PATH}/{job.id}/result"))


# submitting ----------------------------------------------------------------------------------------------------------
async def submit_job(request: Request) -> Response:
    return await handle(request, JOBS_PATH, False, lambda endpoint, context: accept(endpoint, context, request))


async def job_request(endpoint: Endpoint, request: Request, body: bytes) -> tuple[ExplanationOptions,
                                                                                   list[NewImage], bool]:
    """The options, the images and whether they came as a batch: a JSON body, or a raw image or multipart files
    (`image`, or `images` for a batch) with the options in the query."""
    limit = endpoint.config.limits.max_images_per_job
    kind = media_type(request)
    if kind == "application/json":
        if request.query_params:
            raise unprocessable(f"with a JSON body, the options go in it, not in the query (got "
                                f"{', '.join(sorted(request.query_params))})", "invalid_query")
        parsed: ExplainJobRequest = await parse_body(
            endpoint, body, lambda: parse_json_body(body, ExplainJobRequest, "explanation job"))
        if parsed.images is not None and len(parsed.images) > limit:
            raise too_many_for_a_job(len(parsed.images), limit)
        items = [NamedImage(image_base64=parsed.image_base64)] if parsed.images is None else [
            item if isinstance(item, NamedImage) else NamedImage(image_base64=item) for item in parsed.images]

        def decoded() -> list[NewImage]:
            return [NewImage(name=item.name or f"image {i}", data=decode_base64_image(
                item.image_base64, "image_base64" if parsed.images is None else f"images[{i}]"))
                for i, item in enumerate(items)]

        images = await endpoint.inference.in_thread(decoded)
        options = ExplanationOptions.model_validate(parsed.model_dump(exclude={"image_base64", "images"}))
        return options, images, parsed.images is not None
    options = ExplanationOptions.model_validate(query_explain_options(request).model_dump(exclude={"image_base64"}))
    if kind == "multipart/form-data":
        files = await read_upload_fields(endpoint, request, body, ("image", "images"), limit)
        if not files:
            raise bad_request("the multipart body has no 'image' or 'images' file", "missing_image")
        batch = len(files) > 1 or any(field == "images" for field, _, _ in files)
        return options, [NewImage(name=name, data=data) for _, name, data in files], batch
    if not body:
        raise bad_request("send an image (raw bytes or a multipart 'image' file), a batch (multipart 'images' "
                          "files), or JSON with image_base64 or images", "missing_image")
    return options, [NewImage(name="image 0", data=body)], False


def too_many_for_a_job(count: int | None, limit: int) -> ApiError:
    came = f"{count} images in one job" if count is not None else "more images in one job than the limit"
    return ApiError(413, "too_many_images", f"{came}; the limit is {limit} (limits.max_images_per_job)")


async def accept(endpoint: Endpoint, context: Context, request: Request) -> Response:
    """Check the job as `/explain` checks a request (before any work), keep it, and answer 202."""
    options, images, batch = await job_request(endpoint, request, context.body)
    deployment = context.deployment
    model = deployment.require_model()
    if model.detects:
        raise api_error(not_explainable(deployment))
    check_options(deployment, options)
    try:
        parse_params(options.method, options.params)
    except ExplainError as error:
        raise api_error(InvalidExplanation(str(error))) from None
    limits = endpoint.config.limits
    job = await endpoint.inference.in_thread(
        endpoint.jobs.submit, deployment.name, deployment.model_version or deployment.config.model, options, images,
        batch, limits.max_queued_jobs)
    endpoint.job_runner.wake()
    metrics().jobs.labels(deployment.name, "queued").inc()
    answer = json_response(job_view(job, limits.job_result_seconds))
    answer.status_code = 202
    answer.headers["location"] = f"{JOBS_PATH}/{job.id}"
    return answer


# polling, fetching, cancelling ---------------------------------------------------------------------------------------
async def job_call(request: Request, path: str, work: Callable[[Endpoint, str], Awaitable[Response]]) -> Response:
    """The scoring key, then `work(endpoint, job id)`, with errors answered as every route answers them."""
    status = 500
    try:
        endpoint = endpoint_of(request)
        authenticate(endpoint, request.headers.get("authorization"))
        response = await work(endpoint, request.path_params["job_id"])
        status = response.status_code
        return response
    except (ApiError, *ANSWERED) as raised:
        error = api_error(raised)
        status = error.status
        return error.response()
    except Exception:
        logger.exception("unexpected error on %s", path)
        return ApiError(500, "internal_error", "an unexpected error occurred; see the server log").response()
    finally:
        metrics().requests.labels("", path, str(status)).inc()


async def job_status(request: Request) -> Response:
    async def work(endpoint: Endpoint, job_id: str) -> Response:
        lifetime = endpoint.config.limits.job_result_seconds
        job = await endpoint.inference.in_thread(endpoint.jobs.get, job_id, lifetime)
        return json_response(job_view(job, lifetime))

    return await job_call(request, f"{JOBS_PATH}/{{id}}", work)


async def cancel_job(request: Request) -> Response:
    async def work(endpoint: Endpoint, job_id: str) -> Response:
        lifetime = endpoint.config.limits.job_result_seconds
        job = await endpoint.inference.in_thread(endpoint.jobs.cancel, job_id, lifetime)
        metrics().jobs.labels(job.deployment, "cancelled").inc()
        return json_response(job_view(job, lifetime))

    return await job_call(request, f"{JOBS_PATH}/{{id}}", work)


async def job_result(request: Request) -> Response:
    async def work(endpoint: Endpoint, job_id: str) -> Response:
        lifetime = endpoint.config.limits.job_result_seconds
        job, results = await endpoint.inference.in_thread(endpoint.jobs.result, job_id, lifetime)
        accept = request.headers.get("accept")
        if not job.batch:
            return await endpoint.inference.in_thread(single_answer, job, results[0], accept,
                                                      request.headers.get("accept-encoding"))
        form = batch_form(accept)
        if form == "zip":
            return await endpoint.inference.in_thread(zip_answer, job, results)
        return await endpoint.inference.in_thread(json_answer, job, results, form == "lines",
                                                  request.headers.get("accept-encoding"))

    return await job_call(request, f"{JOBS_PATH}/{{id}}/result", work)


def batch_form(accept: str | None) -> str:
    """How a batch's result is answered: a zip (the default), JSON lines, or one JSON document, by `Accept`."""
    listed = qualities(accept)
    offers = {"zip": media_quality(listed, "application/zip", explicit_only=True),
              "lines": max(media_quality(listed, kind, explicit_only=True) for kind in JSON_LINES),
              "json": media_quality(listed, "application/json", explicit_only=True)}
    best = max(offers, key=lambda form: offers[form])
    return best if offers[best] > 0 else "zip"


def explanations(job: Job, image: ImageResult, files: bool = False) -> list[TargetExplanation]:
    """An image's explanations as `/explain` answers them (with the job's options), or, for a zip, naming the
    files that hold the PNGs and the arrays."""
    options = job.options
    items = []
    for output in image.outputs:
        if files:
            stem = f"{image.index:04d}-{output.label}"
            items.append(TargetExplanation(label=output.label, visualization=f"visualizations/{stem}.png",
                                           attributions=f"attributions/{stem}.npy"))
            continue
        items.append(TargetExplanation(
            label=output.label,
            visualization=base64_text(output.visualization) if options.visualizations else None,
            attributions=encode_attributions(output.array(), options.attributions_encoding)
            if options.attributions else None))
    return items


def base64_text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def single_answer(job: Job, image: ImageResult, accept: str | None, accept_encoding: str | None) -> Response:
    headers = {"x-lantern-deployment": job.deployment, "x-lantern-model-version": job.model_version}
    if prefers_png(accept):
        if not image.outputs:
            raise unprocessable("no label reached the threshold, so there is no visualisation", "nothing_to_explain")
        return Response(image.outputs[0].visualization, media_type="image/png",
                        headers={**headers, "x-lantern-explained-label": image.outputs[0].label})
    answer = compress_answer(json_response(ExplainResponse(
        deployment=job.deployment, model_version=job.model_version, method=job.options.method,
        explanations=explanations(job, image), fidelity=image.fidelity or {})), accept_encoding)
    answer.headers.update(headers)
    return answer


def image_result(job: Job, image: ImageResult, files: bool = False) -> JobImageResult:
    return JobImageResult(index=image.index, name=image.name, state=image.state, error=image.error,
                          explanations=explanations(job, image, files), fidelity=image.fidelity)


def json_answer(job: Job, results: list[ImageResult], lines: bool, accept_encoding: str | None) -> Response:
    if lines:
        body = b"".join(orjson.dumps(image_result(job, image).model_dump(exclude_none=True)) + b"\n"
                        for image in results)
        answer = Response(body, media_type="application/x-ndjson")
    else:
        answer = json_response(ExplainJobResult(job=job.id, deployment=job.deployment,
                                                model_version=job.model_version, method=job.options.method,
                                                results=[image_result(job, image) for image in results]))
    return compress_answer(answer, accept_encoding)


def zip_answer(job: Job, results: list[ImageResult]) -> Response:
    """`result.json` (every image's labels, fidelity and errors, naming the files) with each explanation's PNG under
    `visualizations/` and its attributions as a .npy file under `attributions/`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        document = ExplainJobResult(job=job.id, deployment=job.deployment, model_version=job.model_version,
                                    method=job.options.method,
                                    results=[image_result(job, image, files=True) for image in results])
        archive.writestr("result.json", orjson.dumps(document.model_dump(exclude_none=True),
                                                     option=orjson.OPT_INDENT_2), zipfile.ZIP_DEFLATED)
        for image in results:
            for output in image.outputs:
                stem = f"{image.index:04d}-{output.label}"
                archive.writestr(f"visualizations/{stem}.png", output.visualization, zipfile.ZIP_STORED)
                archive.writestr(f"attributions/{stem}.npy", output.attributions, zipfile.ZIP_DEFLATED)
    return Response(buffer.getvalue(), media_type="application/zip", headers={
        "content-disposition": f'attachment; filename="explanations-{job.id}.zip"',
        "x-lantern-deployment": job.deployment, "x-lantern-model-version": job.model_version})
