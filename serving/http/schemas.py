"""Request and response bodies of the HTTP API (SPEC.md sections 3-4), as pydantic models."""

from __future__ import annotations

import json
import re
from typing import Any, NoReturn

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from explain.encoding import AttributionEncoding
from explain.params import ExplainError, Method, inapplicable_params, parse_params
from registry.detection_answers import DetectedObject, DetectionAnswer
from serving.config import Strict, describe_fields
from serving.control.jobs import MAX_PARAMETERS, ExplanationOptions, ImageError, JobImage
from serving.http.errors import bad_request, too_many_images, unprocessable

# Sizes no valid request reaches: a body's lists and objects are refused past them before their items are validated
# (pydantic builds an error per item, and 350 000 bad `targets` took a second to describe in a 17 MB message).
MAX_ROWS = 4096  # limits.max_images_per_request's highest value
MAX_COLUMNS = 16
MAX_JSON_MEMBERS = 1024  # names in one JSON object


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`model`'s JSON schema with every definition written in place (no `$ref`), for a request body declared by hand:
    BentoML's /docs.json keeps only the components FastAPI finds on the routes, so a reference would dangle there."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref", "")
            if reference.startswith("#/$defs/"):
                rest = {key: resolve(value) for key, value in node.items() if key != "$ref"}
                return {**resolve(definitions[reference.removeprefix("#/$defs/")]), **rest}
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


class XaiParameters(BaseModel):
    """`xai_parameters` of a scoring row: the algorithm, what to return, and the algorithm's own parameters."""

    model_config = ConfigDict(extra="allow")

    xai_algorithm: Method = "xrai"
    visualizations: bool = True
    attributions: bool = False
    attributions_encoding: AttributionEncoding = Field(
        "float32", description="float32 or float16 nested lists, or npy_base64 (a base64 .npy file)")

    @property
    def ignored(self) -> list[str]:
        """Parameters of other algorithms than this one's, left out of `method_params` (the cloud's own client sends
        one dict for every algorithm and changes only `xai_algorithm`)."""
        return inapplicable_params(self.xai_algorithm, self.model_extra or {})

    def method_params(self, where: str = "xai_parameters") -> dict[str, Any]:
        """The algorithm's own parameters (n_steps, xrai_fast, approximation_method...), validated by `explain`;
        an error names `where` they came from (the row of a batch). Those of other algorithms are left out
        (`ignored`); a name no algorithm takes is an error."""
        ignored = set(self.ignored)
        extra = {name: value for name, value in (self.model_extra or {}).items() if name not in ignored}
        if "internal_batch_size" in extra:  # the server sizes path batches to its memory; a client may not
            raise unprocessable(f"{where}: internal_batch_size is set by the server, not per request",
                                "invalid_xai_parameters")
        try:
            return parse_params(self.xai_algorithm, extra).model_dump(exclude_unset=True)
        except ExplainError as error:
            raise unprocessable(f"{where}: {error}", "invalid_xai_parameters") from None


class ScoreRow(Strict):
    """One `data` item of a scoring request when it is a JSON object (the cloud's format)."""

    image_base64: str = Field(description="the image bytes, base64-encoded (newlines allowed)")
    model_explainability: bool = False
    xai_parameters: XaiParameters = Field(default_factory=XaiParameters)
    confidence_score_threshold_multilabel: float | None = Field(None, ge=0, le=1)

    @property
    def wants_explanation(self) -> bool:
        """Explainability asked for, with something of it to return (an explanation nobody sees is not computed)."""
        return self.model_explainability and (self.xai_parameters.visualizations or self.xai_parameters.attributions)


def _describe_rows(schema: dict[str, Any]) -> None:
    """Say in the schema what a `data` string holds: a ScoreRow as JSON text (OpenAPI 3.1 `contentSchema`)."""
    for branch in schema.get("items", {}).get("anyOf", []):
        if branch.get("type") == "string":
            branch.update(contentMediaType="application/json", contentSchema=inline_schema(ScoreRow),
                          description="a ScoreRow as JSON text (or the image's base64 bytes alone)")


class InputData(Strict):
    columns: list[str] = Field(default_factory=lambda: ["image"], max_length=MAX_COLUMNS,
                               description="'image', and optionally the other fields of a row as their own columns: "
                                           "model_explainability, xai_parameters, "
                                           "confidence_score_threshold_multilabel")
    index: list[Any] | None = Field(None, max_length=MAX_ROWS)
    data: list[str | list[Any]] = Field(description="one item per image: a JSON string of a ScoreRow, or base64 bytes",
                                        max_length=MAX_ROWS, json_schema_extra=_describe_rows)


class ScoreRequest(Strict):
    """`POST /score`: `{"input_data": {"columns": ["image"], "data": [...]}}`."""

    input_data: InputData
    params: dict[str, Any] | None = Field(None, max_length=MAX_PARAMETERS,
                                          description="accepted for MLflow scoring compatibility when empty: "
                                                      "/score takes no inference parameters")


class ScoreItem(BaseModel):
    """One image's answer: multi-class gives one visualisation/attribution, multi-label a list per predicted label."""

    probs: list[float]
    labels: list[str]
    visualizations: str | list[str] | None = None
    attributions: Any = None
    deployment: str
    model_version: str


class DetectionScoreItem(BaseModel):
    """One image's answer from a detector: its detections (normalised boxes, label, score; polygons for instance
    segmentation), highest score first."""

    boxes: list[DetectedObject]
    deployment: str
    model_version: str


class PredictQuery(Strict):
    """The query of `POST /predict`: `?top_k=3` (an unknown or misspelt parameter is an error, not ignored)."""

    top_k: int = Field(5, ge=1, description="how many labels to answer per image, most probable first")


class TopLabel(BaseModel):
    label: str
    probability: float


class PredictItem(BaseModel):
    predicted: list[str] = Field(description="the predicted class; every label over the threshold for multi-label")
    top_k: list[TopLabel]


class PredictResponse(BaseModel):
    """`POST /predict`: one item per image, in the order sent."""

    deployment: str
    model_version: str
    predictions: list[PredictItem] | list[DetectionAnswer] = Field(
        description="a classifier's top labels, or a detector's boxes, per image")


class ExplainRequest(ExplanationOptions):
    """`POST /explain` as JSON; the same fields are accepted as query parameters with a raw or multipart image."""

    image_base64: str


class TargetExplanation(BaseModel):
    label: str
    visualization: str | None = None
    attributions: Any = None


class ExplainResponse(BaseModel):
    deployment: str
    model_version: str
    method: str
    explanations: list[TargetExplanation]
    fidelity: dict[str, Any]


class NamedImage(Strict):
    """One image of a JSON batch, with the name its result is shown under."""

    image_base64: str
    name: str | None = Field(None, max_length=200)


class ExplainJobRequest(ExplanationOptions):
    """`POST /explain/jobs` as JSON: one image (`image_base64`) or a batch (`images`: base64 texts, or objects with
    `image_base64` and `name`), and the explanation every image gets."""

    image_base64: str | None = None
    images: list[str | NamedImage] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_form(self) -> ExplainJobRequest:
        if (self.image_base64 is None) == (self.images is None):
            raise ValueError("give either image_base64 (one image) or images (a batch)")
        return self


class JobProgress(BaseModel):
    images_done: int = Field(description="images explained or failed")
    images_total: int
    labels_done: int = Field(description="explanations made (one per explained label)")
    labels_total: int | None = Field(description=(
        "explanations the job makes in all: known at once when labels were named, else once the job has started and "
        "predicted its images (a multi-label image is explained once per predicted label); absent until then"))
    fraction: float = Field(description=(
        "labels_done / labels_total once that is known (explanations are the work), else images_done / images_total"))


class JobLinks(BaseModel):
    status: str
    result: str


class ExplainJobView(BaseModel):
    """An explanation job as `GET /explain/jobs/{id}` shows it."""

    id: str
    state: str = Field(description="queued, running, succeeded, failed or cancelled")
    batch: bool
    deployment: str
    model_version: str
    method: str
    progress: JobProgress
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    queued_seconds: float = Field(description="time from being accepted to being started (so far, while queued)")
    expires_at: str | None = Field(None, description="when a finished job's result is removed (then 410)")
    attempts: int = Field(description="times a worker started it (a second one after its first worker died)")
    error: str | None = None
    images: list[JobImage]
    links: JobLinks


class JobImageResult(BaseModel):
    """One image of a batch's result: its explanations as `/explain` answers them, or why it has none."""

    index: int
    name: str
    state: str
    error: ImageError | None = None
    explanations: list[TargetExplanation] = Field(default_factory=list)
    fidelity: dict[str, Any] | None = None


class ExplainJobResult(BaseModel):
    """A batch's result as one JSON document (or, in a zip, with files' names in place of the PNGs and arrays)."""

    job: str
    deployment: str
    model_version: str
    method: str
    results: list[JobImageResult]


# Lantern's bodies nest a few levels; Python's parser gives up somewhere past a thousand (its limit differs between
# versions: 3.11 raised RecursionError at 3000 levels where 3.12 parsed them), so the limit is ours and explicit.
MAX_JSON_DEPTH = 64
# Lantern's bodies hold a few arrays and objects per row, and at most max_images_per_request (4096) rows: a body of
# hundreds of thousands of `[]` (linear to parse, but each one a Python object) is refused before it is parsed.
MAX_JSON_CONTAINERS = 20_000
# One match per bracket outside strings: the text before it (runs of other characters and whole strings) is consumed
# by the regex engine, possessively, so nothing is scanned twice and Python sees the brackets only. A string left open
# runs to the end (its closing quote is optional), and the end of the text ends the last match.
_BRACKETS = {str: re.compile(r'(?:[^"\[\]{}]++|"[^"\\]*+(?:\\.[^"\\]*+)*+"?)*+([\[\]{}]|\Z)'),
             bytes: re.compile(rb'(?:[^"\[\]{}]++|"[^"\\]*+(?:\\.[^"\\]*+)*+"?)*+([\[\]{}]|\Z)')}


def opening_brackets(text: str | bytes) -> int:
    """How many `[` and `{` `text` holds, in strings too (a count in C: cheap on megabytes)."""
    return text.count("[" if isinstance(text, str) else b"[") + text.count("{" if isinstance(text, str) else b"{")


def nests_too_deeply(text: str | bytes, limit: int = MAX_JSON_DEPTH, openings: int | None = None) -> bool:
    """Whether `text` opens more than `limit` arrays or objects inside each other (brackets in strings do not count;
    only texts with more than `limit` opening brackets, `openings` when the caller counted them, are scanned), in time
    linear in its length."""
    if (opening_brackets(text) if openings is None else openings) <= limit:
        return False
    opening = ("[", "{") if isinstance(text, str) else (b"[", b"{")
    depth = 0
    for match in _BRACKETS[type(text)].finditer(text):
        bracket = match.group(1)
        if bracket in opening:
            depth += 1
            if depth > limit:
                return True
        elif bracket:
            depth -= 1
    return False


def refuse_deep_nesting(text: str | bytes, what: str) -> None:
    """A 400 naming `what` when `text` nests more than MAX_JSON_DEPTH levels, or holds more than MAX_JSON_CONTAINERS
    opening brackets (in strings too: counting is what makes this check cheap), before any parsing."""
    openings = opening_brackets(text)
    if openings > MAX_JSON_CONTAINERS:
        raise bad_request(f"{what} holds more than {MAX_JSON_CONTAINERS} arrays or objects", "invalid_json")
    if nests_too_deeply(text, openings=openings):
        raise bad_request(f"{what} nests its arrays or objects too deeply (more than {MAX_JSON_DEPTH} levels)",
                          "invalid_json")


def not_a_json_number(constant: str) -> NoReturn:
    """Python's json module reads NaN and Infinity; JSON (RFC 8259) has neither, and a field's range check would then
    refuse them in puzzling words ("should be less than or equal to 1")."""
    raise ValueError(f"{constant} is not a JSON number (JSON has no NaN or Infinity)")


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose names are unique: with a name given twice, Python keeps the last value without a word (and a
    proxy that checked the first would let through what the server then reads differently)."""
    if len(pairs) > MAX_JSON_MEMBERS:
        raise ValueError(f"an object holds {len(pairs)} names, more than {MAX_JSON_MEMBERS}")
    values: dict[str, Any] = {}
    for name, value in pairs:
        if name in values:
            raise ValueError(f"the name {name!r} is given twice in one object")
        values[name] = value
    return values


def refuse_other_encodings(body: bytes, what: str) -> None:
    """A 400 naming the encoding of a JSON body that is not UTF-8: RFC 8259 has JSON exchanged between systems in
    UTF-8, where Python's parser also reads UTF-16 and UTF-32 (a byte order mark before UTF-8 is tolerated, as the
    RFC allows)."""
    encoding = json.detect_encoding(body)
    if encoding not in ("utf-8", "utf-8-sig"):
        raise bad_request(f"{what} is {encoding.upper()}-encoded; send JSON in UTF-8", "invalid_json")


def load_json(text: str | bytes, what: str) -> Any:
    """Parsed JSON, or a 400 naming `what` was malformed (also when it nests more than MAX_JSON_DEPTH levels, holds
    NaN or Infinity, names a member twice in one object, or is bytes in another encoding than UTF-8)."""
    if isinstance(text, bytes):
        refuse_other_encodings(text, what)
    refuse_deep_nesting(text, what)
    try:
        return json.loads(text, parse_constant=not_a_json_number, object_pairs_hook=unique_keys)
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad_request(f"{what} is not valid JSON: {error}", "invalid_json") from None


def load_json_body(body: bytes, what: str) -> Any:
    """The JSON of a request body; 400 for a missing or malformed one."""
    if not body:
        raise bad_request(f"the {what} body is empty; send JSON", "empty_body")
    return load_json(body, f"the {what} body")


def parse_json_body(body: bytes, schema: type[BaseModel] | Any, what: str) -> Any:
    """`body` validated by a pydantic model (or TypeAdapter); 400 for missing or malformed JSON, 422 naming each
    invalid field."""
    return validate_body(load_json_body(body, what), schema, what)


def validate_body(values: Any, schema: type[BaseModel] | Any, what: str) -> Any:
    """A request body's parsed JSON validated by a pydantic model (or TypeAdapter); 422 naming each invalid field."""
    try:
        return schema.model_validate(values) if hasattr(schema, "model_validate") else schema.validate_python(values)
    except ValidationError as error:
        raise unprocessable(describe_fields(error, f"{what} body")) from None


ROW_COLUMNS = ("model_explainability", "xai_parameters", "confidence_score_threshold_multilabel")


def read_score_rows(body: bytes, max_rows: int) -> list[ScoreRow]:
    """The rows of a /score body: 400 for malformed JSON, 413 for more than `max_rows` rows (counted before any row
    is read), 422 naming each invalid field or column."""
    values = load_json_body(body, "score")
    data = values.get("input_data") if isinstance(values, dict) else None
    rows = data.get("data") if isinstance(data, dict) else None
    if isinstance(rows, list) and len(rows) > max_rows:
        raise too_many_images(len(rows), max_rows)
    return parse_score_rows(validate_body(values, ScoreRequest, "score"))


def parse_score_rows(request: ScoreRequest) -> list[ScoreRow]:
    """The rows of a scoring request; a bare base64 string (or a one-column list) is an image with defaults.

    Besides `image`, a row's other fields may come as columns of their own (a pandas DataFrame sent in the split
    orientation): `{"columns": ["image", "model_explainability"], "data": [["<base64>", true]]}`. Any other column is
    an error, not silently dropped: a client would get no explanation and not know why."""
    columns = request.input_data.columns
    if "image" not in columns:
        raise unprocessable(f"input_data.columns must include 'image'; got {columns}", "invalid_columns")
    unknown = [name for name in columns if name != "image" and name not in ROW_COLUMNS]
    if unknown or len(set(columns)) != len(columns):
        problem = f"unknown column(s) {', '.join(map(repr, unknown))}" if unknown else "a column is named twice"
        raise unprocessable(f"input_data.columns: {problem}; the columns are 'image' and optionally "
                            f"{', '.join(map(repr, ROW_COLUMNS))}", "invalid_columns")
    data, index = request.input_data.data, request.input_data.index
    if index is not None and len(index) != len(data):
        raise unprocessable(f"input_data.index has {len(index)} item(s) but input_data.data has {len(data)} row(s); "
                            f"send one index item per row, or no index", "invalid_index")
    if request.params:
        raise unprocessable(f"params: /score takes no inference parameters (got {', '.join(map(repr, request.params))}"
                            f"); a row's settings go in the row (xai_parameters, "
                            f"confidence_score_threshold_multilabel)", "invalid_params")
    column = columns.index("image")
    rows = []
    for position, item in enumerate(data):
        cells: dict[str, Any] = {}
        if isinstance(item, list):
            if len(item) != len(columns) or not isinstance(item[column], str):
                raise unprocessable(f"input_data.data[{position}]: a row must hold one value per column {columns}, "
                                    f"the image a string", "invalid_row")
            cells = {name: value for name, value in zip(columns, item) if name != "image" and value is not None}
            item = item[column]
        elif len(columns) > 1:
            raise unprocessable(f"input_data.data[{position}]: a row must be a list of one value per column "
                                f"{columns}", "invalid_row")
        rows.append(_parse_row(item, position, cells))
    return rows


def _parse_row(item: str, position: int, cells: dict[str, Any]) -> ScoreRow:
    """The row from its image cell (base64, or a ScoreRow as JSON text) and its other columns' `cells`."""
    where = f"input_data.data[{position}]"
    text = item.strip()
    values = load_json(text, where) if text.startswith("{") else {"image_base64": text}
    for name, value in cells.items():
        if name in values:
            raise unprocessable(f"{where}: {name} is given twice, in its column and in the row's JSON", "invalid_row")
        values[name] = load_json(value, f"{where}.{name}") if name == "xai_parameters" and isinstance(value, str) \
            else value
    try:
        row = ScoreRow.model_validate(values)
    except ValidationError as error:
        raise unprocessable(describe_fields(error, where), "invalid_row") from None
    row.xai_parameters.method_params(f"{where}.xai_parameters")
    return row
