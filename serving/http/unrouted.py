"""Requests no route serves: a JSON 404 (or 405) naming what was asked, where Starlette answers plain text.

BentoML's outer Starlette app holds its own routes (`/livez`, `/readyz`, `/metrics`, `/docs.json`) and mounts ours
without claiming the prefix, so a request that matches neither falls to Starlette's plain-text "Not Found". This ASGI
middleware (added with `add_asgi_middleware`) asks the outer router the same question first and answers those. Under
a static-files mount (BentoML's `/static_content`, the docs page's assets) only the files answer which paths exist:
there it rewrites a plain-text 404 or 405 into the JSON error."""

from __future__ import annotations

import difflib

from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.http.errors import ApiError, method_not_allowed

SCORING_ROUTES = "POST /score, /predict and /explain"


class UnroutedRequests:
    """Answers a path no route serves with 404 `unknown_route`, and a method a BentoML route does not take with 405
    `method_not_allowed` (our own routes' 405 is answered by the app's exception handler)."""

    ROUTED_CACHE_SIZE = 256  # (method, path) pairs known to be routed; a static mount matches endless paths

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._static_prefixes: tuple[str, ...] | None = None
        self._routed: set[tuple[str, str, str]] = set()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        router = getattr(scope.get("app"), "router", None)
        if scope["type"] != "http" or router is None:
            await self.app(scope, receive, send)
            return
        # BentoML's routes are fixed once the server runs, so a routed (method, path) is remembered: matching every
        # route costs ~5 us a request (1-3 % of the event loop's time per prediction)
        key = (scope["method"], scope["path"], scope.get("root_path", ""))
        if key not in self._routed:
            answer = unrouted_answer(router.routes, scope, router.redirect_slashes)
            if answer is not None:
                await answer.response()(scope, receive, send)
                return
            if len(self._routed) < self.ROUTED_CACHE_SIZE:
                self._routed.add(key)
        if self._static_prefixes is None:
            self._static_prefixes = tuple(route.path + "/" for route in router.routes
                                          if isinstance(route, Mount) and isinstance(route.app, StaticFiles))
        if scope["path"].startswith(self._static_prefixes):
            send = json_errors(scope, send)
        await self.app(scope, receive, send)


def json_errors(scope: Scope, send: Send) -> Send:
    """`send` with a plain-text 404 or 405 (a static file that is not there) answered as Lantern's JSON error."""
    replaced = False

    async def send_json_errors(message: Message) -> None:
        nonlocal replaced
        if message["type"] == "http.response.start" and message["status"] in (404, 405):
            replaced = True
            method, path = scope["method"], scope["path"]
            allowed = Headers(raw=message.get("headers", [])).get("allow")
            error = method_not_allowed(method, path, allowed) if message["status"] == 405 and allowed else \
                ApiError(404, "unknown_route", f"no file {path} (the static files are the /docs page's assets); the "
                                               f"scoring routes are {SCORING_ROUTES}, and /docs lists every route")
            response = error.response()
            await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body})
        elif not replaced:  # the plain-text body of a replaced answer is dropped
            await send(message)

    return send_json_errors


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
        return method_not_allowed(method, path, allowed)
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
