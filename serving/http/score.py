"""`/score`: the cloud's JSON body (SPEC.md section 3), one item per image, explanations on request."""

from __future__ import annotations

from functools import partial

from starlette.requests import Request
from starlette.responses import Response

from explain.attribute import Explanation
from serving.http.content_coding import compress_answer
from serving.http.errors import unsupported_media
from serving.http.guard import Context, handle, parse_body
from serving.http.inputs import media_type
from serving.http.json_answer import json_response
from serving.http.openapi import IGNORED_PARAMETERS
from serving.http.schemas import DetectionScoreItem, ScoreItem, ScoreRow, XaiParameters, read_score_rows
from serving.runtime.endpoint import Endpoint
from serving.runtime.images import EncodedImage
from serving.runtime.inference import not_explainable


async def score(request: Request) -> Response:
    """Score the images of a `/score` body."""
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
            response = await endpoint.inference.in_thread(lambda: compress_answer(json_response(items), accepted))
        else:
            response = json_response(items)
        ignored = sorted({name for row in rows for name in row.xai_parameters.ignored})
        if ignored:
            response.headers[IGNORED_PARAMETERS] = ", ".join(ignored)
        return response

    return await handle(request, "/score", wants_explanation, work)


async def score_rows(endpoint: Endpoint, context: Context,
                     rows: list[ScoreRow]) -> list[ScoreItem] | list[DetectionScoreItem]:
    deployment = context.deployment
    inference = endpoint.inference
    model = deployment.require_model()
    if model.detects and any(row.wants_explanation for row in rows):
        raise not_explainable(deployment)
    images = [EncodedImage(row.image_base64, f"input_data.data[{i}]") for i, row in enumerate(rows)]
    prepared = await inference.prepare(context.instance, images)
    inference.mirror(context.mirror, images, "/score")
    version = deployment.model_version or ""
    if model.detects:
        answers = await inference.detect(context.instance, prepared)
        return [DetectionScoreItem(boxes=answer.boxes, deployment=deployment.name, model_version=version)
                for answer in answers]
    predictions = await inference.predict(context.instance, prepared,
                                          [row.confidence_score_threshold_multilabel for row in rows])
    multilabel = model.bundle.spec.task == "multilabel"
    items = []
    for row, cropped, prediction in zip(rows, prepared.crops, predictions):
        item = ScoreItem(probs=[float(p) for p in prediction.probs], labels=list(model.bundle.labels),
                         deployment=deployment.name, model_version=deployment.model_version or "")
        if row.wants_explanation:
            xai = row.xai_parameters
            explanation = await inference.explain(context.instance, cropped, xai.xai_algorithm, xai.method_params(),
                                                  context.token, targets=prediction.predicted,
                                                  threshold=row.confidence_score_threshold_multilabel)
            await inference.in_thread(add_explanation, item, explanation, xai, multilabel)
        items.append(item)
    return items


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
