"""`lantern train` as a user runs it: a clean stop on SIGTERM, resume, listing, pruning, MLflow records, registering."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from registry.model_files import TAG_TRAINING_ITERATION, TAG_TRAINING_RUN, WEIGHTS
from registry.store import open_client
from support.common import lantern_executable, lantern_here
from training.session import Session
from training.shapes import ShapesConfig, write_shapes_dataset


@pytest.fixture(scope="module")
def cli_shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli-shapes")
    write_shapes_dataset(folder, ShapesConfig(count=80, image_size=32, seed=9))
    return folder


def lantern(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([lantern_executable(), *args], capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"lantern {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done


def train_args(session_dir: Path, data: Path, *extra: str) -> list[str]:
    return ["train", "--session-dir", str(session_dir), "--data", str(data), "--arch", "small_cnn",
            "--image-size", "32", "--batch-size", "8", *extra]


TOTAL = "300"  # the interrupted and the uninterrupted run share the budget, hence the LR schedule


def test_sigterm_stops_cleanly_and_resume_matches_an_uninterrupted_run(cli_shapes: Path, tmp_path: Path, store: str,
                                                                         capsys: pytest.CaptureFixture) -> None:
    session_dir = tmp_path / "interrupted"
    # the uninterrupted run to compare with, in a process of its own meanwhile (not recorded: one writer of the store)
    straight = subprocess.Popen(
        [lantern_executable(), *train_args(tmp_path / "straight", cli_shapes, "--iterations", TOTAL,
                                           "--checkpoint-interval", "100000", "--no-mlflow")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    process = subprocess.Popen(
        [lantern_executable(), *train_args(session_dir, cli_shapes, "--iterations", TOTAL,
                                           "--checkpoint-interval", "100000", "--report-interval", "1")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    csv_file = session_dir / "metrics.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if csv_file.exists() and len(csv_file.read_text().splitlines()) > 3:  # header + 3 reported iterations
            break
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "Run the same command to resume" in err

    session = Session(session_dir)
    meta = session.read_meta()
    latest = session.latest()
    assert (meta.status, meta.stop_reason) == ("stopped", "stopped by SIGTERM")
    assert latest is not None and latest.reason == "stop" and latest.iteration >= 3
    stopped_at = latest.iteration
    assert {"val_accuracy", "train_loss"} <= set(latest.metrics)
    run = open_client(store).get_run(meta.mlflow_run_id)
    assert run.info.status == "KILLED"

    assert 0 < stopped_at < int(TOTAL)
    resumed = lantern(*train_args(session_dir, cli_shapes, "--checkpoint-interval", "100000"))  # the same budget
    assert f"Resuming at iteration {stopped_at} of {TOTAL}" in resumed.stderr
    _out, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err
    a = load_file(str(Session(session_dir).latest().path / WEIGHTS))
    b = load_file(str(Session(tmp_path / "straight").latest().path / WEIGHTS))
    assert all(torch.equal(a[key], b[key]) for key in a)
    with capsys.disabled():
        print(f"\nSIGTERM at iteration {stopped_at}, resumed to {TOTAL}: weights identical to an uninterrupted run")

    client = open_client(store)
    run = client.get_run(meta.mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.params["arch"] == "small_cnn"
    history = client.get_metric_history(meta.mlflow_run_id, "train_loss")
    assert {m.step for m in history} >= {1, 2, 3, int(TOTAL)}
    logged = {f.path for f in client.list_artifacts(meta.mlflow_run_id, "checkpoints")}
    assert f"checkpoints/iteration-{int(TOTAL):08d}" in logged


def test_sessions_prune_and_register_from_the_command_line(cli_shapes: Path, tmp_path: Path, store: str) -> None:
    session_dir = tmp_path / "s"
    done = lantern(*train_args(session_dir, cli_shapes, "--iterations", "8", "--checkpoint-interval", "2",
                               "--register", "cli-shapes", "--alias", "challenger"))
    assert done.stdout.strip() == "models:/cli-shapes/1"
    assert "Best checkpoint: iteration" in done.stderr

    listing = json.loads(lantern_here("train", "sessions", str(session_dir), "--json").stdout)
    assert [c["iteration"] for c in listing["checkpoints"]] == [2, 4, 6, 8]
    assert listing["status"] == "completed" and listing["best_iteration"] in (2, 4, 6, 8)
    assert all("val_accuracy" in c["metrics"] for c in listing["checkpoints"])
    table = lantern_here("train", "sessions", str(session_dir)).stdout
    assert "iteration" in table and "val_accuracy" in table

    client = open_client(store)
    version = client.get_model_version("cli-shapes", "1")
    assert version.tags[TAG_TRAINING_ITERATION] == str(listing["best_iteration"])
    assert version.tags[TAG_TRAINING_RUN] == listing["mlflow_run_id"]
    assert str(client.get_model_version_by_alias("cli-shapes", "challenger").version) == "1"

    registered = lantern_here("register", "--name", "cli-shapes", "--from-session", str(session_dir),
                              "--checkpoint-iteration", "4")
    assert registered.stdout.strip() == "models:/cli-shapes/2"
    assert client.get_model_version("cli-shapes", "2").tags[TAG_TRAINING_ITERATION] == "4"
    missing = lantern_here("register", "--name", "cli-shapes", "--from-session", str(session_dir),
                           "--checkpoint-iteration", "5", exit_code=2)
    assert "no checkpoint at iteration 5; it has: 2, 4, 6, 8" in missing.stderr
    clash = lantern_here("register", "--name", "x", "--from-session", str(session_dir), "--arch", "resnet18",
                         exit_code=2)
    assert "drop --arch" in clash.stderr

    pruned = lantern_here("train", "prune", str(session_dir), "--below", "8", "--no-keep-best")
    assert "Removed 3 checkpoint(s): 2, 4, 6" in pruned.stderr
    assert [c.iteration for c in Session(session_dir).checkpoints()] == [8]

    changed = lantern_here(*train_args(session_dir, cli_shapes, "--iterations", "10", "--lr", "0.2"), exit_code=2)
    assert "lr=0.2 (the session has 0.001)" in changed.stderr
    csv_rows = (session_dir / "metrics.csv").read_text().splitlines()
    assert csv_rows[0].startswith("iteration,epoch,lr,train_loss") and csv_rows[-1].startswith("8,")
    assert os.path.getsize(session_dir / "session.json") > 0
