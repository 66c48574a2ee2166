"""The one table from the runtime's and the control plane's errors to status codes (serving/http/errors.py): every
domain error has an answer, the most specific class wins, and an error's own code and message reach the client."""

from __future__ import annotations

import inspect

import pytest

from serving.control import errors as control
from serving.control.state import InvalidChange
from serving.http.errors import ANSWERS, ApiError, api_error
from serving.runtime import errors as runtime


def domain_errors() -> list[type[Exception]]:
    """Every error class the runtime and the control plane raise (their two base classes are never raised)."""
    bases = (runtime.ServingError, control.ControlError)
    return [kind for module in (runtime, control) for _, kind in inspect.getmembers(module, inspect.isclass)
            if issubclass(kind, bases) and kind not in bases and kind.__module__ == module.__name__]


@pytest.mark.parametrize("kind", domain_errors(), ids=lambda kind: kind.__name__)
def test_every_domain_error_has_an_answer(kind: type[Exception]) -> None:
    answer = api_error(kind("what happened"))
    assert 400 <= answer.status < 600 and answer.message.endswith("what happened")
    assert kind in ANSWERS, f"{kind.__name__} is answered through a base class only"


@pytest.mark.parametrize("error, status, code, headers", [
    (runtime.NoRoute("no deployment named 'x'"), 404, "no_deployment", {}),
    (runtime.InvalidRequest("the pinning headers disagree", "conflicting_pins"), 400, "conflicting_pins", {}),
    (runtime.ImageTooLarge("the image: 40 M pixels"), 413, "payload_too_large", {}),
    (runtime.UnreadableImage("the image: not an image"), 415, "unsupported_media_type", {}),
    (runtime.BadImage("image_base64 is empty", "empty_image"), 400, "empty_image", {}),
    (runtime.Busy("deployment blue has 16 requests in flight"), 429, "too_many_requests", {"Retry-After": "1"}),
    (runtime.NotReady("deployment blue is loading"), 503, "not_ready", {"Retry-After": "5"}),
    (runtime.OutOfMemory("deployment blue ran out of device memory"), 503, "out_of_memory", {"Retry-After": "1"}),
    (runtime.ModelFailed("deployment blue failed on this input"), 424, "model_error", {}),
    (runtime.TimedOut("/explain did not finish"), 408, "request_timeout", {}),
    (control.ChangeConflict("deployment green exists", "deployment_exists"), 409, "deployment_exists", {}),
    (control.UnknownDeployment("no deployment 'x'"), 404, "unknown_deployment", {}),
    (control.StateUnavailable("the state database does not answer"), 503, "state_unavailable", {"Retry-After": "5"}),
])
def test_a_domain_error_is_answered_with_its_status_code_and_headers(error: Exception, status: int, code: str,
                                                                       headers: dict[str, str]) -> None:
    answer = api_error(error)
    assert (answer.status, answer.code, answer.headers) == (status, code, headers)
    assert answer.message == str(error)


def test_a_refused_state_change_says_nothing_changed() -> None:
    answer = api_error(InvalidChange(["traffic must add up to 100"]))
    assert (answer.status, answer.code) == (422, "invalid_change")
    assert answer.message == "the change was refused, nothing changed: traffic must add up to 100"


def test_an_api_error_is_answered_as_it_is_and_anything_else_is_a_bug() -> None:
    own = ApiError(431, "headers_too_large", "the request head is over 32 KiB")
    assert api_error(own) is own
    with pytest.raises(TypeError, match="no answer for ValueError"):
        api_error(ValueError("not a domain error"))
