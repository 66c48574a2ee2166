"""Explanation jobs in the state database, on the embedded SQLite file and on a real PostgreSQL server: a job's life
from queued to succeeded, the queue limit, cancelling, a worker that dies (taken back once, then failed), a worker
that stops (released), several processes claiming at once (each job run once), and results that expire."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, update

from serving.control import jobs as job_module
from serving.control.database import explain_job_outputs, explain_jobs
from serving.control.errors import (
    JobExpired,
    JobFinished,
    JobNotFinished,
    JobQueueFull,
    StateUnavailable,
    UnknownJob,
)
from serving.control.job_files import JobFiles
from serving.control.jobs import ExplanationOptions, ImageError, JobStore, NewImage, Output
from support.postgres import Postgres

OPTIONS = ExplanationOptions(method="integrated_gradients", params={"n_steps": 8}, targets=["circle"])
PREDICTED = ExplanationOptions(method="integrated_gradients")  # each image's prediction explained


@pytest.fixture(params=["sqlite", "postgresql"])
def jobs(request: pytest.FixtureRequest, store: str) -> JobStore:
    """The jobs of endpoint `shop` in a fresh state database of each kind."""
    if request.param == "sqlite":
        return JobStore("shop", f"sqlite:///{Path(os.environ['LANTERN_HOME']) / 'state.db'}")
    server: Postgres = request.getfixturevalue("postgres")
    return JobStore("shop", server.database("jobs"))


def images(count: int) -> list[NewImage]:
    return [NewImage(name=f"img{i}.png", data=bytes([i]) * 10) for i in range(count)]


def output(label: str) -> Output:
    return Output(label=label, visualization=b"\x89PNG" + label.encode(),
                  attributions=Output.npy(np.full((3, 4, 4), 0.5, np.float32)))


def pending(jobs: JobStore, job_id: str) -> list[tuple[int, str, list[str] | None]]:
    return [(image.position, image.name, image.targets) for image in jobs.pending_images(job_id)]


def test_a_job_from_queued_to_succeeded(jobs: JobStore) -> None:
    job = jobs.submit("blue", "models:/mc/2", PREDICTED, images(3), True, max_queued=4)
    assert (job.state, job.total, job.batch, job.images_done, job.attempts) == ("queued", 3, True, 0, 0)
    assert len(job.id) >= 32 and [image.state for image in job.images] == ["pending"] * 3
    assert job.labels_total is None  # its labels are its images' predictions: not known before it starts
    with pytest.raises(JobNotFinished, match="is queued"):
        jobs.result(job.id)
    with pytest.raises(UnknownJob):
        jobs.get("not-a-job")
    assert JobStore("other", jobs.uri).claim("w") is None  # another endpoint's queue is its own

    running = jobs.claim("host/1")
    assert running is not None and (running.id, running.state, running.worker, running.attempts) == (
        job.id, "running", "host/1", 1)
    assert jobs.claim("host/2") is None  # nothing else queued
    assert pending(jobs, job.id) == [(0, "img0.png", None), (1, "img1.png", None), (2, "img2.png", None)]
    assert jobs.image_bytes(job.id, 2) == bytes([2]) * 10
    assert jobs.beat(job.id, "host/1") == "running" and jobs.beat(job.id, "host/2") is None

    chosen = {0: ["circle"], 1: ["circle"], 2: ["circle", "square"]}  # a multi-label image: two explanations
    assert not jobs.plan(job.id, "host/2", chosen)  # not that worker's job
    assert jobs.get(job.id).labels_total is None
    assert jobs.plan(job.id, "host/1", chosen)
    assert pending(jobs, job.id)[2] == (2, "img2.png", ["circle", "square"])
    assert jobs.get(job.id).labels_total == 4 and jobs.get(job.id).images[2].targets == ["circle", "square"]

    assert jobs.image_done(job.id, "host/1", 0, [output("circle")], {"method": "integrated_gradients"})
    assert jobs.image_failed(job.id, "host/1", 1, ImageError(code="bad_image", message="not an image"))
    assert jobs.get(job.id).labels_total == 3  # the failed image's label will not be explained
    assert jobs.image_done(job.id, "host/1", 2, [output("circle"), output("square")], None)
    assert pending(jobs, job.id) == []
    polled = jobs.get(job.id)
    assert (polled.images_done, polled.labels_done, polled.labels_total) == (3, 3, 3)
    assert [(i.state, i.labels) for i in polled.images] == [("succeeded", 1), ("failed", 0), ("succeeded", 2)]
    assert polled.images[1].error == ImageError(code="bad_image", message="not an image")

    assert jobs.finish(job.id, "host/1")
    done, results = jobs.result(job.id)
    assert done.state == "succeeded" and done.finished_at is not None
    assert [r.state for r in results] == ["succeeded", "failed", "succeeded"]
    assert [o.label for o in results[2].outputs] == ["circle", "square"]
    assert results[0].fidelity == {"method": "integrated_gradients"}
    np.testing.assert_array_equal(results[0].outputs[0].array(), np.full((3, 4, 4), 0.5, np.float32))
    assert results[0].outputs[0].visualization == b"\x89PNGcircle"
    with pytest.raises(JobFinished, match="has already succeeded"):
        jobs.cancel(job.id)


def test_named_labels_are_known_when_a_job_is_accepted(jobs: JobStore) -> None:
    options = ExplanationOptions(method="xrai", targets=["circle", "square", "circle"])  # one named twice
    job = jobs.submit("blue", "models:/ml/1", options, images(2), True, max_queued=4)
    assert job.labels_total == 4 and [image.targets for image in job.images] == [["circle", "square"]] * 2
    jobs.claim("host/1")
    assert [image.targets for image in jobs.pending_images(job.id)] == [["circle", "square"]] * 2
    jobs.image_failed(job.id, "host/1", 0, ImageError(code="bad_image", message="not an image"))
    assert jobs.get(job.id).labels_total == 2


def test_the_queue_limit_counts_queued_and_running_jobs(jobs: JobStore) -> None:
    first = jobs.submit("blue", "models:/mc/2", OPTIONS, images(1), False, max_queued=2)
    jobs.submit("blue", "models:/mc/2", OPTIONS, images(1), False, max_queued=2)
    assert jobs.claim("host/1").id == first.id  # the oldest first
    with pytest.raises(JobQueueFull, match="2 explanation jobs queued or running"):
        jobs.submit("blue", "models:/mc/2", OPTIONS, images(1), False, max_queued=2)
    jobs.cancel(first.id)
    assert jobs.submit("blue", "models:/mc/2", OPTIONS, images(1), False, max_queued=2).state == "queued"
    assert jobs.active_count() == 2


def test_a_cancelled_job_is_no_longer_its_workers(jobs: JobStore) -> None:
    job = jobs.submit("blue", "models:/mc/2", OPTIONS, images(2), True, max_queued=4)
    jobs.claim("host/1")
    cancelled = jobs.cancel(job.id)
    assert cancelled.state == "cancelled" and cancelled.finished_at is not None
    assert jobs.beat(job.id, "host/1") == "cancelled"  # the worker learns it at its next beat
    assert not jobs.image_done(job.id, "host/1", 0, [output("circle")], None)  # and keeps nothing more
    assert not jobs.finish(job.id, "host/1")
    assert jobs.get(job.id).state == "cancelled" and jobs.get(job.id).images_done == 0
    with pytest.raises(JobNotFinished, match="is cancelled"):
        jobs.result(job.id)


def test_a_job_whose_worker_dies_runs_once_more_then_fails(jobs: JobStore) -> None:
    job = jobs.submit("blue", "models:/mc/2", OPTIONS, images(2), True, max_queued=4)
    jobs.claim("host-a/1")
    jobs.image_done(job.id, "host-a/1", 0, [output("circle")], None)

    def silent_for(seconds: float) -> None:  # the worker's last beat that long ago
        with jobs.engine.begin() as connection:
            connection.execute(update(explain_jobs).where(explain_jobs.c.id == job.id).values(
                heartbeat=time.time() - seconds))

    silent_for(job_module.STALE_S / 2)
    assert jobs.claim("host-b/1") is None  # still beating recently enough
    silent_for(job_module.STALE_S + 1)
    retried = jobs.claim("host-b/1")
    assert retried is not None and (retried.worker, retried.attempts) == ("host-b/1", 2)
    assert [image.position for image in jobs.pending_images(job.id)] == [1]  # image 0 stays done
    assert jobs.beat(job.id, "host-a/1") is None  # the first worker, come back, is told it is not its job

    silent_for(job_module.STALE_S + 1)
    assert jobs.claim("host-c/1") is None
    failed = jobs.get(job.id)
    assert failed.state == "failed" and "stopped answering, 2 times" in failed.error


def test_a_stopping_worker_puts_its_job_back_without_counting_the_try(jobs: JobStore) -> None:
    job = jobs.submit("blue", "models:/mc/2", OPTIONS, images(1), False, max_queued=4)
    jobs.claim("host-a/1")
    jobs.release(job.id, "host-a/1")
    released = jobs.get(job.id)
    assert (released.state, released.worker, released.attempts) == ("queued", None, 0)
    assert jobs.claim("host-b/1").attempts == 1


def _claim_all(uri: str, home: str, found: multiprocessing.Queue) -> None:
    os.environ["LANTERN_HOME"] = home
    store = JobStore("shop", uri)
    claimed = []
    while (job := store.claim(f"host/{os.getpid()}")) is not None:
        claimed.append(job.id)
    found.put(claimed)


def test_workers_claiming_at_once_run_each_job_once(jobs: JobStore) -> None:
    submitted = {jobs.submit("blue", "models:/mc/2", OPTIONS, images(1), False, max_queued=100).id
                 for _ in range(24)}
    context = multiprocessing.get_context("spawn")
    found = context.Queue()
    workers = [context.Process(target=_claim_all, args=(jobs.uri, os.environ["LANTERN_HOME"], found))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    claimed = [found.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    every = [job_id for each in claimed for job_id in each]
    assert sorted(every) == sorted(submitted)  # each claimed once, none twice


def test_results_expire_then_the_job_is_removed(jobs: JobStore) -> None:
    job = jobs.submit("blue", "models:/mc/2", OPTIONS, images(1), False, max_queued=4)
    jobs.claim("host/1")
    jobs.image_done(job.id, "host/1", 0, [output("circle")], None)
    jobs.finish(job.id, "host/1")
    assert jobs.result(job.id, lifetime_s=60)[0].state == "succeeded"
    time.sleep(0.3)
    with pytest.raises(JobExpired, match=f"explanation job {job.id} succeeded and its result expired at"):
        jobs.get(job.id, lifetime_s=0.1)
    assert jobs.purge(lifetime_s=0.1) == 1  # its explanations removed; the job still answers 410
    with pytest.raises(JobExpired):
        jobs.result(job.id, lifetime_s=0.1)
    assert jobs.purge(lifetime_s=-job_module.REMOVE_AFTER_EXPIRY_S) == 0  # a day after expiry: the job is gone
    with pytest.raises(UnknownJob):
        jobs.get(job.id)


def test_large_results_are_kept_as_files_in_the_artifact_store(jobs: JobStore, store: str) -> None:
    """An image's explanations over the inline limit are files under the registry's artifact location (here the
    embedded store's, on local disk), named in the database; read back as kept, and removed with the result."""
    files = JobStore(jobs.endpoint, jobs.uri, JobFiles(jobs.endpoint, store), inline_bytes=500)
    job = files.submit("blue", "models:/ml/1", PREDICTED, images(3), True, max_queued=4)
    files.claim("host/1")
    files.plan(job.id, "host/1", {0: ["circle", "square"], 1: ["circle"], 2: ["square"]})
    two = [output("circle"), output("square")]  # about 650 bytes: files
    assert files.image_done(job.id, "host/1", 0, two, None)
    assert files.image_done(job.id, "host/1", 1, [output("circle")], None)  # about 330 bytes: in the database
    with jobs.engine.connect() as connection:
        rows = connection.execute(select(explain_job_outputs.c.position, explain_job_outputs.c.location,
                                         explain_job_outputs.c.attributions)
                                  .where(explain_job_outputs.c.job == job.id)).all()
    assert sorted((position, location, len(data) > 0) for position, location, data in rows) == [
        (0, f"{job.id}/0", False), (0, f"{job.id}/0", False), (1, None, True)]
    folder = Path(os.environ["LANTERN_HOME"]) / "artifacts"
    kept = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()
                  and job.id in path.as_posix())
    assert kept == [f"explanation-jobs/shop/{job.id}/0/{name}" for name in ("0.npy", "0.png", "1.npy", "1.png")]

    files.cancel(job.id)  # a worker that learns it late keeps nothing: the files it wrote are removed
    assert not files.image_done(job.id, "host/1", 2, [output("square"), output("circle")], None)
    assert not any(folder.rglob(f"{job.id}/2"))

    again = files.submit("blue", "models:/ml/1", PREDICTED, images(1), False, max_queued=4)
    files.claim("host/1")
    files.plan(again.id, "host/1", {0: ["circle", "square"]})
    files.image_done(again.id, "host/1", 0, two, {"method": "xrai"})
    files.finish(again.id, "host/1")
    _, results = files.result(again.id)
    assert [(o.label, o.visualization) for o in results[0].outputs] == [(o.label, o.visualization) for o in two]
    np.testing.assert_array_equal(results[0].outputs[1].array(), two[1].array())
    with pytest.raises(StateUnavailable, match="artifact store this server was not given"):
        jobs.result(again.id)  # a store without files cannot answer for them
    time.sleep(0.2)
    assert files.purge(lifetime_s=0.1) == 5  # both jobs' explanations (3 and 2), and their files
    assert not any(path.is_file() for path in folder.rglob("*") if job.id in path.as_posix()
                   or again.id in path.as_posix())
