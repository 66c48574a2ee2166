"""A client of the management API, used by `lantern endpoint/deploy/traffic/keys/rollout`: each change, then a wait
until every worker has applied it (and, for deployments, until the new generation is ready)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx

from registry.errors import LanternError
from serving.environment import ADMIN_ENV

DEFAULT_URL = "http://127.0.0.1:3000"
POLL_S = 0.25


class ManageError(LanternError):
    """The endpoint refused a change (the message is the server's), or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ManageClient:
    def __init__(self, url: str, admin_key: str | None, timeout_s: float = 60) -> None:
        if not admin_key:
            raise ManageError(f"set ${ADMIN_ENV} to the endpoint's admin key (`lantern endpoint get-credentials "
                              "ENDPOINT_YAML --key admin` prints it)")
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=f"{self.url}/manage", timeout=timeout_s,
                                  headers={"Authorization": f"Bearer {admin_key}"})

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as error:
            raise ManageError(f"cannot reach the endpoint at {self.url}: {error}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:500]
            raise ManageError(f"{response.status_code}: {message}", response.status_code)
        return response.json()

    # reads
    def endpoint(self) -> dict[str, Any]:
        return self._call("GET", "/endpoint")

    def deployment(self, name: str) -> dict[str, Any]:
        return self._call("GET", f"/deployments/{name}")

    # changes
    def add(self, config: dict[str, Any]) -> dict[str, Any]:
        return self._call("POST", "/deployments", config)

    def update(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return self._call("PATCH", f"/deployments/{name}", patch)

    def remove(self, name: str) -> dict[str, Any]:
        return self._call("DELETE", f"/deployments/{name}")

    def set_traffic(self, split: dict[str, int]) -> dict[str, Any]:
        return self._call("PUT", "/traffic", split)

    def set_mirror(self, split: dict[str, int]) -> dict[str, Any]:
        return self._call("PUT", "/mirror-traffic", split)

    def regenerate(self, kind: str) -> dict[str, Any]:
        return self._call("POST", f"/keys/{kind}/regenerate")

    # waits
    def wait_applied(self, revision: int, timeout_s: float = 30,
                     progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
        """The endpoint once every worker has applied `revision`."""
        deadline = time.monotonic() + timeout_s
        while True:
            view = self.endpoint()
            behind = [w["worker"] for w in view["workers"] if w["revision"] < revision]
            if view["applied"] and view["revision"] >= revision:
                return view
            if time.monotonic() > deadline:
                raise ManageError(f"revision {revision} not applied by worker(s) {', '.join(behind)} within "
                                  f"{timeout_s:.0f} s")
            progress(f"waiting for {len(behind)} of {len(view['workers'])} worker(s) to apply revision {revision}")
            time.sleep(POLL_S)

    def wait_ready(self, name: str, timeout_s: float = 600,
                   progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
        """The deployment once its latest generation is ready in every worker; a ManageError when it failed."""
        deadline = time.monotonic() + timeout_s
        while True:
            view = self.deployment(name)
            if view["state"] == "ready":
                return view
            if view["state"] == "failed":
                raise ManageError(f"deployment {name} failed: {view['reason']}")
            if time.monotonic() > deadline:
                raise ManageError(f"deployment {name} was not ready within {timeout_s:.0f} s "
                                  f"({view['state']}: {view['reason']})")
            progress(f"deployment {name} generation {view['generation']} is {view['state']}"
                     + (f": {view['reason']}" if view["reason"] else ""))
            time.sleep(POLL_S)
