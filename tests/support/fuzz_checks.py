"""Schemathesis checks for tests/test_fuzz.py, loaded as its hooks module (SCHEMATHESIS_HOOKS=support.fuzz_checks)."""

from __future__ import annotations

import json

import schemathesis


@schemathesis.check
def lantern_error_format(ctx, response, case) -> None:  # noqa: ANN001 - schemathesis' own types
    """Every 4xx answer is Lantern's error: JSON `{"error": {"code": str, "message": str}}`."""
    if not 400 <= response.status_code < 500:
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} answered with a body that is not JSON: "
                             f"{response.content[:200]!r}") from None
    error = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(error, dict) and isinstance(error.get("code"), str) and isinstance(error.get("message"), str)
            and error["message"]):
        raise AssertionError(f"{response.status_code} is not in Lantern's error format: {response.content[:200]!r}")
