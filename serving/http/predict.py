"""`/predict`: top-k labels with probabilities (a detector: its boxes) for one or more images (multipart field
`images`, or a raw body)."""

from __future__ import annotations

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from registry.errors import describe_validation_error
from serving.http.errors import bad_request, unprocessable, unsupported_media
from serving.http.guard import Context, handle, read_uploads
from serving.http.inputs import media_type
from serving.http.json_answer import json_response
from serving.http.query import query_values
from serving.http.schemas import PredictItem, PredictQuery, PredictResponse, TopLabel
from serving.runtime.endpoint import Endpoint
from serving.runtime.images import EncodedImage


async def predict(request: Request) -> Response:
    return await handle(request, "/predict", False, lambda endpoint, context: predict_work(endpoint, context, request))


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
    images = [EncodedImage(data, name) for name, data in named]
    inference = endpoint.inference
    prepared = await inference.prepare(context.instance, images)
    deployment = context.deployment
    model = deployment.require_model()
    labels = model.bundle.labels
    inference.mirror(context.mirror, images, "/predict")
    if model.detects:
        return json_response(PredictResponse(deployment=deployment.name, model_version=deployment.model_version or "",
                                             predictions=await inference.detect(context.instance, prepared)))
    predictions = await inference.predict(context.instance, prepared)
    items = []
    for prediction in predictions:
        order = sorted(range(len(labels)), key=lambda i: -prediction.probs[i])[:top_k]
        items.append(PredictItem(predicted=[labels[i] for i in prediction.predicted],
                                 top_k=[TopLabel(label=labels[i], probability=float(prediction.probs[i]))
                                        for i in order]))
    return json_response(PredictResponse(deployment=deployment.name, model_version=deployment.model_version or "",
                                         predictions=items))
