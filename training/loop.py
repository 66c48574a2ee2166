"""The training loop: start, resume or extend a session; checkpoints, validation, reports and a clean stop on signals.
What is particular to a task (its data, loss, optimizer and validation metrics) is its objective
(training/objective.py); the session control here is the same for classifiers and detectors.

Exact resume: the batch at iteration i and its augmentations are drawn from seeds derived from (seed, i), the model's
own randomness (dropout) is reseeded per iteration, and optimizer, grad-scaler and callback states are restored from
the checkpoint. A run of 2K iterations and a run stopped at K then resumed to 2K give the same weights.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Sampler

from registry.architectures import ARCHITECTURES
from registry.checkpoint import fit_state_dict
from registry.devices import torch_device
from registry.errors import LanternError
from registry.resolve import ModelBundle, load_bundle
from registry.settings import DetectionSettings, TaskSettings, build_settings, is_detection
from registry.spec import ModelSpec, build_module, make_spec
from training.callbacks import Callback, CallbackList, LRScheduler, TrainState, ValidationReason
from training.classification_objective import ClassificationObjective
from training.config import TrainConfig, build_config, merge_with_session
from training.detection_objective import DetectionObjective
from training.objective import Objective
from training.session import CheckpointInfo, Session, SessionMeta, now, selection_metric
from training.sources import TrainingData, load_data
from training.tracking import MLflowTracking
from training.transforms import detector_settings, valid_settings

PRELOAD_BYTES = 2 * 1024**3
DETECTOR_FROM_MODEL = ("training on from a registered detector (--from) is not supported yet; start a session "
                       "with --arch")


class RunOptions(BaseModel):
    """What may change between runs of one session."""

    model_config = ConfigDict(extra="forbid")

    iterations: int | None = Field(None, ge=1, description="total iteration budget (default: the session's)")
    checkpoint_interval: int | None = Field(None, ge=1, description="default: a tenth of the run")
    report_interval: int | None = Field(None, ge=1, description="default: a fifth of the checkpoint interval")
    device: str = "auto"
    loader_workers: int | None = Field(None, ge=0, description="default: 0 for preloaded data, else up to 4")
    preload: bool | None = Field(None, description="decode every image once up front (default: when under 2 GiB)")
    mlflow: bool = True
    tracking_uri: str | None = None
    handle_signals: bool = True


@dataclass
class TrainResult:
    """How a run ended."""

    session_dir: Path
    iteration: int
    total: int
    status: str
    stop_reason: str | None
    metrics: dict[str, float]
    best: CheckpointInfo | None
    mlflow_run_id: str | None
    signal_number: int | None = None
    ran: bool = True
    labels: list[str] = field(default_factory=list)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (and on their order)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


STREAM_MODEL, STREAM_SAMPLE, STREAM_EPOCH = 1, 2, 3


class BatchPlan(Sampler[list[int]]):
    """The batches (lists of example indices) of iterations [start, stop).

    Epoch e visits the examples in a permutation seeded by (seed, e); batch i is a pure function of (seed, i)."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int) -> None:
        self.size, self.batch_size, self.seed, self.start, self.stop = size, min(batch_size, size), seed, start, stop
        self.steps_per_epoch = max(1, size // self.batch_size)
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def batch(self, iteration: int) -> list[int]:
        epoch, step = divmod(iteration, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(derived_seed(STREAM_EPOCH, self.seed, epoch))
            self._epoch, self._order = epoch, torch.randperm(self.size, generator=generator)
        return self._order[step * self.batch_size:(step + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for iteration in range(self.start, self.stop):
            yield self.batch(iteration)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


@dataclass
class Prepared:
    """Everything a run needs, resolved from the session, the config and the data."""

    session: Session
    meta: SessionMeta
    config: TrainConfig
    data: TrainingData
    spec: ModelSpec
    labels: list[str]
    settings: TaskSettings
    initial_weights: dict[str, torch.Tensor] | None


def _start_from_model(config_values: dict[str, Any], tracking_uri: str | None) -> tuple[dict[str, Any], ModelBundle]:
    if is_detection(str(config_values.get("task"))):
        raise LanternError(DETECTOR_FROM_MODEL)
    bundle = load_bundle(config_values["from_model"], tracking_uri=tracking_uri)
    if is_detection(bundle.spec.task):
        raise LanternError(f"{bundle.uri} is a detector: {DETECTOR_FROM_MODEL}")
    for key, registered in (("arch", bundle.spec.arch), ("task", bundle.spec.task)):
        given = config_values.get(key)
        if given is not None and given != registered:
            raise LanternError(f"--{key} {given} differs from {bundle.uri}, which is {key} {registered}; "
                               "incremental training keeps the registered model's architecture and task")
    defaults = {"arch": bundle.spec.arch, "task": bundle.spec.task, "image_size": bundle.settings.valid_crop_size}
    return {**config_values, **{k: v for k, v in defaults.items() if config_values.get(k) is None}}, bundle


def _labels_from_model(bundle: ModelBundle, data: TrainingData, config: TrainConfig
                       ) -> tuple[list[str], ModelSpec, dict[str, torch.Tensor]]:
    """The labels, spec and starting weights for training on from a registered version."""
    weights = {k: v.detach().clone() for k, v in bundle.module.state_dict().items()}
    new = sorted(set(data.labels) - set(bundle.labels))
    if not config.new_head:
        if new:
            raise LanternError(
                f"the data has labels that {bundle.uri} does not know: {', '.join(new[:10])} "
                f"(the model knows {', '.join(bundle.labels)}). Pass --new-head to train a new classifier head "
                "for the data's labels, or use data with the model's labels."
            )
        return list(bundle.labels), bundle.spec, weights
    head = ARCHITECTURES[bundle.spec.arch].head
    kept = {k: v for k, v in weights.items() if not k.startswith(head + ".")}
    spec = make_spec(bundle.spec.arch, len(data.labels), bundle.spec.task, bundle.spec.gradcam_layer)
    return list(data.labels), spec, kept


def prepare(session_dir: str | Path, given: dict[str, Any], tracking_uri: str | None = None) -> Prepared:
    """Resolve a session: a new one from `given` (config fields; None = not given), or the stored one (checked)."""
    session = Session(session_dir)
    initial_weights = None
    if session.exists():
        meta = session.read_meta()
        config = merge_with_session(meta.config, given)
        data = load_data(config, session.dir / "data")
        unknown = sorted(set(data.labels) - set(meta.labels))
        if unknown:
            raise LanternError(f"the data now has labels the session's model does not know: {', '.join(unknown[:10])}")
        return Prepared(session, meta, config, data, meta.spec, meta.labels,
                        build_settings(config.task, meta.settings), None)
    values = {k: v for k, v in given.items() if v is not None}
    if "data" not in values:
        raise LanternError(f"{session.dir} holds no session yet: give --data to start one")
    bundle = None
    if values.get("from_model"):
        values, bundle = _start_from_model(values, tracking_uri)
    elif "arch" not in values:
        raise LanternError("give --arch (e.g. small_cnn, resnet18) or --from models:/NAME/VERSION")
    config = build_config(values)
    data = load_data(config, session.dir / "data")
    if bundle is not None:
        labels, spec, initial_weights = _labels_from_model(bundle, data, config)
    else:
        labels, spec = data.labels, make_spec(config.arch, len(data.labels), config.task)
    sizes = detector_settings(config.image_size) if is_detection(config.task) else valid_settings(config.image_size)
    settings = build_settings(config.task, sizes)
    meta = SessionMeta(config=config, labels=labels, spec=spec, settings=settings.model_dump(), iterations=1,
                       from_version=bundle.uri if bundle else None, created_at=now(), updated_at=now())
    return Prepared(session, meta, config, data, spec, labels, settings, initial_weights)


@contextlib.contextmanager
def _stop_on_signals(state: TrainState, enabled: bool) -> Iterator[list[int]]:
    """SIGINT/SIGTERM ask the loop to stop after the current batch; a second SIGINT interrupts at once."""
    received: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)
        state.request_stop(f"stopped by {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _loader_workers(requested: int | None, preloaded: bool) -> int:
    if requested is not None:
        return requested
    return 0 if preloaded else min(4, max(0, (os.cpu_count() or 1) - 1))


def _should_preload(data: TrainingData, image_size: int) -> bool:
    return (len(data.train) + len(data.val)) * 3 * (image_size * 1.5) ** 2 < PRELOAD_BYTES


def task_objective(p: Prepared, options: RunOptions, device: torch.device) -> Objective:
    """The objective of the session's task, with its data loaded as `options` say."""
    if isinstance(p.settings, DetectionSettings):
        return DetectionObjective(p.config, p.labels, p.settings, p.data, device,
                                  _loader_workers(options.loader_workers, preloaded=False))
    preload = options.preload if options.preload is not None else _should_preload(p.data, p.config.image_size)
    return ClassificationObjective(p.config, p.spec, p.labels, p.settings, p.data, device,
                                   _loader_workers(options.loader_workers, preload), preload)


def train(session_dir: str | Path, given: dict[str, Any], options: RunOptions | None = None,
          callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Start, resume or extend the session in `session_dir`; `given` holds TrainConfig fields (None = not given).

    `callbacks` run after the built-in LR schedule, in order. Returns how the run ended; a checkpoint is always
    written at the iteration where it ended."""
    options = options or RunOptions()
    session = Session(session_dir)
    session.lock()
    try:
        prepared = prepare(session_dir, given, options.tracking_uri)
        return _run(prepared, options, list(callbacks))
    finally:
        session.unlock()


def _run(p: Prepared, options: RunOptions, user_callbacks: list[Callback]) -> TrainResult:
    config, meta, session = p.config, p.meta, p.session
    total = options.iterations or (meta.iterations if session.exists() else None)
    if total is None:
        raise LanternError("give --iterations for a new session")
    latest = session.latest()
    start = latest.iteration if latest else 0
    metric = selection_metric(config.task)
    if latest and (start >= total or (meta.status == "early_stopped" and total <= meta.iterations)):
        return TrainResult(session.dir, start, total, meta.status, meta.stop_reason, latest.metrics,
                           session.best(metric), meta.mlflow_run_id, ran=False, labels=p.labels)

    device = torch_device(options.device)
    objective = task_objective(p, options, device)
    torch.manual_seed(derived_seed(STREAM_MODEL, config.seed, 0))
    model = objective.configure(build_module(p.spec))
    if p.initial_weights is not None:
        fit_state_dict(model, {**model.state_dict(), **p.initial_weights})  # a new head keeps its fresh init
    model.to(device).train()
    optimizer = objective.optimizer(model)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and not torch.cuda.is_bf16_supported())
    plan = BatchPlan(objective.train_size(), config.batch_size, config.seed, start, total)
    train_batches = objective.batches(plan)

    checkpoint_interval = options.checkpoint_interval or max(1, math.ceil(total / 10))
    report_interval = options.report_interval or max(1, checkpoint_interval // 5)
    state = TrainState(model=model, optimizer=optimizer, total=total, steps_per_epoch=plan.steps_per_epoch,
                       base_lr=config.lr, start_iteration=start, iteration=start)

    built_in: list[Callback] = [LRScheduler(config.schedule)]
    tracking = None
    if options.mlflow:
        params = {**{k: v for k, v in config.model_dump(mode="json").items() if k != "schedule"},
                  "schedule": config.schedule.describe(), "labels": ",".join(p.labels),
                  "train_images": len(p.data.train), "val_images": len(p.data.val), "session_dir": str(session.dir)}
        tracking = MLflowTracking(params, meta.mlflow_run_id, run_name=session.dir.name,
                                  tracking_uri=options.tracking_uri)
        built_in.append(tracking)
    callbacks = CallbackList(built_in + user_callbacks)

    if latest:
        fit_state_dict(model, _load_weights(latest))
        saved = session.load_training_state(latest)
        optimizer.load_state_dict(saved["optimizer"])
        scaler.load_state_dict(saved["scaler"])
        callbacks.load_state_dict(saved["callbacks"])
        torch.set_rng_state(saved["rng"]["torch"])
        state.metrics = dict(latest.metrics)

    meta.iterations, meta.status, meta.stop_reason = total, "running", None
    session.write_meta(meta)

    def validate_and_checkpoint(reason: ValidationReason) -> None:
        state.validation_reason = reason
        callbacks.fire("validation_start", state)
        state.metrics.update(objective.evaluate(model))
        callbacks.fire("validation_end", state)
        state.validation_reason = None
        training_state = {
            "iteration": state.iteration,
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "callbacks": callbacks.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
        }
        path = session.save_checkpoint(state.iteration, state.epoch, model, p.spec, p.labels, p.settings,
                                       training_state, {**state.metrics, "lr": state.lr}, reason)
        callbacks.fire("checkpoint", state, path)

    signal_number = None
    with _stop_on_signals(state, options.handle_signals) as received:
        try:
            callbacks.fire("fit_start", state)
            if tracking is not None and meta.mlflow_run_id != tracking.run_id:
                meta.mlflow_run_id = tracking.run_id
                session.write_meta(meta)
            for batch in train_batches:
                if state.iteration == start or state.iteration % plan.steps_per_epoch == 0:
                    callbacks.fire("epoch_start", state)
                callbacks.fire("batch_start", state)
                torch.manual_seed(derived_seed(STREAM_MODEL, config.seed, state.iteration))
                generator = torch.Generator().manual_seed(derived_seed(STREAM_SAMPLE, config.seed, state.iteration))
                loss = objective.loss(model, batch, generator)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                state.iteration += 1
                state.loss = loss.detach()
                callbacks.fire("batch_end", state)
                if state.iteration % plan.steps_per_epoch == 0:
                    callbacks.fire("epoch_end", state)
                at_checkpoint = state.iteration % checkpoint_interval == 0 or state.iteration == total
                stopping = state.stop_reason is not None
                if at_checkpoint or stopping:
                    state.metrics.update(objective.flush())
                    validate_and_checkpoint("interval" if at_checkpoint and state.iteration < total
                                            else "end" if at_checkpoint else "stop")
                if at_checkpoint or stopping or state.iteration % report_interval == 0:
                    state.metrics.update(objective.flush())
                    callbacks.fire("report", state)
                if state.stop_reason is not None:
                    if not (at_checkpoint or stopping):  # the stop came while this iteration was being reported
                        validate_and_checkpoint("stop")
                        callbacks.fire("report", state)
                    break
        except BaseException as error:
            meta.status, meta.stop_reason = "failed", f"{type(error).__name__}: {error}"
            session.write_meta(meta)
            raise
        finished = state.iteration >= total
        if received and not finished:
            signal_number = received[0]
        meta.status = ("completed" if finished else "early_stopped" if state.early_stopped else "stopped")
        meta.stop_reason = None if finished and not state.early_stopped else state.stop_reason
        session.write_meta(meta)
        callbacks.fire("fit_end", state)
    return TrainResult(session.dir, state.iteration, total, meta.status, state.stop_reason, dict(state.metrics),
                       session.best(metric), meta.mlflow_run_id, signal_number, labels=p.labels)


def _load_weights(info: CheckpointInfo) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from registry.model_files import WEIGHTS

    return load_file(str(info.path / WEIGHTS))
