"""Requests no route serves: a JSON 404 (or 405) naming what was asked, where Starlette answers plain text.

BentoML's outer Starlette app holds its own routes (`/livez`, `/readyz`, `/metrics`, `/docs.json`) and mounts ours
without claiming the prefix, so a request that matches neither falls to Starlette's plain-text "Not Found". This ASGI
middleware (added with `add_asgi_middleware`) asks the outer router the same question first and answers those."""

from __future__ import annotations

import difflib

from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.errors import ApiError

SCORING_ROUTES = "POST /score, /predict and /explain"


class UnroutedRequests:
    """Answers a path no route serves with 404 `unknown_route`, and a method a BentoML route does not take with 405
    `method_not_allowed` (our own routes' 405 is answered by the app's exception handler)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        router = getattr(scope.get("app"), "router", None)
        if scope["type"] != "http" or router is None:
            await self.app(scope, receive, send)
            return
        answer = unrouted_answer(router.routes, scope, router.redirect_slashes)
        if answer is None:
            await self.app(scope, receive, send)
        else:
            await answer.response()(scope, receive, send)


def unrouted_answer(routes: list[BaseRoute], scope: Scope, redirect_slashes: bool) -> ApiError | None:
    """The error for a request none of `routes` serves, or None when one does (or a slash redirect will)."""
    partial: BaseRoute | None = None
    for route in routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return None
        if match == Match.PARTIAL and partial is None:
            partial = route
    method, path = scope["method"], scope["path"]
    if isinstance(partial, Route) and partial.methods:
        allowed = ", ".join(sorted(partial.methods))
        return ApiError(405, "method_not_allowed", f"{method} {path}: this route takes {allowed}",
                        {"Allow": allowed})
    if partial is not None:
        return None  # a mounted app (ours) answers its own 405
    if redirect_slashes and path != "/":
        other = path.rstrip("/") if path.endswith("/") else path + "/"
        if any(route.matches({**scope, "path": other})[0] != Match.NONE for route in routes):
            return None  # Starlette redirects to the other spelling
    return ApiError(404, "unknown_route", f"no route {method} {path}{suggestion(path, routes)}; the scoring routes "
                                          f"are {SCORING_ROUTES}, and /docs lists every route")


def suggestion(path: str, routes: list[BaseRoute]) -> str:
    """`" (did you mean /score?)"` for a near miss of a known path, else nothing."""
    close = difflib.get_close_matches(path, sorted(known_paths(routes)), n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def known_paths(routes: list[BaseRoute]) -> set[str]:
    """Every literal route path, including those of mounted Starlette apps (paths with parameters left out)."""
    paths: set[str] = set()
    for route in routes:
        if isinstance(route, Mount) and hasattr(route.app, "routes"):
            paths |= {route.path + sub for sub in known_paths(list(route.app.routes))}
        elif isinstance(route, Route) and "{" not in route.path:
            paths.add(route.path)
    return paths
