"""Error answers: a status code, a short machine-readable code and a message a user can act on; the HTTP side's own
(ApiError and its constructors), and the ONE table that answers the runtime's and the control plane's errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from starlette.responses import JSONResponse

from serving.control import errors as control
from serving.control.state import InvalidChange
from serving.runtime import errors as runtime


class ApiError(Exception):
    """An error answered as `{"error": {"code": ..., "message": ...}}` with `status`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message}}

    def response(self, extra_headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers={**self.headers, **(extra_headers or {})})


def bad_request(message: str, code: str = "bad_request") -> ApiError:
    return ApiError(400, code, message)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, {"WWW-Authenticate": 'Bearer realm="lantern"'})


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def method_not_allowed(method: str, path: str, allowed: str, headers: dict[str, str] | None = None) -> ApiError:
    """405 naming the methods the route takes (also in the Allow header)."""
    return ApiError(405, "method_not_allowed", f"{method} {path}: this route takes {allowed}",
                    {**(headers or {}), "Allow": allowed})


def timed_out(message: str) -> ApiError:
    return ApiError(408, "request_timeout", message)


def too_large(message: str) -> ApiError:
    return ApiError(413, "payload_too_large", message)


def too_many_images(count: int | None, limit: int) -> ApiError:
    """413 for a request of more images than `limits.max_images_per_request`, however they were sent (`count`: how
    many came, None where the counting stopped at the limit)."""
    came = f"{count} images in one request" if count is not None else "more images in one request than the limit"
    return ApiError(413, "too_many_images", f"{came}; the limit is {limit}")


def unsupported_media(message: str) -> ApiError:
    return ApiError(415, "unsupported_media_type", message)


def unprocessable(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(422, code, message)


RETRY_SOON = {"Retry-After": "1"}


@dataclass(frozen=True)
class Answer:
    """How an error of the runtime or the control plane is answered: its status, its code (None: the error's own),
    headers, and words put before its message."""

    status: int
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    prefix: str = ""


# The one table from the runtime's and the control plane's errors to status codes (the most specific class wins).
ANSWERS: dict[type[Exception], Answer] = {
    runtime.InvalidRequest: Answer(400),
    runtime.BadImage: Answer(400),
    runtime.NoRoute: Answer(404),
    runtime.TimedOut: Answer(408),
    runtime.ImageTooLarge: Answer(413),
    runtime.UnreadableImage: Answer(415),
    runtime.InvalidExplanation: Answer(422),
    runtime.NotExplainable: Answer(422),
    runtime.ModelFailed: Answer(424),
    runtime.Busy: Answer(429, headers=RETRY_SOON),
    runtime.NotReady: Answer(503, headers={"Retry-After": "5"}),
    runtime.Overloaded: Answer(503),
    runtime.NotAnswering: Answer(503),
    runtime.OutOfMemory: Answer(503, headers=RETRY_SOON),
    runtime.Unavailable: Answer(503, headers=RETRY_SOON),
    control.UnknownDeployment: Answer(404),
    control.ChangeConflict: Answer(409),
    control.InvalidDeployment: Answer(422),
    InvalidChange: Answer(422, "invalid_change", prefix="the change was refused, nothing changed: "),
    control.StateMissing: Answer(503, headers={"Retry-After": "5"}),
    control.StateUnavailable: Answer(503, headers={"Retry-After": "5"}),
    control.UnknownJob: Answer(404),
    control.JobExpired: Answer(410),
    control.JobQueueFull: Answer(429, headers=RETRY_SOON),
    control.JobNotFinished: Answer(409),
    control.JobFinished: Answer(409),
}


def answer_of(error: Exception) -> Answer | None:
    """The table's answer for `error`'s class or its nearest ancestor in the table; None for anything else."""
    return next((ANSWERS[kind] for kind in type(error).__mro__ if kind in ANSWERS), None)


def api_error(error: Exception) -> ApiError:
    """The answer to a runtime or control-plane error (as the table says), or an ApiError as it is."""
    if isinstance(error, ApiError):
        return error
    answer = answer_of(error)
    if answer is None:
        raise TypeError(f"no answer for {type(error).__name__}: add it to serving.http.errors.ANSWERS") from error
    code = answer.code or getattr(error, "code", None) or "error"
    return ApiError(answer.status, code, answer.prefix + str(error), answer.headers)


# the classes the table answers, for `except (ApiError, *ANSWERED)`
ANSWERED = tuple(ANSWERS)
