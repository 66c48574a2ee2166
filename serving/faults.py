"""The base of the runtime's and the control plane's errors: a message a user can act on and a machine-readable
`code`; free of HTTP (`serving.http.errors` answers each class with its status code)."""

from __future__ import annotations


class Fault(Exception):
    """Something the endpoint cannot do as asked; `code` says why (a class's default, or one given when raised)."""

    code = "error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
