"""Why a worker cannot serve a request as asked: the runtime's errors, free of HTTP. Each carries the machine-readable
`code` users see and a message they can act on; `serving.http.errors` maps each class to its status code, in one
table."""

from __future__ import annotations

import sys

from serving.faults import Fault


class ServingError(Fault):
    """A request the runtime cannot serve; `code` says why, the message what to do about it."""

    code = "serving_error"


class InvalidRequest(ServingError):
    """The request contradicts itself (two pinning headers naming different deployments)."""

    code = "bad_request"


class NoRoute(ServingError):
    """No deployment to send the request to: an unknown pinned deployment, or no live traffic."""

    code = "no_deployment"


class BadImage(ServingError):
    """An image that cannot be used: not valid base64, empty, a URL instead of bytes."""

    code = "bad_image"


class ImageTooLarge(BadImage):
    """An image over `limits.max_image_pixels`."""

    code = "payload_too_large"


class UnreadableImage(BadImage):
    """Bytes that no image decoder takes."""

    code = "unsupported_media_type"


class InvalidExplanation(ServingError):
    """Explanation parameters the method refuses (out of range, unknown)."""

    code = "invalid_explanation"


class NotExplainable(ServingError):
    """An explanation asked of a deployment whose model has none to give (a detector)."""

    code = "not_explainable"


class TimedOut(ServingError):
    """The request did not finish within `request_timeout_ms`; its work was abandoned."""

    code = "request_timeout"


class ModelFailed(ServingError):
    """The model failed on this input (the input's fault, or the model's: not the device's or the server's)."""

    code = "model_error"


class Unavailable(ServingError):
    """Not this request's fault: the same request may succeed when retried."""


class Busy(Unavailable):
    """More requests in flight than the deployment (or the explanation pool) admits, or no slot in time."""

    code = "too_many_requests"


class NotReady(Unavailable):
    """The deployment (or the worker) is loading, unready, failed or stopped."""

    code = "not_ready"


class Overloaded(Unavailable):
    """The batcher could not fit the request's images within the deployment's max_latency_ms."""

    code = "overloaded"


class NotAnswering(Unavailable):
    """The model did not answer a batch within max_latency_ms (probes reload it when it stays stuck)."""

    code = "not_answering"


class OutOfMemory(Unavailable):
    """The device ran out of memory for this request."""

    code = "out_of_memory"


# ONNX Runtime has no exception type for it (its CUDA arena and cudaMalloc failures are RuntimeExceptions saying so),
# and torch raises OutOfMemoryError only for its own allocator (cuDNN's and cuBLAS's failures are RuntimeErrors)
ORT_OUT_OF_MEMORY = ("failed to allocate memory", "out of memory")
CUDA_OUT_OF_MEMORY = ("cuda error: out of memory", "cudnn_status_alloc_failed", "cublas_status_alloc_failed")


def out_of_memory(error: Exception) -> bool:
    torch = sys.modules.get("torch")  # an error from torch means torch is loaded; this module does not load it
    text = str(error).lower()
    if (torch is not None and isinstance(error, torch.OutOfMemoryError)) or any(t in text for t in CUDA_OUT_OF_MEMORY):
        return True
    return type(error).__module__.startswith("onnxruntime") and any(t in text for t in ORT_OUT_OF_MEMORY)


def model_failure(deployment: str, error: Exception) -> ServingError:
    """What a model call's exception means for the request: the device ran out of memory, the model did not answer
    in time (neither is the input's fault: a retry may succeed), or the model failed on this input."""
    if out_of_memory(error):
        return OutOfMemory(f"deployment {deployment} ran out of device memory for this request; retry it later")
    if isinstance(error, NotAnswering):
        return NotAnswering(f"deployment {deployment}: {error}; retry it later")
    return ModelFailed(f"deployment {deployment} failed on this input: {type(error).__name__}: {error}")
