"""The endpoint's managed state: deployments, traffic, mirror and key digests, persisted as one JSON document next to
the registry store (`<lantern home>/endpoints/<name>/state.json`). A change is validated as a whole under a file lock
and written atomically with the next revision number; every worker process follows the file."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock
from pydantic import Field, ValidationError

from registry.errors import LanternError
from serving.config import DeploymentConfig, EndpointConfig, Percent, Strict, traffic_problems
from serving.control.auth import admin_key, endpoint_dir, key_digest, scoring_keys
from serving.control.private_files import replace_private

STATE_FILE = "state.json"


class InvalidChange(LanternError):
    """A change would break a rule of the endpoint state; `problems` names each rule."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


class DeploymentRecord(Strict):
    """A deployment's configuration, generation (raised by every update, so workers know to ready a new instance) and
    the version it serves: an alias in `config.model` is resolved once, when the generation is made, so every worker,
    restart and reload serves the same version until an update names the model again."""

    config: DeploymentConfig
    generation: int = Field(1, ge=1)
    model_version: str | None = Field(None, description="models:/NAME/N; None: it named no version when resolved")


class KeyDigests(Strict):
    """sha256 digests (hex) of the endpoint's keys; the keys themselves are never in the state."""

    primary: str
    secondary: str
    admin: str


class EndpointState(Strict):
    """What the management API changes: deployments, the live split, the mirror and the keys."""

    endpoint: str
    revision: int = Field(1, ge=1)
    deployments: list[DeploymentRecord] = Field(default_factory=list)
    traffic: dict[str, Percent] = Field(default_factory=dict)
    mirror_traffic: dict[str, Percent] = Field(default_factory=dict)
    keys: KeyDigests
    changed_at: float = Field(default_factory=time.time)
    last_change: str = "created from the endpoint configuration"

    @property
    def names(self) -> list[str]:
        return [record.config.name for record in self.deployments]

    def record(self, name: str) -> DeploymentRecord | None:
        return next((r for r in self.deployments if r.config.name == name), None)

    def live(self) -> dict[str, int]:
        """Deployments with a positive share of live traffic."""
        return {name: percent for name, percent in self.traffic.items() if percent > 0}

    def problems(self) -> list[str]:
        return traffic_problems(self.names, self.traffic, self.mirror_traffic)

    def versions(self) -> dict[str, str | None]:
        """Deployment -> the version it is pinned to."""
        return {record.config.name: record.model_version for record in self.deployments}

    def endpoint_config(self, base: EndpointConfig) -> EndpointConfig:
        """`base` (limits, auth mode from endpoint.yaml) with this state's deployments, traffic and mirror."""
        return base.model_copy(update={"deployments": [r.config for r in self.deployments],
                                       "traffic": dict(self.traffic), "mirror_traffic": dict(self.mirror_traffic)})


def current_key_digests(endpoint: str) -> KeyDigests:
    """Digests of the keys in force: from the environment, else from the keys file (generated on first use)."""
    scoring = scoring_keys(endpoint)
    return KeyDigests(primary=key_digest(scoring.primary), secondary=key_digest(scoring.secondary),
                      admin=key_digest(admin_key(endpoint).key))


class StateStore:
    """Reads and changes one endpoint's persisted state."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.folder = endpoint_dir(endpoint)
        self.path = self.folder / STATE_FILE
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.folder / "state.lock"), timeout=30)

    def stamp(self) -> tuple[int, int] | None:
        """Changes whenever the file is replaced (cheap to poll)."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return None
        return info.st_mtime_ns, info.st_ino

    def read(self) -> EndpointState | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            return EndpointState.model_validate(json.loads(text))
        except (json.JSONDecodeError, ValidationError) as error:
            raise LanternError(f"the endpoint state {self.path} is damaged ({error}); move it away to start over "
                               "from endpoint.yaml") from None

    def _write(self, state: EndpointState) -> None:
        replace_private(self.path, json.dumps(state.model_dump(mode="json"), indent=1),
                        self.path.with_name(f"{STATE_FILE}.{os.getpid()}.tmp"))

    def prepare(self, config: EndpointConfig, pin: Callable[[str], str | None],
                reset: bool = False) -> tuple[EndpointState, bool]:
        """The persisted state (its key digests brought up to date), or a new one from `config` when there is none or
        `reset`; the flag says whether it was restored. `pin` gives the version a model URI names now: a new
        deployment's, and a restored one's that a state written before versions were pinned lacks."""
        with self._lock:
            existing = None if reset else self.read()
            digests = current_key_digests(config.name)
            if existing is None:
                state = EndpointState(endpoint=config.name,
                                      deployments=[DeploymentRecord(config=d, model_version=pin(d.model))
                                                   for d in config.deployments],
                                      traffic=dict(config.traffic), mirror_traffic=dict(config.mirror_traffic),
                                      keys=digests)
                self._write(state)
                return state, False
            pinned = 0
            for record in existing.deployments:
                if record.model_version is None:
                    record.model_version = pin(record.config.model)
                    pinned += record.model_version is not None
            if existing.keys != digests or pinned:
                existing = existing.model_copy(update={"keys": digests})
                self._write(existing)
            return existing, True

    def change(self, mutate: Callable[[EndpointState], EndpointState], description: str) -> EndpointState:
        """Apply `mutate` to the current state under the lock; the result is validated as a whole and written with
        the next revision, or nothing changes (InvalidChange, or whatever `mutate` raises)."""
        with self._lock:
            current = self.read()
            if current is None:
                raise LanternError(f"endpoint {self.endpoint} has no state at {self.path}; start it with lantern serve")
            proposed = mutate(current.model_copy(deep=True))
            problems = proposed.problems()
            if problems:
                raise InvalidChange(problems)
            state = proposed.model_copy(update={"revision": current.revision + 1, "changed_at": time.time(),
                                                "last_change": description})
            self._write(state)
            return state


def state_path(endpoint: str) -> Path:
    return endpoint_dir(endpoint) / STATE_FILE
