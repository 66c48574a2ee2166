"""Explanation jobs in the state database (serving/control/database.py): accepted by any worker of any host, claimed
and run by one, polled, fetched and cancelled through any. A job's images wait in the database until it ends; each
explained label's PNG and attributions are kept there until the result expires (a large image's in the registry's
artifact store, serving/control/job_files.py, named there), so every replica answers for every job and a restarted
server keeps finished results. A job whose worker stops beating (its host died) goes back to the queue once; the
images it finished stay done."""

from __future__ import annotations

import io
import json
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import Connection, Engine, and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from explain.encoding import AttributionEncoding
from explain.params import Method
from serving.config import Strict
from serving.control.database import (
    endpoint_states,
    explain_job_images,
    explain_job_outputs,
    explain_jobs,
    state_engine,
    unreachable,
)
from serving.control.errors import (
    JobExpired,
    JobFinished,
    JobNotFinished,
    JobQueueFull,
    StateUnavailable,
    UnknownJob,
)
from serving.control.job_files import JobFiles

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ImageState = Literal["pending", "succeeded", "failed"]
ACTIVE: tuple[JobState, ...] = ("queued", "running")
STALE_S = 15.0  # a running job whose worker has not beaten for this long is taken back (its host died)
MAX_ATTEMPTS = 2  # a job is run again once after its worker died; then it fails
REMOVE_AFTER_EXPIRY_S = 86400.0  # an expired job answers 410 this long, then 404 (its row is removed)
ID_BYTES = 24  # 192 random bits: ids are unguessable
WRITE_ATTEMPTS = 6  # SQLite refuses a transaction that read before another wrote: it is made again
T = TypeVar("T")
MAX_PARAMETERS = 64
MAX_TARGETS = 64  # labels explained in one request (each one an explanation)


class ExplanationOptions(Strict):
    """The explanation asked of each image: what `/explain` takes besides the image (a job keeps them)."""

    method: Method = "xrai"
    params: dict[str, Any] = Field(default_factory=dict, max_length=MAX_PARAMETERS,
                                   description="the method's parameters, e.g. {\"n_steps\": 50}")
    targets: list[str] | None = Field(None, max_length=MAX_TARGETS,
                                      description="labels to explain instead of the prediction (leave out to explain "
                                                  "the prediction)")
    visualizations: bool = True
    attributions: bool = True
    attributions_encoding: AttributionEncoding = "npy_base64"

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, targets: list[str] | None) -> list[str] | None:
        if targets is not None and not targets:
            raise ValueError("no label given; name at least one, or leave targets out to explain the prediction")
        return targets

    def named_labels(self) -> list[str] | None:
        """The labels named, each once (in the order first named), or None: the prediction's are explained."""
        return list(dict.fromkeys(self.targets)) if self.targets else None


class ImageError(BaseModel):
    """Why one image of a job was not explained (the code and message `/explain` would have answered)."""

    code: str
    message: str


class JobImage(BaseModel):
    """One image of a job, as its poll shows it."""

    index: int
    name: str
    state: ImageState
    labels: int = Field(0, description="explanations made of it (one per label)")
    targets: list[str] | None = Field(None, description=(
        "the labels it is explained for: those named, or its prediction's (chosen when the job starts)"))
    error: ImageError | None = None


class Job(BaseModel):
    """A job as stored."""

    id: str
    endpoint: str
    state: JobState
    deployment: str
    model_version: str
    options: ExplanationOptions
    total: int
    batch: bool = Field(description="sent as a batch (its result is one), or as one image")
    images_done: int
    labels_done: int
    labels_total: int | None = Field(None, description=(
        "explanations the job makes: known when it is accepted if labels were named, else once it has started "
        "and predicted each image (a multi-label image may have several labels, or none)"))
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    attempts: int = 0
    error: str | None = None
    images: list[JobImage] = Field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.state not in ACTIVE


class NewImage(BaseModel):
    """An image of a job being submitted."""

    name: str
    data: bytes


class Output(BaseModel):
    """One explained label of one image: its 2 x 2 PNG and its attributions [3, crop, crop]."""

    label: str
    visualization: bytes
    attributions: bytes  # .npy, float32

    @staticmethod
    def npy(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array.astype(np.float32), allow_pickle=False)
        return buffer.getvalue()

    def array(self) -> np.ndarray:
        return np.load(io.BytesIO(self.attributions), allow_pickle=False)


class PendingImage(BaseModel):
    """An image a job has still to explain."""

    position: int
    name: str
    targets: list[str] | None = Field(None, description="the labels to explain; None until its prediction is made")


class ImageResult(BaseModel):
    """One image's part of a job's result."""

    index: int
    name: str
    state: ImageState
    error: ImageError | None = None
    fidelity: dict[str, Any] | None = None
    outputs: list[Output] = Field(default_factory=list)


class JobStore:
    """The jobs of one endpoint in the state database; with `files`, an image's explanations over `inline_bytes`
    are kept there (the registry's artifact store) and the database names them."""

    def __init__(self, endpoint: str, uri: str, files: JobFiles | None = None, inline_bytes: int = 0) -> None:
        self.endpoint = endpoint
        self.uri = uri
        self.files = files
        self.inline_bytes = inline_bytes

    @property
    def engine(self) -> Engine:
        return state_engine(self.uri)

    # transactions ------------------------------------------------------------------------------------------------
    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        try:
            with self.engine.connect() as connection:
                yield connection
        except SQLAlchemyError as error:
            raise StateUnavailable(unreachable(self.uri, error)) from None

    def _write(self, change: Callable[[Connection], T]) -> T:
        """`change` in one transaction, made again when SQLite refused it for a write that came between."""
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with self.engine.begin() as connection:
                    return change(connection)
            except OperationalError as error:
                locked = "locked" in str(error) or "busy" in str(error).lower()
                if not locked or attempt == WRITE_ATTEMPTS - 1:
                    raise StateUnavailable(unreachable(self.uri, error)) from None
                time.sleep(0.05 * (attempt + 1))
            except SQLAlchemyError as error:
                raise StateUnavailable(unreachable(self.uri, error)) from None
        raise AssertionError("unreachable")

    # submitting, polling, cancelling ------------------------------------------------------------------------------
    def submit(self, deployment: str, model_version: str, options: ExplanationOptions, images: list[NewImage],
               batch: bool, max_queued: int) -> Job:
        """A new queued job, or JobQueueFull when the endpoint has `max_queued` jobs queued or running."""
        job_id = secrets.token_urlsafe(ID_BYTES)
        now = time.time()
        named = options.named_labels()

        def add(connection: Connection) -> None:
            # submissions of one endpoint one at a time, so two at once cannot both take the last place (PostgreSQL
            # locks the endpoint's state row; SQLite lets one writer in at a time, and makes the other try again)
            connection.execute(select(endpoint_states.c.revision).where(
                endpoint_states.c.endpoint == self.endpoint).with_for_update())
            active = connection.execute(select(func.count()).select_from(explain_jobs).where(
                explain_jobs.c.endpoint == self.endpoint, explain_jobs.c.state.in_(ACTIVE))).scalar_one()
            if active >= max_queued:
                raise JobQueueFull(f"endpoint {self.endpoint} has {active} explanation jobs queued or running, its "
                                   f"limit (limits.max_queued_jobs = {max_queued}); retry when one has finished")
            connection.execute(insert(explain_jobs).values(
                id=job_id, endpoint=self.endpoint, state="queued", deployment=deployment, model_version=model_version,
                options=options.model_dump_json(), total=len(images), batch=batch, images_done=0, labels_done=0,
                labels_total=len(named) * len(images) if named else None, created_at=now, attempts=0))
            connection.execute(insert(explain_job_images), [
                {"job": job_id, "position": i, "name": image.name, "image": image.data, "state": "pending",
                 "targets": json.dumps(named) if named else None}
                for i, image in enumerate(images)])

        self._write(add)
        return self.get(job_id)

    def get(self, job_id: str, lifetime_s: float | None = None) -> Job:
        """The job with its images' states (UnknownJob; JobExpired once its result is older than `lifetime_s`)."""
        with self._reading() as connection:
            row = connection.execute(select(explain_jobs).where(
                explain_jobs.c.id == job_id, explain_jobs.c.endpoint == self.endpoint)).mappings().first()
            if row is None:
                raise UnknownJob(f"endpoint {self.endpoint} has no explanation job {job_id}")
            job = self._job(row)
            self._check_expiry(job, lifetime_s)
            images = connection.execute(
                select(explain_job_images.c.position, explain_job_images.c.name, explain_job_images.c.state,
                       explain_job_images.c.targets, explain_job_images.c.error)
                .where(explain_job_images.c.job == job_id).order_by(explain_job_images.c.position)).all()
            labels = dict(connection.execute(
                select(explain_job_outputs.c.position, func.count()).where(explain_job_outputs.c.job == job_id)
                .group_by(explain_job_outputs.c.position)).all())
        job.images = [JobImage(index=position, name=name, state=state, labels=labels.get(position, 0),
                               targets=json.loads(targets) if targets else None,
                               error=ImageError.model_validate_json(error) if error else None)
                      for position, name, state, targets, error in images]
        return job

    @staticmethod
    def _job(row: Any) -> Job:
        values = dict(row)
        values["options"] = ExplanationOptions.model_validate_json(values["options"])
        values.pop("heartbeat", None)
        return Job.model_validate(values)

    @staticmethod
    def _check_expiry(job: Job, lifetime_s: float | None) -> None:
        if lifetime_s is not None and job.finished_at is not None and time.time() > job.finished_at + lifetime_s:
            expired = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job.finished_at + lifetime_s))
            raise JobExpired(f"explanation job {job.id} {job.state} and its result expired at {expired} "
                             f"(limits.job_result_seconds = {lifetime_s:.0f})")

    def cancel(self, job_id: str, lifetime_s: float | None = None) -> Job:
        """Cancel a queued or running job (its worker stops within one step of the method); JobFinished for a job
        that already ended."""
        now = time.time()

        def stop(connection: Connection) -> int:
            return connection.execute(update(explain_jobs).where(
                explain_jobs.c.id == job_id, explain_jobs.c.endpoint == self.endpoint,
                explain_jobs.c.state.in_(ACTIVE)).values(state="cancelled", finished_at=now)).rowcount

        if not self._write(stop):
            job = self.get(job_id, lifetime_s)
            raise JobFinished(f"explanation job {job.id} has already {job.state}; there is nothing to cancel")
        self._drop_inputs(job_id)
        return self.get(job_id)

    def result(self, job_id: str, lifetime_s: float | None = None) -> tuple[Job, list[ImageResult]]:
        """A succeeded job and each image's explanations (JobNotFinished for any other state)."""
        job = self.get(job_id, lifetime_s)
        if job.state != "succeeded":
            where = (f" ({job.images_done} of {job.total} images done); poll GET /explain/jobs/{job.id}"
                     if job.state in ACTIVE else f": {job.error}" if job.error else "")
            raise JobNotFinished(f"explanation job {job.id} is {job.state}{where}; a result is answered once it "
                                 "has succeeded")
        with self._reading() as connection:
            fidelity = dict(connection.execute(select(explain_job_images.c.position, explain_job_images.c.fidelity)
                                               .where(explain_job_images.c.job == job_id)).all())
            outputs = connection.execute(select(explain_job_outputs).where(explain_job_outputs.c.job == job_id)
                                         .order_by(explain_job_outputs.c.position, explain_job_outputs.c.rank))
            rows = list(outputs.mappings())
        by_image: dict[int, list[Output]] = {}
        kept: dict[str, dict[str, bytes]] = {}  # an image's files, read once
        for row in rows:
            visualization, attributions = row["visualization"], row["attributions"]
            if row["location"] is not None:
                if self.files is None:
                    raise StateUnavailable(f"explanation job {job_id}'s result is kept in an artifact store this "
                                           "server was not given")
                if row["location"] not in kept:
                    kept[row["location"]] = self.files.get(row["location"])
                files = kept[row["location"]]
                try:
                    visualization, attributions = files[f"{row['rank']}.png"], files[f"{row['rank']}.npy"]
                except KeyError:
                    raise StateUnavailable(f"the artifact store has lost files of explanation job {job_id} "
                                           f"({row['location']})") from None
            by_image.setdefault(row["position"], []).append(Output(
                label=row["label"], visualization=visualization, attributions=attributions))
        return job, [ImageResult(index=image.index, name=image.name, state=image.state, error=image.error,
                                 fidelity=json.loads(fidelity[image.index]) if fidelity.get(image.index) else None,
                                 outputs=by_image.get(image.index, [])) for image in job.images]

    # running (the worker's side) -----------------------------------------------------------------------------------
    def claim(self, worker: str) -> Job | None:
        """The oldest queued job, now running on `worker`; None when none waits (one read: what every worker asks
        each second). Jobs whose worker went silent are queued again first (or failed, after their second try)."""
        for _ in range(3):  # another worker may claim the same job first: try the next one
            stale = time.time() - STALE_S
            with self._reading() as connection:
                row = connection.execute(
                    select(explain_jobs.c.id, explain_jobs.c.state).where(
                        explain_jobs.c.endpoint == self.endpoint,
                        or_(explain_jobs.c.state == "queued",
                            and_(explain_jobs.c.state == "running", explain_jobs.c.heartbeat < stale)))
                    .order_by(explain_jobs.c.created_at).limit(1)).first()
            if row is None:
                return None
            if row.state == "running":
                self.take_back_stale()
                continue
            now = time.time()

            def take(connection: Connection, job_id: str = row.id, now: float = now) -> int:
                return connection.execute(update(explain_jobs).where(
                    explain_jobs.c.id == job_id, explain_jobs.c.state == "queued").values(
                    state="running", worker=worker, heartbeat=now, attempts=explain_jobs.c.attempts + 1,
                    started_at=func.coalesce(explain_jobs.c.started_at, now))).rowcount

            if self._write(take):
                return self.get(row.id)
        return None

    def take_back_stale(self) -> None:
        """Running jobs whose worker has not beaten for STALE_S: queued again, or failed after MAX_ATTEMPTS."""
        limit = time.time() - STALE_S
        stale = and_(explain_jobs.c.endpoint == self.endpoint, explain_jobs.c.state == "running",
                     explain_jobs.c.heartbeat < limit)

        def take_back(connection: Connection) -> None:
            connection.execute(update(explain_jobs).where(stale, explain_jobs.c.attempts >= MAX_ATTEMPTS).values(
                state="failed", finished_at=time.time(), worker=None,
                error=f"the worker running it stopped answering, {MAX_ATTEMPTS} times"))
            connection.execute(update(explain_jobs).where(stale).values(state="queued", worker=None))

        self._write(take_back)

    def pending_images(self, job_id: str) -> list[PendingImage]:
        """The images a job has still to explain, in order, with the labels each is explained for once chosen."""
        with self._reading() as connection:
            return [PendingImage(position=position, name=name, targets=json.loads(targets) if targets else None)
                    for position, name, targets in connection.execute(
                        select(explain_job_images.c.position, explain_job_images.c.name, explain_job_images.c.targets)
                        .where(explain_job_images.c.job == job_id, explain_job_images.c.state == "pending")
                        .order_by(explain_job_images.c.position)).all()]

    def plan(self, job_id: str, worker: str, targets: dict[int, list[str]]) -> bool:
        """Keep the labels each pending image is explained for (`targets`: position -> labels, its prediction's),
        and the job's total of explanations with them; False when the job is no longer this worker's."""
        def keep(connection: Connection) -> bool:
            if not connection.execute(update(explain_jobs).where(self._mine(job_id, worker)).values(
                    heartbeat=time.time())).rowcount:
                return False
            for position, labels in targets.items():
                connection.execute(update(explain_job_images).where(
                    explain_job_images.c.job == job_id, explain_job_images.c.position == position).values(
                    targets=json.dumps(labels)))
            self._count_labels(connection, job_id)
            return True

        return self._write(keep)

    @staticmethod
    def _count_labels(connection: Connection, job_id: str) -> None:
        """The job's labels_total: the labels made so far, and those its pending images are to be explained for
        (None while one of them has none chosen yet)."""
        pending = connection.execute(select(explain_job_images.c.targets).where(
            explain_job_images.c.job == job_id, explain_job_images.c.state == "pending")).scalars().all()
        made = connection.execute(select(func.count()).select_from(explain_job_outputs).where(
            explain_job_outputs.c.job == job_id)).scalar_one()
        total = None if any(t is None for t in pending) else made + sum(len(json.loads(t)) for t in pending)
        connection.execute(update(explain_jobs).where(explain_jobs.c.id == job_id).values(labels_total=total))

    def image_bytes(self, job_id: str, position: int) -> bytes:
        """One pending image's bytes (read when its turn comes: a batch's images are never all in memory)."""
        with self._reading() as connection:
            data = connection.execute(select(explain_job_images.c.image).where(
                explain_job_images.c.job == job_id, explain_job_images.c.position == position)).scalar()
        return data or b""

    def beat(self, job_id: str, worker: str) -> JobState | None:
        """Record that `worker` still runs the job; the job's state now (None: it is no longer this worker's)."""
        def touch(connection: Connection) -> JobState | None:
            connection.execute(update(explain_jobs).where(
                explain_jobs.c.id == job_id, explain_jobs.c.worker == worker, explain_jobs.c.state == "running")
                .values(heartbeat=time.time()))
            row = connection.execute(select(explain_jobs.c.state, explain_jobs.c.worker).where(
                explain_jobs.c.id == job_id)).first()
            return row.state if row is not None and row.worker == worker else None

        return self._write(touch)

    def _mine(self, job_id: str, worker: str) -> Any:
        return and_(explain_jobs.c.id == job_id, explain_jobs.c.worker == worker, explain_jobs.c.state == "running")

    def image_done(self, job_id: str, worker: str, position: int, outputs: list[Output],
                   fidelity: dict[str, Any] | None) -> bool:
        """Keep one image's explanations (in the database, or as files when they are large); False when the job is
        no longer this worker's to run (cancelled)."""
        size = sum(len(output.visualization) + len(output.attributions) for output in outputs)
        location = None
        if self.files is not None and outputs and size > self.inline_bytes:
            location = self.files.put(job_id, position, {
                name: data for rank, output in enumerate(outputs)
                for name, data in ((f"{rank}.png", output.visualization), (f"{rank}.npy", output.attributions))})

        def keep(connection: Connection) -> bool:
            counted = connection.execute(update(explain_jobs).where(self._mine(job_id, worker)).values(
                images_done=explain_jobs.c.images_done + 1,
                labels_done=explain_jobs.c.labels_done + len(outputs), heartbeat=time.time())).rowcount
            if not counted:
                return False
            connection.execute(delete(explain_job_outputs).where(explain_job_outputs.c.job == job_id,
                                                                 explain_job_outputs.c.position == position))
            if outputs:
                connection.execute(insert(explain_job_outputs), [
                    {"job": job_id, "position": position, "rank": rank, "label": output.label, "location": location,
                     "visualization": b"" if location else output.visualization,
                     "attributions": b"" if location else output.attributions}
                    for rank, output in enumerate(outputs)])
            connection.execute(update(explain_job_images).where(
                explain_job_images.c.job == job_id, explain_job_images.c.position == position).values(
                state="succeeded", image=None, fidelity=json.dumps(fidelity) if fidelity is not None else None))
            return True

        kept = self._write(keep)
        if not kept and location is not None:
            self.files.delete(location)
        return kept

    def image_failed(self, job_id: str, worker: str, position: int, error: ImageError) -> bool:
        """Record why one image was not explained (the rest of the job goes on)."""
        def keep(connection: Connection) -> bool:
            counted = connection.execute(update(explain_jobs).where(self._mine(job_id, worker)).values(
                images_done=explain_jobs.c.images_done + 1, heartbeat=time.time())).rowcount
            if counted:
                connection.execute(update(explain_job_images).where(
                    explain_job_images.c.job == job_id, explain_job_images.c.position == position).values(
                    state="failed", image=None, error=error.model_dump_json()))
                self._count_labels(connection, job_id)  # its labels will not be explained
            return bool(counted)

        return self._write(keep)

    def finish(self, job_id: str, worker: str, error: str | None = None) -> bool:
        """The job ended on `worker`: succeeded (each image explained or failed on its own), or failed as a whole
        with `error`."""
        values = {"state": "failed" if error else "succeeded", "finished_at": time.time(), "error": error}
        done = self._write(lambda connection: connection.execute(
            update(explain_jobs).where(self._mine(job_id, worker)).values(**values)).rowcount)
        self._drop_inputs(job_id)
        return bool(done)

    def release(self, job_id: str, worker: str) -> None:
        """Put a job this worker was running back in the queue (the worker is stopping), this try not counted."""
        self._write(lambda connection: connection.execute(update(explain_jobs).where(self._mine(job_id, worker))
                                                          .values(state="queued", worker=None,
                                                                  attempts=explain_jobs.c.attempts - 1)))

    def _drop_inputs(self, job_id: str) -> None:
        """The images of an ended job: no longer needed."""
        self._write(lambda connection: connection.execute(update(explain_job_images).where(
            explain_job_images.c.job == job_id, explain_job_images.c.image.is_not(None)).values(image=None)))

    def active_count(self) -> int:
        with self._reading() as connection:
            return connection.execute(select(func.count()).select_from(explain_jobs).where(
                explain_jobs.c.endpoint == self.endpoint, explain_jobs.c.state.in_(ACTIVE))).scalar_one()

    def purge(self, lifetime_s: float) -> int:
        """Remove the results of jobs that finished more than `lifetime_s` ago (they answer 410 from then on), and
        the jobs themselves a day later (404); returns how many explanations were removed."""
        now = time.time()
        expired = select(explain_jobs.c.id).where(explain_jobs.c.endpoint == self.endpoint,
                                                  explain_jobs.c.finished_at < now - lifetime_s)
        gone = select(explain_jobs.c.id).where(explain_jobs.c.endpoint == self.endpoint,
                                               explain_jobs.c.finished_at < now - lifetime_s - REMOVE_AFTER_EXPIRY_S)

        if self.files is not None:  # their files first: a purge that fails there is made again
            with self._reading() as connection:
                with_files = connection.execute(select(explain_job_outputs.c.job).distinct().where(
                    explain_job_outputs.c.job.in_(expired),
                    explain_job_outputs.c.location.is_not(None))).scalars().all()
            for job_id in with_files:
                self.files.delete(job_id)

        def remove(connection: Connection) -> int:
            count = connection.execute(delete(explain_job_outputs).where(
                explain_job_outputs.c.job.in_(expired))).rowcount
            connection.execute(delete(explain_job_images).where(explain_job_images.c.job.in_(gone)))
            connection.execute(delete(explain_jobs).where(explain_jobs.c.id.in_(gone)))
            return count

        return self._write(remove)
