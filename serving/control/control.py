"""The control plane's changes and views: add, update and remove deployments, set the live split and the mirror,
regenerate keys, and say what every worker serves. Each change is checked as a whole and applied to the persisted
state in one step, or refused with nothing changed."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import BaseModel, Field, ValidationError

from registry.errors import LanternError
from serving.config import DeploymentConfig, EndpointConfig, describe_fields
from serving.control.auth import KeyKind, key_digest, regenerate_key
from serving.control.checks import check_deployment, mixed_tasks_problem, version_task
from serving.control.counters import DeploymentCounters, deployment_counters, summed
from serving.control.errors import ChangeConflict, InvalidDeployment, StateMissing, StateUnavailable, UnknownDeployment
from serving.control.state import DeploymentRecord, EndpointState, StateStore
from serving.control.workers import GpuMemory, InstanceStatus, StatusBoard, WorkerStatus

UPDATE_ATTEMPTS = 5  # merges of one PATCH on a record other changes keep replacing, before it is refused with 409
AggregateState = Literal["loading", "ready", "unready", "failed", "updating"]


class DeploymentView(BaseModel):
    """A deployment as the whole endpoint serves it (every worker process)."""

    name: str
    model: str
    generation: int
    state: AggregateState = Field(description="ready: every worker serves the latest generation; updating: a new "
                                              "generation is being readied while the previous one serves")
    reason: str | None = None
    ready_everywhere: bool = Field(description="every worker has a ready instance (of any generation)")
    model_version: str | None = None
    traffic: int
    mirror_traffic: int
    config: DeploymentConfig
    settings: dict[str, Any] | None = Field(None, description="the settings in force: the version's settings.json "
                                                              "with the overrides (once loaded)")
    labels: list[str] | None = None
    workers: dict[str, InstanceStatus]
    counters: DeploymentCounters = Field(description="summed over every host (each host's own are on its /metrics)")


class WorkerView(BaseModel):
    worker: str = Field(description="HOST/PID")
    host: str = Field(description="the host (one `lantern serve`, a replica) the worker belongs to")
    revision: int
    seconds_since_heartbeat: float
    memory_bytes: int | None = Field(None, description="the worker process's resident memory")
    gpu_memory: list[GpuMemory] = Field(default_factory=list, description="each GPU its deployments run on")


class StateDatabaseStatus(BaseModel):
    """Whether this worker reaches the state database; while it does not, the worker serves on with the revision it
    applied last, and changes are refused with 503 until the database answers again."""

    reachable: bool
    problem: str | None = Field(None, description="why it is not reachable (the driver's words)")
    serving_revision: int = Field(description="the revision this worker serves")


class EndpointView(BaseModel):
    name: str
    revision: int
    last_change: str
    changed_at: float
    applied: bool = Field(description="every live worker of every host has applied this revision")
    traffic: dict[str, int]
    mirror_traffic: dict[str, int]
    deployments: list[DeploymentView]
    workers: list[WorkerView]
    key_fingerprints: dict[str, str] = Field(description="first 8 hex digits of each key's sha256")
    state_database: StateDatabaseStatus = Field(description="reachable: the view is the database's; not: it is this "
                                                            "worker's last applied state, its workers and counters")


class KeyRegenerated(BaseModel):
    kind: KeyKind
    key: str = Field(description="shown once: store it now")
    revision: int
    stored_in: str | None = Field(description="the keys file of the host that made it; None when that host's keys "
                                              "come from the environment: put the new key there (the Secret), the "
                                              "old one no longer works")


def _aggregate(record: DeploymentRecord, statuses: list[InstanceStatus | None]) -> tuple[AggregateState, str | None]:
    generation, count = record.generation, len(statuses)
    missing = sum(status is None for status in statuses)
    if not statuses or missing:
        return "loading", f"{missing or 'no'} of {count} worker(s) have not started it yet"
    present = [status for status in statuses if status is not None]
    for status in present:
        if status.generation == generation and status.state == "failed":
            return "failed", status.reason
        if status.next_generation == generation and status.next_state == "failed":
            return "failed", f"generation {generation} failed ({status.next_reason}); generation " \
                             f"{status.generation} still serves"
    behind = [status for status in present if status.generation != generation]
    if behind:
        return "updating", (f"generation {generation} is being readied in {len(behind)} of {count} worker(s); "
                            f"generation {behind[0].generation} serves meanwhile")
    states = {status.state for status in present}
    if states == {"ready"}:
        return "ready", None
    if "unready" in states:
        return "unready", next(s.reason for s in present if s.state == "unready")
    return "loading", None


@dataclass(frozen=True)
class ServedModel:
    """What a deployment's generation serves in this worker, as the management views show it."""

    settings: dict[str, Any]  # the version's settings with the deployment's overrides, as JSON
    labels: list[str]


class ServingWorker(Protocol):
    """What the management operations need of the worker that serves them (`serving.runtime.endpoint.Endpoint`)."""

    config: EndpointConfig
    tracking_uri: str | None
    store: StateStore
    board: StatusBoard
    state: EndpointState  # the state it serves (the last one it applied)
    state_problem: str | None  # why following the state fails now; None while it works

    def status(self) -> WorkerStatus: ...

    def refresh(self) -> None: ...

    def served_model(self, name: str, generation: int) -> ServedModel | None: ...


class Control:
    """The management operations of one worker's endpoint (the state they change is shared by every worker)."""

    def __init__(self, endpoint: ServingWorker) -> None:
        self.endpoint = endpoint
        self.store = endpoint.store

    # views -----------------------------------------------------------------------------------------------------------
    def current(self) -> EndpointState:
        state = self.store.read()
        if state is None:
            raise StateMissing("the endpoint state is missing; restart the server")
        return state

    def workers(self) -> list[WorkerStatus]:
        """Every live worker's status, this worker's taken fresh."""
        mine = self.endpoint.status()
        return [mine, *[w for w in self.endpoint.board.live() if w.worker != mine.worker]]

    def deployment_view(self, record: DeploymentRecord, state: EndpointState, workers: list[WorkerStatus],
                        counters: dict[str, DeploymentCounters]) -> DeploymentView:
        name = record.config.name
        statuses = [worker.deployments.get(name) for worker in workers]
        aggregate, reason = _aggregate(record, statuses)
        version = next((s.model_version for s in statuses if s and s.generation == record.generation
                        and s.model_version), record.model_version)
        model = self.endpoint.served_model(name, record.generation)
        return DeploymentView(
            name=name, model=record.config.model, generation=record.generation, state=aggregate, reason=reason,
            ready_everywhere=bool(statuses) and all(s is not None and s.state == "ready" for s in statuses),
            model_version=version, traffic=state.traffic.get(name, 0),
            mirror_traffic=state.mirror_traffic.get(name, 0), config=record.config,
            settings=model.settings if model else None,
            labels=model.labels if model else None,
            workers={w.worker: s for w, s in zip(workers, statuses) if s is not None},
            counters=counters.get(name, DeploymentCounters()))

    def counters(self, workers: list[WorkerStatus]) -> dict[str, DeploymentCounters]:
        """The endpoint's counters: this host's read now, plus each other host's as its latest worker published them
        (a canary failing on one host shows in the sum every host answers with)."""
        here = workers[0].host
        latest: dict[str, WorkerStatus] = {}
        for worker in workers[1:]:
            if worker.host != here and (worker.host not in latest
                                        or worker.heartbeat > latest[worker.host].heartbeat):
                latest[worker.host] = worker
        return summed([deployment_counters(), *(worker.host_counters for worker in latest.values())])

    def deployments(self, state: EndpointState | None = None,
                    workers: list[WorkerStatus] | None = None) -> list[DeploymentView]:
        state = state or self.current()
        workers = self.workers() if workers is None else workers
        counters = self.counters(workers)
        return [self.deployment_view(record, state, workers, counters) for record in state.deployments]

    def deployment(self, name: str) -> DeploymentView:
        state = self.current()
        record = self._record(state, name)
        workers = self.workers()
        return self.deployment_view(record, state, workers, self.counters(workers))

    def view(self) -> EndpointView:
        """The endpoint as the state database has it; while the database does not answer, as this worker serves it
        (its last applied state, itself alone among the workers, this host's counters), saying so."""
        try:
            state, problem = self.current(), None
            workers = self.workers()
        except StateUnavailable as error:
            state, problem = self.endpoint.state, str(error)
            workers = [self.endpoint.status()]
        problem = problem or self.endpoint.state_problem
        now = time.time()
        return EndpointView(
            name=state.endpoint, revision=state.revision, last_change=state.last_change, changed_at=state.changed_at,
            applied=all(w.revision >= state.revision for w in workers), traffic=state.traffic,
            mirror_traffic=state.mirror_traffic, deployments=self.deployments(state, workers),
            workers=[WorkerView(worker=w.worker, host=w.host, revision=w.revision,
                                seconds_since_heartbeat=round(max(0.0, now - w.heartbeat), 3),
                                memory_bytes=w.memory_bytes, gpu_memory=w.gpu_memory) for w in workers],
            key_fingerprints={kind: getattr(state.keys, kind)[:8] for kind in ("primary", "secondary", "admin")},
            state_database=StateDatabaseStatus(reachable=problem is None, problem=problem,
                                               serving_revision=self.endpoint.state.revision))

    def _record(self, state: EndpointState, name: str) -> DeploymentRecord:
        record = state.record(name)
        if record is None:
            raise UnknownDeployment(f"endpoint {state.endpoint} has no deployment {name!r}; deployments: "
                                    f"{', '.join(state.names) or 'none'}")
        return record

    # changes ---------------------------------------------------------------------------------------------------------
    def _check_model(self, config: DeploymentConfig, version: str | None = None) -> str:
        """The version the deployment will serve (`version`, else the one its model URI names now), checked."""
        try:
            return check_deployment(config, self.endpoint.tracking_uri, version).version
        except LanternError as error:
            raise InvalidDeployment(f"deployment {config.name}: {error}", "invalid_model") from None

    def _changed(self, state: EndpointState) -> EndpointState:
        self.endpoint.refresh()
        return state

    def add(self, config: DeploymentConfig) -> DeploymentView:
        """A new deployment with 0 % traffic; it loads and warms up in every worker in the background."""
        if self.current().record(config.name) is not None:
            raise ChangeConflict(f"deployment {config.name} exists; update it (PATCH) or choose another name",
                                 "deployment_exists")
        version = self._check_model(config)

        def mutate(state: EndpointState) -> EndpointState:
            if state.record(config.name) is not None:
                raise ChangeConflict(f"deployment {config.name} exists", "deployment_exists")
            state.deployments.append(DeploymentRecord(config=config, model_version=version))
            state.traffic.setdefault(config.name, 0)
            return state

        self._changed(self.store.change(mutate, f"added deployment {config.name} ({config.model})"))
        return self.deployment(config.name)

    def update(self, name: str, patch: dict[str, Any]) -> DeploymentView:
        """Merge `patch` (JSON merge patch: objects merge, null removes) into the deployment's configuration; a new
        generation is readied in every worker, then swapped in, while the current one keeps serving. The version
        stays the one the deployment serves unless `patch` names `model` (the same alias again: the version it names
        now).

        The merge is made on the record as it is read, and written only if the record is still that one when the
        state is changed (a compare-and-set under the state's lock): an update that lost the race to another is
        merged again on the newer record, so concurrent patches of different fields both hold."""
        if "name" in patch and patch["name"] != name:
            raise InvalidDeployment("a deployment cannot be renamed: add a new one and move the traffic",
                                    "invalid_change")
        for _ in range(UPDATE_ATTEMPTS):
            record = self._record(self.current(), name)
            merged = merge_patch(record.config.model_dump(mode="json"), patch)
            try:
                config = DeploymentConfig.model_validate(merged)
            except ValidationError as error:
                raise InvalidDeployment(describe_fields(error, f"deployment {name}")) from None
            resolve = "model" in patch or config.model != record.config.model
            if config == record.config and not resolve:
                return self.deployment(name)
            version = self._check_model(config, None if resolve else record.model_version)
            if config == record.config and version == record.model_version:
                return self.deployment(name)  # its alias names the version it serves
            tasks: dict[str, str] = {}  # version -> task, asked of the registry once for this change

            def mutate(state: EndpointState, read: DeploymentRecord = record, config: DeploymentConfig = config,
                       version: str | None = version, tasks: dict[str, str] = tasks) -> EndpointState:
                current = self._record(state, name)
                if current != read:
                    raise _ChangedMeanwhile()
                state.deployments = [DeploymentRecord(config=config, generation=current.generation + 1,
                                                      model_version=version)
                                     if r.config.name == name else r for r in state.deployments]
                self._one_task(state, tasks)
                return state

            moved = f" to {version}" if version != record.model_version else ""
            try:
                self._changed(self.store.change(mutate, f"updated deployment {name}{moved}"))
            except _ChangedMeanwhile:
                continue
            return self.deployment(name)
        raise ChangeConflict(f"deployment {name} was changed by {UPDATE_ATTEMPTS} other requests while this update "
                             "was being made; nothing changed: send it again", "concurrent_change")

    def remove(self, name: str) -> EndpointState:
        """Remove a deployment that has no live traffic and is not mirrored to."""

        def mutate(state: EndpointState) -> EndpointState:
            self._record(state, name)
            if state.traffic.get(name, 0) > 0:
                raise ChangeConflict(f"deployment {name} has {state.traffic[name]} % of the live traffic; move it to "
                                     "other deployments first", "deployment_has_traffic")
            if state.mirror_traffic.get(name, 0) > 0:
                raise ChangeConflict(f"deployment {name} gets {state.mirror_traffic[name]} % mirrored traffic; stop "
                                     "the mirror first", "deployment_is_mirrored")
            state.deployments = [r for r in state.deployments if r.config.name != name]
            state.traffic.pop(name, None)
            state.mirror_traffic.pop(name, None)
            return state

        return self._changed(self.store.change(mutate, f"removed deployment {name}"))

    def _task_of(self, version: str, tasks: dict[str, str]) -> str | None:
        """The task of `version`, remembered in `tasks` (a change made again on a newer state asks once)."""
        if version not in tasks:
            try:
                tasks[version] = version_task(version, self.endpoint.tracking_uri)
            except LanternError:
                return None  # a version gone from the registry: its deployment fails to load, saying why
        return tasks[version]

    def _one_task(self, state: EndpointState, tasks: dict[str, str]) -> None:
        """Refuse a state whose split (live and mirrored) covers deployments of different tasks: they answer in
        different formats. Checked on the state as it is written, so two changes made at once cannot mix tasks."""
        split = {name for shares in (state.traffic, state.mirror_traffic) for name, percent in shares.items()
                 if percent}
        served = {r.config.name: self._task_of(r.model_version, tasks) for r in state.deployments
                  if r.config.name in split and r.model_version is not None}
        problem = mixed_tasks_problem({name: task for name, task in served.items() if task is not None},
                                      "the traffic (live and mirrored)")
        if problem:
            raise InvalidDeployment(problem + ". Nothing changed", "mixed_tasks")

    def set_traffic(self, traffic: dict[str, int]) -> EndpointState:
        """Replace the live split (deployments left out get 0 %); a deployment whose share grows must be ready in
        every worker, and every deployment with a share serve one task."""
        current, workers = self.current(), self.workers()
        tasks: dict[str, str] = {}
        ready = {r.config.name: self.deployment_view(r, current, workers, {}) for r in current.deployments}

        def mutate(state: EndpointState) -> EndpointState:
            before = dict(state.traffic)
            proposed = {name: 0 for name in state.names} | traffic
            state.traffic = proposed
            if state.problems():
                return state  # refused as a whole by the store, every problem named
            self._one_task(state, tasks)
            not_ready = [f"{name} ({ready[name].state}{': ' + ready[name].reason if ready[name].reason else ''})"
                         for name, percent in proposed.items()
                         if percent > before.get(name, 0) and name in ready
                         and not ready[name].ready_everywhere]
            if not_ready:
                raise ChangeConflict(f"only ready deployments get live traffic; not ready in every worker: "
                                     f"{', '.join(not_ready)}. Nothing changed", "deployment_not_ready")
            return state

        split = ", ".join(f"{n}={p}" for n, p in traffic.items())
        return self._changed(self.store.change(mutate, f"traffic set to {split}"))

    def set_mirror(self, mirror: dict[str, int]) -> EndpointState:
        """Replace the mirrored share (one deployment at most, at most 50 %, with no live traffic, of the live
        deployments' task)."""
        tasks: dict[str, str] = {}

        def mutate(state: EndpointState) -> EndpointState:
            state.mirror_traffic = {name: percent for name, percent in mirror.items()}
            if not state.problems():
                self._one_task(state, tasks)
            return state

        split = ", ".join(f"{n}={p}" for n, p in mirror.items()) or "off"
        return self._changed(self.store.change(mutate, f"mirror traffic set to {split}"))

    def regenerate(self, kind: KeyKind) -> KeyRegenerated:
        """A new key of `kind`; the old one stops working in every worker within a second."""
        key, stored_in = regenerate_key(self.endpoint.config.name, kind)

        def mutate(state: EndpointState) -> EndpointState:
            state.keys = state.keys.model_copy(update={kind: key_digest(key)})
            return state

        state = self._changed(self.store.change(mutate, f"regenerated the {kind} key"))
        return KeyRegenerated(kind=kind, key=key, revision=state.revision, stored_in=stored_in)


class _ChangedMeanwhile(Exception):
    """The deployment's record is not the one an update was merged on any more."""


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result
