"""`/explain`: one image explained (JSON with attributions, visualisations and the fidelity report, or the PNG with
`Accept: image/png`); options in a JSON body, or in the query for a raw or multipart image."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from serving.control.jobs import ExplanationOptions
from serving.http.content_coding import compress_answer
from serving.http.errors import bad_request, unprocessable
from serving.http.guard import Context, handle, parse_body, read_uploads
from serving.http.inputs import media_type
from serving.http.json_answer import json_response
from serving.http.negotiation import prefers_png
from serving.http.query import query_explain_options
from serving.http.schemas import ExplainRequest, ExplainResponse, TargetExplanation, parse_json_body
from serving.runtime.deployment import Deployment
from serving.runtime.endpoint import Endpoint
from serving.runtime.images import EncodedImage


async def explain(request: Request) -> Response:
    return await handle(request, "/explain", True, lambda endpoint, context: explain_work(endpoint, context, request))


async def explain_request(endpoint: Endpoint, request: Request, body: bytes) -> tuple[ExplainRequest | None,
                                                                                        EncodedImage]:
    """The JSON body (its image as base64 text), or no options (they are in the query) and a raw or multipart
    image."""
    kind = media_type(request)
    if kind == "application/json":
        if request.query_params:  # they would be ignored without a word
            raise unprocessable(f"with a JSON body, the options go in it, not in the query (got "
                                f"{', '.join(sorted(request.query_params))})", "invalid_query")
        parsed = await parse_body(endpoint, body, lambda: parse_json_body(body, ExplainRequest, "explain"))
        return parsed, EncodedImage(parsed.image_base64, "image_base64")
    if kind == "multipart/form-data":
        files = await read_uploads(endpoint, request, body, "image", 1)
        if not files:
            raise bad_request("the multipart body has no 'image' file", "missing_image")
        return None, EncodedImage(files[0][1], "the image")
    if not body:
        raise bad_request("send an image: raw bytes, a multipart 'image' file, or JSON with image_base64",
                          "missing_image")
    return None, EncodedImage(body, "the image")


def check_options(deployment: Deployment, options: ExplanationOptions) -> None:
    """What the server refuses of an explanation's options before any work: a parameter it sets itself, and labels
    the deployment's version does not have."""
    if "internal_batch_size" in options.params:
        raise unprocessable("params: internal_batch_size is set by the server, not per request", "invalid_params")
    labels = deployment.require_model().bundle.labels
    unknown = [label for label in options.targets or [] if label not in labels]
    if unknown:
        raise unprocessable(f"unknown target label(s) {', '.join(unknown)}; {deployment.model_version} knows "
                            f"{', '.join(labels)}", "invalid_targets")


async def explain_work(endpoint: Endpoint, context: Context, request: Request) -> Response:
    parsed, image = await explain_request(endpoint, request, context.body)
    options = parsed or query_explain_options(request)
    deployment = context.deployment
    model = deployment.require_model()
    check_options(deployment, options)
    inference = endpoint.inference
    cropped = await inference.crop(context.instance, image)
    targets = [model.bundle.labels.index(label) for label in options.targets] if options.targets else None
    explanation = await inference.explain(context.instance, cropped, options.method, options.params, context.token,
                                          targets=targets)
    labels = [model.bundle.labels[t] for t in explanation.targets]
    if prefers_png(request.headers.get("accept")):
        if not labels:
            raise unprocessable("no label reached the threshold, so there is no visualisation", "nothing_to_explain")
        png = await inference.in_thread(explanation.visualization_png, 0)
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

    return await inference.in_thread(answer)
