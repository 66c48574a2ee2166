"""API errors: a status code, a short machine-readable code and a message a user can act on."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


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


def not_found(message: str, code: str = "no_deployment") -> ApiError:
    return ApiError(404, code, message)


def method_not_allowed(method: str, path: str, allowed: str, headers: dict[str, str] | None = None) -> ApiError:
    """405 naming the methods the route takes (also in the Allow header)."""
    return ApiError(405, "method_not_allowed", f"{method} {path}: this route takes {allowed}",
                    {**(headers or {}), "Allow": allowed})


def conflict(message: str, code: str = "conflict") -> ApiError:
    return ApiError(409, code, message)


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


def model_failed(message: str) -> ApiError:
    return ApiError(424, "model_error", message)


def too_many(message: str) -> ApiError:
    return ApiError(429, "too_many_requests", message, {"Retry-After": "1"})


def not_ready(message: str) -> ApiError:
    return ApiError(503, "not_ready", message, {"Retry-After": "5"})
