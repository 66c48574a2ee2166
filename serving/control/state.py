"""The endpoint's managed state: deployments, traffic, mirror and key digests, one JSON document in one row of the
state database (serving/control/database.py) with its revision beside it. A change is validated as a whole and
written with a compare-and-set on the revision, so changes made at once through any worker of any host never undo
each other; every worker follows the revision."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import Field, ValidationError
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from registry.errors import LanternError
from serving.config import DeploymentConfig, EndpointConfig, Percent, Strict, traffic_problems
from serving.control.auth import admin_key, endpoint_dir, key_digest, scoring_keys
from serving.control.database import embedded, endpoint_states, shown_uri, state_engine, state_uri, unreachable
from serving.control.errors import ChangeConflict, StateUnavailable

LEGACY_STATE_FILE = "state.json"  # where Lantern kept the state before the database: migrated once
CHANGE_ATTEMPTS = 8  # a change made again on the newer state, each time another change was written first
logger = logging.getLogger("lantern.serving")


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
    key_sources: dict[str, str] = Field(default_factory=dict, description="kind -> digest of the key the environment "
                                        "gave when it was last taken: a key set in the environment replaces the "
                                        "state's when it changes there (not when it was regenerated since)")
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


class KeySupply:
    """The keys this host is given: from the environment (a Secret) or its keys file; their digests."""

    def __init__(self, endpoint: str) -> None:
        scoring, admin = scoring_keys(endpoint), admin_key(endpoint)
        self.digests = KeyDigests(primary=key_digest(scoring.primary), secondary=key_digest(scoring.secondary),
                                  admin=key_digest(admin.key))
        self.from_environment = {kind for kind, source in (("primary", scoring.source), ("secondary", scoring.source),
                                                           ("admin", admin.source)) if source == "environment"}

    def sources(self) -> dict[str, str]:
        return {kind: getattr(self.digests, kind) for kind in sorted(self.from_environment)}

    def taken_into(self, state: EndpointState, own_file: bool) -> EndpointState | None:
        """`state` with the keys it should take from this host, or None when it keeps its own: a key from the
        environment when it changed there; every key of the keys file when the state is this host's own (embedded),
        as before the state had a database. A shared state's keys are the ones it holds (the keys files of the hosts
        that join it are not theirs to change; give every host the keys through the environment)."""
        keys = state.keys.model_dump()
        for kind in ("primary", "secondary", "admin"):
            given = getattr(self.digests, kind)
            if kind in self.from_environment:
                if state.key_sources.get(kind) != given:
                    keys[kind] = given
            elif own_file:
                keys[kind] = given
        updated = KeyDigests(**keys)
        if updated == state.keys and state.key_sources == self.sources():
            return None
        return state.model_copy(update={"keys": updated, "key_sources": self.sources()})


def current_key_digests(endpoint: str) -> KeyDigests:
    """Digests of the keys this host is given: from the environment, else from the keys file (generated on first
    use)."""
    return KeySupply(endpoint).digests


def _document(state: EndpointState) -> str:
    return json.dumps(state.model_dump(mode="json"), separators=(",", ":"))


class StateStore:
    """Reads and changes one endpoint's persisted state in the state database."""

    def __init__(self, endpoint: str, uri: str | None = None) -> None:
        self.endpoint = endpoint
        self.folder = endpoint_dir(endpoint)  # this host's files for the endpoint: keys, metrics
        self.folder.mkdir(parents=True, exist_ok=True)
        self.uri = state_uri(uri)
        self.where = f"{shown_uri(self.uri)} (endpoint {endpoint})"

    @property
    def engine(self):  # noqa: ANN201 - sqlalchemy.Engine, made on first use
        return state_engine(self.uri)

    def _unreachable(self, error: Exception) -> str:
        return unreachable(self.uri, error)

    def stamp(self) -> int | None:
        """The state's revision: one small row read, cheap to poll."""
        try:
            with self.engine.connect() as connection:
                return connection.execute(select(endpoint_states.c.revision)
                                          .where(endpoint_states.c.endpoint == self.endpoint)).scalar()
        except SQLAlchemyError as error:
            raise StateUnavailable(self._unreachable(error)) from None

    def read(self) -> EndpointState | None:
        try:
            with self.engine.connect() as connection:
                text = connection.execute(select(endpoint_states.c.document)
                                          .where(endpoint_states.c.endpoint == self.endpoint)).scalar()
        except SQLAlchemyError as error:
            raise StateUnavailable(self._unreachable(error)) from None
        if text is None:
            return None
        try:
            return EndpointState.model_validate(json.loads(text))
        except (json.JSONDecodeError, ValidationError) as error:
            raise LanternError(f"the endpoint state in {self.where} is damaged ({error}); start over from "
                               "endpoint.yaml with lantern serve --reset-state") from None

    def _insert(self, state: EndpointState, replace: bool = False) -> bool:
        """Write `state` as the endpoint's first (or, `replace`, its new) row; False when another process wrote a
        first one meanwhile."""
        values = {"revision": state.revision, "changed_at": state.changed_at, "document": _document(state)}
        try:
            with self.engine.begin() as connection:
                if replace and connection.execute(update(endpoint_states).where(
                        endpoint_states.c.endpoint == self.endpoint).values(**values)).rowcount:
                    return True
                connection.execute(insert(endpoint_states).values(endpoint=self.endpoint, **values))
            return True
        except IntegrityError:
            return False
        except SQLAlchemyError as error:
            raise StateUnavailable(self._unreachable(error)) from None

    def _swap(self, expected: int, state: EndpointState) -> bool:
        """Write `state` if the stored revision is still `expected` (compare-and-set); False when it is not."""
        try:
            with self.engine.begin() as connection:
                return connection.execute(
                    update(endpoint_states)
                    .where(endpoint_states.c.endpoint == self.endpoint, endpoint_states.c.revision == expected)
                    .values(revision=state.revision, changed_at=state.changed_at, document=_document(state))
                ).rowcount == 1
        except SQLAlchemyError as error:
            raise StateUnavailable(self._unreachable(error)) from None

    def _legacy(self) -> EndpointState | None:
        """The state an earlier Lantern kept in `<endpoint folder>/state.json`, if there is one."""
        path = self.folder / LEGACY_STATE_FILE
        try:
            return EndpointState.model_validate(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, ValidationError) as error:
            raise LanternError(f"the endpoint state {path} is damaged ({error}); move it away to start over from "
                               "endpoint.yaml") from None

    def prepare(self, config: EndpointConfig, pin: Callable[[str], str | None],
                reset: bool = False) -> tuple[EndpointState, bool]:
        """The persisted state (its keys brought up to date), or a new one from `config` when there is none or
        `reset`; the flag says whether it was restored. An existing `state.json` is moved into the database once.
        `pin` gives the version a model URI names now: a new deployment's, and a restored one's that a state written
        before versions were pinned lacks."""
        supply = KeySupply(config.name)
        for _ in range(CHANGE_ATTEMPTS):
            existing = None if reset else self.read()
            if existing is None and not reset:
                legacy = self._legacy()
                if legacy is not None and self._insert(legacy):
                    (self.folder / LEGACY_STATE_FILE).rename(self.folder / f"{LEGACY_STATE_FILE}.migrated")
                    logger.info("endpoint %s: state.json moved into %s", self.endpoint, self.where)
                    continue
            if existing is None:
                previous = None if not reset else self.read()
                state = EndpointState(endpoint=config.name,
                                      deployments=[DeploymentRecord(config=d, model_version=pin(d.model))
                                                   for d in config.deployments],
                                      traffic=dict(config.traffic), mirror_traffic=dict(config.mirror_traffic),
                                      keys=supply.digests, key_sources=supply.sources(),
                                      revision=previous.revision + 1 if previous else 1)
                if self._insert(state, replace=reset):
                    return state, False
                continue
            pinned = existing.model_copy(deep=True)
            for record in pinned.deployments:
                if record.model_version is None:
                    record.model_version = pin(record.config.model)
            keyed = supply.taken_into(pinned, own_file=embedded(self.uri))
            if keyed is None and pinned == existing:
                return existing, True
            updated = (keyed or pinned).model_copy(update={
                "revision": existing.revision + 1, "changed_at": time.time(),
                "last_change": "keys taken from the environment or keys file" if keyed else "versions pinned"})
            if self._swap(existing.revision, updated):
                return updated, True
        raise ChangeConflict(f"the state of endpoint {self.endpoint} kept changing while this server started; start it "
                             "again", "concurrent_change")

    def change(self, mutate: Callable[[EndpointState], EndpointState], description: str) -> EndpointState:
        """Apply `mutate` to the current state; the result is validated as a whole and written with the next revision
        if no other change was written meanwhile (else `mutate` runs again on the newer state), or nothing changes
        (InvalidChange, or whatever `mutate` raises)."""
        for _ in range(CHANGE_ATTEMPTS):
            current = self.read()
            if current is None:
                raise LanternError(f"endpoint {self.endpoint} has no state in {self.where}; start it with "
                                   "lantern serve")
            proposed = mutate(current.model_copy(deep=True))
            problems = proposed.problems()
            if problems:
                raise InvalidChange(problems)
            state = proposed.model_copy(update={"revision": current.revision + 1, "changed_at": time.time(),
                                                "last_change": description})
            if self._swap(current.revision, state):
                return state
        now = self.stamp()
        raise ChangeConflict(f"endpoint {self.endpoint} was changed {CHANGE_ATTEMPTS} times by others while this "
                             f"change was being made (now at revision {now}); nothing changed: send it again",
                             "concurrent_change")


def legacy_state_path(endpoint: str) -> Path:
    return endpoint_dir(endpoint) / LEGACY_STATE_FILE
