"""Abandoning work whose request timed out or whose client went away.

A request's worker thread runs under a `CancelToken`; a forward pre-hook on the explanation module checks the token
of the thread that runs it, so an explanation stops at its next forward pass (one path batch of integrated gradients,
one XRAI baseline batch) instead of running to the end for nobody."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from torch import nn


class Abandoned(Exception):
    """The request this work was for has been answered (timeout) or dropped (client disconnected)."""


class CancelToken:
    """Set once, from any thread, when the work it guards should stop."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason: str | None = None

    def cancel(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Abandoned(self.reason or "abandoned")


_local = threading.local()


def current_token() -> CancelToken | None:
    return getattr(_local, "token", None)


@contextlib.contextmanager
def running_under(token: CancelToken) -> Iterator[None]:
    """Make `token` the current thread's token for the duration."""
    previous = current_token()
    _local.token = token
    try:
        token.check()
        yield
    finally:
        _local.token = previous


def _check_current(module: nn.Module, args: object) -> None:
    token = current_token()
    if token is not None:
        token.check()


def make_abandonable(module: nn.Module) -> nn.Module:
    """Install the token check on `module`'s forward (once)."""
    if not getattr(module, "_lantern_abandonable", False):
        module.register_forward_pre_hook(_check_current)
        module._lantern_abandonable = True  # type: ignore[attr-defined]
    return module
