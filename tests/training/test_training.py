"""Training control: exact resume, extension, callbacks, early stopping, LR schedule, pruning, incremental training."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from registry.errors import LanternError
from registry.model_files import ModelFiles
from registry.register import register_session_checkpoint
from registry.resolve import load_bundle
from support.common import MINUTE_ITERATIONS
from support.training import StopAt, final_weights, quiet
from training.callbacks import Callback, EarlyStopping, TrainState
from training.loop import TrainResult, train
from training.schedule import LRSchedule, Segment, parse_schedule
from training.session import Session
from training.shapes import ShapesConfig, write_shapes_dataset


@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-shapes")
    write_shapes_dataset(folder, ShapesConfig(count=96, image_size=32, seed=5))
    return folder


def config(data: Path, **overrides: Any) -> dict[str, Any]:
    return {"data": str(data), "arch": "small_cnn", "image_size": 32, "batch_size": 8, **overrides}


class Recorder(Callback):
    """Records (event, iteration) pairs, and the learning rate used by every batch."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.lrs: list[float] = []

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_") and name != "on_batch_start":
            return lambda state, *args: self.events.append((name[3:], state.iteration))
        return super().__getattribute__(name)

    def on_batch_start(self, state: TrainState) -> None:
        self.events.append(("batch_start", state.iteration))
        self.lrs.append(state.optimizer.param_groups[0]["lr"])


def test_resume_is_exact(tiny_shapes: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    straight = train(tmp_path / "straight", config(tiny_shapes), quiet(iterations=14, checkpoint_interval=5))
    assert (straight.status, straight.iteration) == ("completed", 14)

    stopped = train(tmp_path / "resumed", config(tiny_shapes), quiet(iterations=14, checkpoint_interval=5),
                    [StopAt(7)])
    assert (stopped.status, stopped.iteration, stopped.stop_reason) == ("stopped", 7, "test stop")
    assert [c.iteration for c in Session(tmp_path / "resumed").checkpoints()] == [5, 7]
    assert Session(tmp_path / "resumed").latest().reason == "stop"

    # the stored config and budget; images now decoded per batch in 2 loader processes: the batches are the same
    resumed = train(tmp_path / "resumed", {}, quiet(preload=False, loader_workers=2))
    assert (resumed.status, resumed.iteration) == ("completed", 14)
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    different = [key for key in a if not torch.equal(a[key], b[key])]
    assert not different, f"resumed weights differ from an uninterrupted run in {different}"
    with capsys.disabled():
        print(f"\nexact resume: {len(a)} tensors identical after 7 + 7 iterations (the second half with 2 loader "
              "processes) vs 14 in one go")


def test_extension_and_refused_changes(tiny_shapes: Path, tmp_path: Path) -> None:
    session_dir = tmp_path / "session"
    first = train(session_dir, config(tiny_shapes), quiet(iterations=6, checkpoint_interval=3))
    assert (first.status, first.iteration) == ("completed", 6)

    again = train(session_dir, config(tiny_shapes), quiet(iterations=6))
    assert not again.ran and again.iteration == 6

    extended = train(session_dir, {}, quiet(iterations=10, checkpoint_interval=3))
    assert (extended.ran, extended.status, extended.iteration) == (True, "completed", 10)
    assert [c.iteration for c in Session(session_dir).checkpoints()] == [3, 6, 9, 10]
    assert Session(session_dir).read_meta().iterations == 10

    with pytest.raises(LanternError, match=r"lr=0\.5 \(the session has 0\.001\)"):
        train(session_dir, config(tiny_shapes, lr=0.5), quiet(iterations=12))
    with pytest.raises(LanternError, match="no session yet: give --data"):
        train(tmp_path / "empty", {}, quiet(iterations=3))
    with pytest.raises(LanternError, match="give --arch"):
        train(tmp_path / "no-arch", {"data": str(tiny_shapes)}, quiet(iterations=3))

    holder = subprocess.Popen(  # another process holding the session
        [sys.executable, "-c", "import sys, time; from training.session import Session; "
         f"s = Session({str(session_dir)!r}); s.lock(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LanternError, match="being trained by another process"):
            train(session_dir, {}, quiet(iterations=12))
    finally:
        holder.kill()
        holder.wait()


def test_callbacks_fire_in_order(tiny_shapes: Path, tmp_path: Path) -> None:
    recorder = Recorder()
    result = train(tmp_path / "s", config(tiny_shapes), quiet(iterations=12, checkpoint_interval=5, report_interval=4),
                   [recorder])
    steps = Session(tmp_path / "s").read_meta()
    spe = result.iteration and _steps_per_epoch(tmp_path / "s")
    expected: list[tuple[str, int]] = [("fit_start", 0)]
    for i in range(12):
        if i % spe == 0:
            expected.append(("epoch_start", i))
        expected += [("batch_start", i), ("batch_end", i + 1)]
        if (i + 1) % spe == 0:
            expected.append(("epoch_end", i + 1))
        if (i + 1) % 5 == 0 or i + 1 == 12:
            expected += [("validation_start", i + 1), ("validation_end", i + 1), ("checkpoint", i + 1)]
        if (i + 1) % 4 == 0 or (i + 1) % 5 == 0 or i + 1 == 12:
            expected.append(("report", i + 1))
    expected.append(("fit_end", 12))
    assert recorder.events == expected
    assert steps.status == "completed"


def _steps_per_epoch(session_dir: Path) -> int:
    meta = Session(session_dir).read_meta()
    from training.sources import load_data

    return max(1, len(load_data(meta.config, session_dir / "data").train) // meta.config.batch_size)


def test_lr_schedule_values_and_the_rates_used(tiny_shapes: Path, tmp_path: Path) -> None:
    schedule = parse_schedule("linear:10:0-1,cosine:rest:1-0")
    assert schedule == LRSchedule(segments=(Segment(kind="linear", length=10, start=0, end=1),
                                            Segment(kind="cosine", length="rest", start=1, end=0)))
    assert [schedule.factor(i, 111) for i in (0, 9)] == pytest.approx([0.0, 1.0])
    assert schedule.factor(10, 111) == pytest.approx(1.0)
    assert schedule.factor(60, 111) == pytest.approx(0.5)  # halfway through the 101-iteration cosine
    assert schedule.factor(110, 111) == pytest.approx(0.0, abs=1e-12)
    assert schedule.factor(500, 111) == pytest.approx(0.0, abs=1e-12)  # past the end: the last value holds
    warm = parse_schedule("linear:0.25:0.1-1,constant:rest:1")
    assert [warm.factor(i, 20) for i in (0, 2, 4, 5, 19)] == pytest.approx([0.1, 0.55, 1.0, 1.0, 1.0])

    recorder = Recorder()
    train(tmp_path / "s", config(tiny_shapes, lr=0.01, schedule=schedule), quiet(iterations=30), [recorder])
    assert recorder.lrs == pytest.approx([0.01 * schedule.factor(i, 30) for i in range(30)])
    assert recorder.lrs[0] == 0.0 and max(recorder.lrs) == pytest.approx(0.01)

    for text, message in [("linear", "KIND:LENGTH"), ("sawtooth:10:0-1", "'linear', 'cosine' or 'constant'"),
                          ("linear:1.5:0-1", "fraction"),
                          ("linear:rest:0-1,cosine:rest:1-0", "only one segment"), ("linear:10:a-b", "could not")]:
        with pytest.raises(LanternError, match=message):
            parse_schedule(text)


def test_early_stopping_on_target_and_on_plateau(tiny_shapes: Path, tmp_path: Path) -> None:
    target = train(tmp_path / "target", config(tiny_shapes), quiet(iterations=40, checkpoint_interval=4),
                   [EarlyStopping("val_accuracy", target=0.0)])
    assert (target.status, target.iteration) == ("early_stopped", 4)
    assert "reached the target" in target.stop_reason
    assert not train(tmp_path / "target", {}, quiet()).ran  # an early-stopped session is done for its budget

    plateau = train(tmp_path / "plateau", config(tiny_shapes), quiet(iterations=40, checkpoint_interval=4),
                    [EarlyStopping("val_loss", mode="min", patience=2, min_delta=1e9)])
    assert (plateau.status, plateau.iteration) == ("early_stopped", 12)  # best at 4, no improvement at 8 and 12
    assert "did not improve for 2 validations" in plateau.stop_reason
    assert Session(tmp_path / "plateau").read_meta().status == "early_stopped"
    with pytest.raises(ValueError, match="needs a target, a patience"):
        EarlyStopping("val_accuracy")


def test_checkpoint_listing_and_pruning(tiny_shapes: Path, tmp_path: Path) -> None:
    session = Session(tmp_path / "s")
    train(session.dir, config(tiny_shapes), quiet(iterations=10, checkpoint_interval=2))
    infos = session.checkpoints()
    assert [c.iteration for c in infos] == [2, 4, 6, 8, 10]
    assert all({"train_loss", "train_accuracy", "val_loss", "val_accuracy"} <= set(c.metrics) for c in infos)
    files = ModelFiles.in_dir(infos[0].path)
    assert files.read_spec().arch == "small_cnn" and files.read_labels() == ["circle", "square", "triangle"]

    best = session.best("val_accuracy")
    removed = session.prune(below=8, keep_best=False, metric="val_accuracy")
    assert [c.iteration for c in removed] == [2, 4, 6]
    assert [c.iteration for c in session.checkpoints()] == [8, 10]
    session.prune(keep_last=1, keep_best=False)
    assert [c.iteration for c in session.checkpoints()] == [10]  # the newest always stays
    with pytest.raises(LanternError, match="at least 1"):
        session.prune(keep_last=0)
    assert best is not None


def test_keep_best_when_pruning(tiny_shapes: Path, tmp_path: Path) -> None:
    session = Session(tmp_path / "s")
    train(session.dir, config(tiny_shapes), quiet(iterations=8, checkpoint_interval=2))
    best = session.best("val_accuracy")
    session.prune(keep_last=1, metric="val_accuracy")
    assert {c.iteration for c in session.checkpoints()} == {best.iteration, 8}


def test_incremental_training_from_a_registered_version(tiny_shapes: Path, tmp_path: Path, store: str) -> None:
    base = tmp_path / "base"
    train(base, config(tiny_shapes), quiet(iterations=4))
    registered = register_session_checkpoint("shapes", base)
    bundle = load_bundle(registered.uri)

    class FirstWeights(Callback):
        def on_fit_start(self, state: TrainState) -> None:
            self.weights = {k: v.clone() for k, v in state.model.state_dict().items()}

    first = FirstWeights()
    result = train(tmp_path / "next", {"data": str(tiny_shapes), "batch_size": 8, "from_model": registered.uri},
                   quiet(iterations=3), [first])
    assert result.status == "completed"
    meta = Session(tmp_path / "next").read_meta()
    assert (meta.config.arch, meta.config.image_size, meta.from_version) == ("small_cnn", 32, registered.uri)
    registered_weights = bundle.module.state_dict()
    assert all(torch.equal(first.weights[k], registered_weights[k]) for k in registered_weights)

    with pytest.raises(LanternError, match="--arch resnet18 differs"):
        train(tmp_path / "wrong-arch", {"data": str(tiny_shapes), "arch": "resnet18", "from_model": registered.uri},
              quiet(iterations=3))

    renamed = tmp_path / "renamed"  # an image folder whose classes differ from the model's
    for label, new_name in [("circle", "disc"), ("square", "square")]:
        (renamed / new_name).mkdir(parents=True)
        for line in (tiny_shapes / "index.jsonl").read_text().splitlines()[:40]:
            row = json.loads(line)
            if row["label"] == label:
                shutil.copy(tiny_shapes / row["image_url"], renamed / new_name / Path(row["image_url"]).name)
    with pytest.raises(LanternError, match=r"labels that models:/shapes/1 does not know: disc.*--new-head"):
        train(tmp_path / "refused", {"data": str(renamed), "from_model": registered.uri}, quiet(iterations=3))

    head = FirstWeights()
    new_head = train(tmp_path / "new-head", {"data": str(renamed), "from_model": registered.uri, "new_head": True,
                                             "batch_size": 4}, quiet(iterations=2), [head])
    assert new_head.labels == ["disc", "square"]
    spec = Session(tmp_path / "new-head").read_meta().spec
    assert spec.num_classes == 2 and head.weights["classifier.weight"].shape == (2, 128)
    body = [k for k in registered_weights if not k.startswith("classifier.")]
    assert all(torch.equal(head.weights[k], registered_weights[k]) for k in body)


def test_multilabel_training(tmp_path: Path) -> None:
    result = train(tmp_path / "ml", {"data": "shapes:120", "task": "multilabel", "arch": "small_cnn",
                                     "image_size": 32, "batch_size": 8}, quiet(iterations=6, checkpoint_interval=3))
    assert result.status == "completed"
    latest = Session(tmp_path / "ml").latest()
    assert {"val_f1", "val_accuracy", "val_loss"} <= set(latest.metrics)
    assert 0.0 <= latest.metrics["val_f1"] <= 1.0
    assert ModelFiles.in_dir(latest.path).read_spec().task == "multilabel"
    index = (tmp_path / "ml" / "data").glob("shapes-120-32px-seed0-multilabel/index.jsonl")
    assert any(isinstance(json.loads(line)["label"], list) for path in index for line in path.read_text().splitlines())

    with pytest.raises(LanternError, match="exactly one per image"):
        train(tmp_path / "mc", {"data": str(next((tmp_path / "ml" / "data").iterdir())), "arch": "small_cnn",
                                "image_size": 32}, quiet(iterations=2))


def test_a_minute_of_training_reaches_95_percent(trained_shapes: TrainResult, capsys: pytest.CaptureFixture) -> None:
    """The small CNN on 3000 shapes images at 64 px: about a minute of training on a 2-core CPU (conftest)."""
    result = trained_shapes
    accuracy = result.metrics["val_accuracy"]
    with capsys.disabled():  # shown in the test log
        print(f"\nshapes, small_cnn, {MINUTE_ITERATIONS} iterations: validation accuracy {accuracy:.2%} "
              f"(best checkpoint {result.best.iteration}: {result.best.metrics['val_accuracy']:.2%})")
    assert result.status == "completed" and result.iteration == MINUTE_ITERATIONS
    assert accuracy >= 0.95
    assert not math.isnan(result.metrics["train_loss"])
