"""Recording a training session in MLflow: params once, metrics at every report, checkpoints as run artifacts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunStatus
from mlflow.tracking import MlflowClient

from registry.model_files import WEIGHTS
from registry.store import open_client, write_lock
from training.callbacks import Callback, TrainState
from training.session import METRICS_FILE

TRAINING_EXPERIMENT = "lantern-training"


class MLflowTracking(Callback):
    """One MLflow run per session (a resumed session continues its run), so the MLflow UI shows the curves."""

    def __init__(self, params: dict[str, Any], run_id: str | None = None, run_name: str | None = None,
                 tracking_uri: str | None = None) -> None:
        self.params, self.run_id, self.run_name, self.tracking_uri = params, run_id, run_name, tracking_uri
        self.client: MlflowClient | None = None

    def _experiment_id(self, client: MlflowClient) -> str:
        experiment = client.get_experiment_by_name(TRAINING_EXPERIMENT)
        return experiment.experiment_id if experiment else client.create_experiment(TRAINING_EXPERIMENT)

    def on_fit_start(self, state: TrainState) -> None:
        self.client = client = open_client(self.tracking_uri)
        with write_lock(client.tracking_uri):
            if self.run_id is None:
                run = client.create_run(self._experiment_id(client), run_name=self.run_name,
                                        tags={"lantern.kind": "training"})
                self.run_id = run.info.run_id
                client.log_batch(self.run_id, params=_params(self.params))
            else:
                client.update_run(self.run_id, status=RunStatus.to_string(RunStatus.RUNNING))

    def on_report(self, state: TrainState) -> None:
        stamp = int(time.time() * 1000)
        metrics = [Metric(key, float(value), stamp, state.iteration) for key, value in state.metrics.items()]
        metrics.append(Metric("lr", state.lr, stamp, state.iteration))
        with write_lock(self.client.tracking_uri):
            self.client.log_batch(self.run_id, metrics=metrics)

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        with write_lock(self.client.tracking_uri):
            for name in (WEIGHTS, METRICS_FILE):
                self.client.log_artifact(self.run_id, str(path / name), artifact_path=f"checkpoints/{path.name}")

    def on_fit_end(self, state: TrainState) -> None:
        status = "FINISHED" if state.stop_reason is None or state.early_stopped else "KILLED"
        with write_lock(self.client.tracking_uri):
            self.client.set_terminated(self.run_id, status)


def _params(values: dict[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(key, str(value)[:6000]) for key, value in sorted(values.items())]
