"""`lantern explain IMAGE... --url URL --job`: explain images on a running endpoint through an explanation job
(submitted, polled with a progress bar, its result downloaded), so a slow method survives proxies' timeouts. Ctrl+C
cancels the job. HTTP only: nothing of the server is imported."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import mimetypes
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from registry.console import console
from registry.errors import LanternError
from serving.environment import PRIMARY_ENV

POLL_S = 1.0
ENDED = ("succeeded", "failed", "cancelled")


class JobError(LanternError):
    """The endpoint refused the job or a call about it (the message is the server's), or could not be reached."""


class JobClient:
    """The explanation-job routes of one endpoint, with a scoring key."""

    def __init__(self, url: str, key: str | None, timeout_s: float = 60) -> None:
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, timeout=timeout_s, headers=headers)

    def _call(self, method: str, path: str, **request: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **request)
        except httpx.HTTPError as error:
            raise JobError(f"cannot reach the endpoint at {self.url}: {error}") from None
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
                message = f"{error['message']} ({response.status_code} {error['code']})"
            except (ValueError, KeyError, TypeError):
                message = f"{response.status_code}: {response.text[:300]}"
            if response.status_code == 401:
                message += f"; give the endpoint's scoring key with --key or ${PRIMARY_ENV}"
            raise JobError(message)
        return response

    def submit(self, paths: list[Path], method: str, params: dict[str, Any], targets: list[str],
               deployment: str | None = None) -> dict[str, Any]:
        """One job for every image (a batch when there are several); answers the accepted job."""
        query: dict[str, Any] = {"method": method, **{k: json.dumps(v) for k, v in params.items()}}
        if targets:
            query["targets"] = ",".join(targets)
        field = "images" if len(paths) > 1 else "image"
        files = [(field, (path.name, path.read_bytes(), mimetypes.guess_type(path.name)[0] or
                          "application/octet-stream")) for path in paths]
        headers = {"x-lantern-deployment": deployment} if deployment else {}
        return self._call("POST", "/explain/jobs", params=query, files=files, headers=headers).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/explain/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/explain/jobs/{job_id}").json()

    def result(self, job_id: str, accept: str) -> httpx.Response:
        return self._call("GET", f"/explain/jobs/{job_id}/result", headers={"Accept": accept})

    def wait(self, job: dict[str, Any], progress: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Poll until the job ends (`progress` told each time); Ctrl+C cancels it."""
        try:
            while job["state"] not in ENDED:
                time.sleep(POLL_S)
                job = self.job(job["id"])
                progress(job)
        except KeyboardInterrupt:
            self.cancel(job["id"])
            raise JobError(f"interrupted: explanation job {job['id']} cancelled") from None
        return job


def explain_remotely(url: str, key: str | None, paths: list[Path], method: str, params: dict[str, Any],
                     targets: list[str], deployment: str | None, out: str | None, attributions_out: str | None,
                     out_dir: str | None) -> dict[str, Any]:
    """Explain `paths` through a job on the endpoint at `url`; one image's PNG and attributions go where `out` and
    `attributions_out` say, a batch's result is unpacked into `out_dir`. Answers the summary printed on stdout."""
    client = JobClient(url, key)
    job = client.submit(paths, method, params, targets, deployment)
    console.print(f"Explanation job {job['id']} accepted: {job['progress']['images_total']} image(s) on deployment "
                  f"{job['deployment']} ({job['model_version']})")
    with job_progress(job) as progress:
        job = client.wait(job, progress)
    if job["state"] != "succeeded":
        raise JobError(f"explanation job {job['id']} {job['state']}: {job.get('error') or 'no result'}")
    summary = {"job": job["id"], "deployment": job["deployment"], "model_version": job["model_version"],
               "method": job["method"], "images": job["progress"]["images_total"],
               "labels": job["progress"]["labels_done"],
               "failed": [{"image": image["name"], "error": image["error"]["message"]}
                          for image in job["images"] if image.get("error")]}
    if job["batch"]:
        folder = Path(out_dir or f"explanations-{job['id']}")
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(io.BytesIO(client.result(job["id"], "application/zip").content)) as archive:
            extract(archive, folder)
        console.print(f"Wrote {folder}/result.json, visualizations/ and attributions/")
        return {**summary, "out_dir": str(folder)}
    answer = client.result(job["id"], "application/json").json()
    labels = [item["label"] for item in answer["explanations"]]
    for index, item in enumerate(answer["explanations"]):
        if out:
            path = Path(out) if len(labels) == 1 else Path(out).with_name(
                f"{Path(out).stem}-{item['label']}{Path(out).suffix}")
            path.write_bytes(base64.b64decode(item["visualization"]))
            console.print(f"Wrote {path} ({item['label']})")
        if attributions_out and index == 0:
            import numpy as np

            arrays = [np.load(io.BytesIO(base64.b64decode(e["attributions"])), allow_pickle=False).astype(np.float32)
                      for e in answer["explanations"]]
            np.save(attributions_out, np.stack(arrays))
            console.print(f"Wrote {attributions_out} {tuple(np.stack(arrays).shape)}")
    return {**summary, "labels": labels, "fidelity": answer["fidelity"]}


@contextlib.contextmanager
def job_progress(job: dict[str, Any]) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar on a terminal, over the job's explanations once their total is known (a multi-label image may
    have several), over its images until then; elsewhere a line per change of state."""
    total = job["progress"]["images_total"]
    if not console.is_terminal:
        last = [job["state"]]

        def report(update: dict[str, Any]) -> None:
            if update["state"] != last[0]:
                last[0] = update["state"]
                done = update["progress"]
                of_labels = f" of {done['labels_total']}" if done.get("labels_total") is not None else ""
                console.print(f"job {update['id']}: {update['state']} ({done['images_done']}/{total} images, "
                              f"{done['labels_done']}{of_labels} explanations)")

        yield report
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"Explaining ({job['method']}) [dim]{{task.fields[unit]}} {{task.fields[state]}}"),
                  BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("job", total=total, unit="images", state=job["state"])

        def report(update: dict[str, Any]) -> None:
            done = update["progress"]
            if done.get("labels_total"):
                bar.update(task, total=done["labels_total"], completed=done["labels_done"], unit="explanations",
                           state=update["state"])
            else:
                bar.update(task, total=total, completed=done["images_done"], unit="images", state=update["state"])

        yield report


def extract(archive: zipfile.ZipFile, folder: Path) -> None:
    """The result's files into `folder`; a name that would land outside it is refused."""
    root = folder.resolve()
    for name in archive.namelist():
        if not (root / name).resolve().is_relative_to(root):
            raise JobError(f"the result holds a file named {name!r}, outside the output folder; nothing written")
    archive.extractall(folder)
