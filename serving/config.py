"""The endpoint configuration (`endpoint.yaml`): deployments, traffic split and mirror, limits; unknown keys are errors."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from registry.devices import DEVICE_PATTERN
from registry.errors import LanternError, describe_validation_error
from registry.references import URI_PATTERN

Percent = Annotated[int, Field(strict=True)]
"""A whole percent; YAML and JSON give ints, and a string or a float is refused rather than rounded."""

# How `lantern serve` tells the service (started by `bentoml serve`) which file to read and how many workers run
# (each worker's ONNX Runtime takes its share of the cores).
CONFIG_ENV = "LANTERN_ENDPOINT_CONFIG"
WORKERS_ENV = "LANTERN_WORKERS"
NAME_PATTERN = re.compile(r"[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?")


def _resource_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"{name!r} is not a valid name: use 1-32 lowercase letters, digits and dashes")
    return name


ResourceName = Annotated[str, AfterValidator(_resource_name)]
"""An endpoint or deployment name: it appears in URLs, headers and file names."""
MAX_REQUEST_TIMEOUT_MS = 180_000
MAX_MIRROR_PERCENT = 50
# Keys of the cloud's endpoint and deployment YAML that Lantern has no field for (users paste those files), and what
# to use instead; said with the "unknown key" error
CLOUD_KEY_HINTS = {
    "$schema": "Lantern checks every key itself: remove this line",
    "instance_count": "every worker of `lantern serve` runs each deployment, so the workers are its instances: size "
                      "the endpoint with `lantern serve --workers N`",
    "scale_settings": "the number of instances is the number of workers: `lantern serve --workers N`",
    "instance_type": "choose the hardware with `device`: auto, cpu, cuda or cuda:N",
    "endpoint_name": "a deployment belongs to the endpoint that lists it",
    "environment": "Lantern serves registered versions with its own scoring code; `settings` overrides the version's "
                   "settings.json",
    "code_configuration": "Lantern serves registered versions with its own scoring code; `settings` overrides the "
                          "version's settings.json",
    "environment_variables": "set them in the environment of `lantern serve`",
    "app_insights_enabled": "the metrics are always at /metrics (Prometheus)",
}


def describe_fields(error: ValidationError, what: str) -> str:
    """One readable line per problem of a request body; extra keys are called unknown fields (with what to use
    instead of a key of the cloud's deployment YAML)."""
    return describe_validation_error(error, what, "unknown field", CLOUD_KEY_HINTS)


class ConfigError(LanternError):
    """The endpoint configuration is invalid; the message names each problem."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestSettings(Strict):
    """Per-request limits of a deployment (SPEC.md section 2)."""

    request_timeout_ms: int = Field(5000, ge=1, le=MAX_REQUEST_TIMEOUT_MS,
                                    description="a request still running after this is answered 408 and abandoned")
    max_concurrent_requests_per_instance: int = Field(1, ge=1, le=1024,
                                                      description="requests worked on at once per instance; twice "
                                                                  "this may be in flight, more get 429 at once")
    max_queue_wait_ms: int = Field(500, ge=0, le=MAX_REQUEST_TIMEOUT_MS,
                                   description="a request waiting longer than this for a free slot gets 429")


class Probe(Strict):
    """A readiness or liveness probe, in seconds (the cloud's defaults)."""

    initial_delay: float = Field(10, ge=0, le=3600)
    period: float = Field(10, gt=0, le=3600)
    timeout: float = Field(2, gt=0, le=600)
    success_threshold: int = Field(1, ge=1, le=100)
    failure_threshold: int = Field(30, ge=1, le=1000)


class DeploymentConfig(Strict):
    """One registered model version served under a name."""

    name: ResourceName = Field(description="lowercase letters, digits and dashes, 1-32 characters")
    model: str = Field(description="models:/NAME/VERSION or models:/NAME@ALIAS")
    settings: dict[str, Any] = Field(default_factory=dict,
                                     description="overrides of the version's settings.json (validated per task)")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    backend: Literal["onnxruntime", "torch"] = "onnxruntime"
    max_batch_size: int = Field(32, ge=1, le=1024,
                                description="adaptive batching: most images in one model call (1: no batching)")
    max_latency_ms: int = Field(60_000, ge=1, le=MAX_REQUEST_TIMEOUT_MS,
                                description="adaptive batching: most time an image may wait to be batched")
    request_settings: RequestSettings = Field(default_factory=RequestSettings)
    readiness_probe: Probe = Field(default_factory=Probe)
    liveness_probe: Probe = Field(default_factory=Probe)

    @field_validator("model")
    @classmethod
    def _model_uri(cls, model: str) -> str:
        match = URI_PATTERN.fullmatch(model)
        if not match or not (match.group("version") or match.group("alias")):
            raise ValueError(f"{model!r} is not a registered model version; accepted: models:/NAME/VERSION or "
                             "models:/NAME@ALIAS (models come only from the registry)")
        return model

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not DEVICE_PATTERN.fullmatch(device):
            raise ValueError(f"unknown device {device!r}; accepted: auto, cpu, cuda, cuda:N")
        return device


class Limits(Strict):
    """Limits applied before any work is done."""

    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="larger bodies are refused with 413")
    max_image_pixels: int = Field(40_000_000, ge=64, description="larger images (declared size) are refused with 413")
    max_images_per_request: int = Field(64, ge=1, le=4096)
    max_concurrent_explanations: int = Field(1, ge=1, le=64,
                                             description="explanations computed at once per worker; twice this may "
                                                         "be in flight, more get 429")
    explanation_threads: int | None = Field(None, ge=1, le=1024,
                                            description="CPU threads one explanation computes on (torch's, and XRAI's "
                                                        "segmentation); default: torch's, every physical core. Lower "
                                                        "it where explanations run on the CPU and predictions should "
                                                        "keep cores meanwhile")
    job_explanation_threads: int | None = Field(None, ge=1, le=1024,
                                                description="CPU threads an explanation job's explanation computes on; "
                                                            "default: explanation_threads (or torch's count): jobs "
                                                            "run at the lowest CPU priority (job_cpu_niceness), so "
                                                            "live work takes the cores first")
    job_cpu_niceness: int = Field(19, ge=0, le=19,
                                  description="CPU priority (Linux nice) of the threads explanation jobs compute on: 19, "
                                              "the lowest, lets the scheduler give the cores to live predictions and "
                                              "explanations first and the job what they leave; 0 runs jobs as live "
                                              "work")
    max_images_per_job: int = Field(64, ge=1, le=4096, description="images in one explanation job (a batch)")
    max_queued_jobs: int = Field(16, ge=1, le=10000,
                                 description="explanation jobs queued or running for the endpoint (every host); more "
                                             "are refused with 429 at once")
    job_result_seconds: int = Field(86400, ge=1, le=30 * 86400,
                                    description="how long a finished job and its result are kept; then 410")
    job_inline_result_bytes: int = Field(256 * 1024, ge=0, le=64 * 1024 * 1024,
                                         description="an image's explanations (PNGs and attributions) larger than "
                                                     "this are kept as files in the registry's artifact store (local "
                                                     "disk beside the embedded registry; an MLflow server's proxied "
                                                     "artifacts, which every host reaches) and named in the state "
                                                     "database; smaller ones are kept in the database")


ORIGIN_PATTERN = re.compile(r"https?://[A-Za-z0-9.\-]+(?::[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?")
HEADER_NAME_PATTERN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110's token


class Cors(Strict):
    """Which web pages served from elsewhere may call the scoring routes from a browser (CORS). Browsers send the
    key in `Authorization`; no cookies are involved, so no credentials mode."""

    allow_origins: list[str] = Field(min_length=1, description='origins such as "https://app.example.com" (scheme, '
                                                               'host and port, no path), or ["*"] for any')
    max_age: int = Field(600, ge=0, le=86400, description="seconds a browser may keep a preflight answer")
    allow_headers: list[str] = Field(default_factory=list,
                                     description="request headers a page may send besides the ones Lantern reads "
                                                 "(Authorization, Content-Type, Accept, the pinning headers...), "
                                                 "such as a tracing or client-version header of the web app")

    @field_validator("allow_headers")
    @classmethod
    def _header_names(cls, names: list[str]) -> list[str]:
        for name in names:
            if name == "*" or not HEADER_NAME_PATTERN.fullmatch(name):  # "*" is a token, but would allow any header
                raise ValueError(f"{name!r} is not a header name: a header name is letters, digits and "
                                 "!#$%&'*+-.^_`|~, such as X-Client-Version (\"*\" is not accepted: name the headers)")
        return names

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        if "*" in origins and len(origins) > 1:
            raise ValueError('"*" allows every origin: list it alone, or list origins without it')
        for origin in origins:
            if origin != "*" and not ORIGIN_PATTERN.fullmatch(origin):
                scheme, _, rest = origin.partition("://")
                hint = f" (without the path: {scheme}://{rest.split('/')[0]})" if rest else ""
                raise ValueError(f"{origin!r} is not an origin: an origin is a scheme, host and optional port as a "
                                 f"browser sends it, such as https://app.example.com:8443{hint}")
        return origins


class EndpointConfig(Strict):
    """A whole endpoint: its deployments, the live traffic split and the mirrored share."""

    name: ResourceName
    auth_mode: Literal["key", "none"] = "key"
    deployments: list[DeploymentConfig] = Field(default_factory=list)
    traffic: dict[str, Percent] = Field(default_factory=dict, description="deployment -> percent of live traffic")
    mirror_traffic: dict[str, Percent] = Field(default_factory=dict,
                                           description="at most one deployment -> percent of live traffic copied to it")
    limits: Limits = Field(default_factory=Limits)
    cors: Cors | None = Field(None, description="off unless set: browsers then refuse cross-origin calls")

    @model_validator(mode="after")
    def _consistent(self) -> "EndpointConfig":
        problems = traffic_problems([d.name for d in self.deployments], self.traffic, self.mirror_traffic)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def deployment(self, name: str) -> DeploymentConfig | None:
        return next((d for d in self.deployments if d.name == name), None)


def traffic_problems(names: list[str], traffic: dict[str, int], mirror: dict[str, int]) -> list[str]:
    """Every rule a deployment list with a traffic split and a mirror breaks (SPEC.md section 2); empty when valid."""
    problems = []
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"deployment names must be unique: {', '.join(duplicates)} appear more than once")
    for kind, split in (("traffic", traffic), ("mirror_traffic", mirror)):
        unknown = [n for n in split if n not in names]
        if unknown:
            problems.append(f"{kind} names unknown deployment(s) {', '.join(unknown)}; deployments: "
                            f"{', '.join(names) or 'none'}")
        bad = [f"{n}={p}" for n, p in split.items() if not 0 <= p <= 100]
        if bad:
            problems.append(f"{kind} percents must be integers from 0 to 100: {', '.join(bad)}")
    total = sum(traffic.values())
    if traffic and total not in (0, 100):
        problems.append(f"traffic percents must sum to 100 (or all be 0); they sum to {total}")
    live_mirrored = [n for n, p in mirror.items() if p > 0]
    if len(live_mirrored) > 1:
        problems.append(f"mirror_traffic takes one deployment; got {', '.join(live_mirrored)}")
    over = [f"{n}={p}" for n, p in mirror.items() if p > MAX_MIRROR_PERCENT]
    if over:
        problems.append(f"mirror_traffic is at most {MAX_MIRROR_PERCENT} percent: {', '.join(over)}")
    both = [n for n in live_mirrored if traffic.get(n, 0) > 0]
    if both:
        problems.append(f"a deployment gets live or mirrored traffic, never both: {', '.join(both)} has both")
    return problems


def parse_endpoint_config(values: Any, source: str = "endpoint configuration") -> EndpointConfig:
    """Validate `values` (the parsed YAML) as a whole; every problem is named in one message."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source} must be a mapping with name, deployments and traffic")
    try:
        return EndpointConfig.model_validate(values)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, source, "unknown key", CLOUD_KEY_HINTS)) from None


def load_endpoint_config(path: str | Path) -> EndpointConfig:
    """Read and validate an endpoint YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read the endpoint configuration {path}: {error.strerror}") from None
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return parse_endpoint_config(values, str(path))
