"""Each server's own Prometheus folder: the workers' metric files, under the endpoint's state folder.

BentoML keeps every server's multiprocess metric files in one folder of its home (`~/bentoml/prometheus_multiproc_dir`)
and empties it whenever a server starts: a second server on the same host (another endpoint, a test, a benchmark)
wiped the first one's counts, and `lantern endpoint show` and `lantern rollout`'s gates then judged a canary on
nothing. Here each server (BentoML's serving process) gets `<endpoint folder>/metrics/<its pid>`, emptied by BentoML at
its start as before, removed when it ends; folders left by servers that were killed are removed by the next one."""

from __future__ import annotations

import atexit
import os
import shutil
from pathlib import Path

import psutil

FOLDER = "metrics"
WORKER_ENV = "PROMETHEUS_MULTIPROC_DIR"  # BentoML sets it for the workers it starts, to the serving process's folder


def use_own_metrics_folder(endpoint_folder: Path) -> Path | None:
    """Point BentoML's Prometheus folder at this process's own (None in a worker, which is told its folder)."""
    if WORKER_ENV in os.environ:
        return None
    from bentoml._internal.configuration.containers import BentoMLContainer

    parent = endpoint_folder / FOLDER
    remove_abandoned(parent)
    folder = parent / str(os.getpid())
    BentoMLContainer.prometheus_multiproc_dir.set(str(folder))  # BentoML creates it when it starts serving
    atexit.register(shutil.rmtree, folder, True)
    return folder


def remove_abandoned(parent: Path) -> None:
    """Remove the folders of servers that are no longer running."""
    if not parent.is_dir():
        return
    for folder in parent.iterdir():
        if folder.is_dir() and folder.name.isdigit() and not psutil.pid_exists(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)
