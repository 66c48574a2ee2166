"""The `lantern` command line, run as a user runs it (the installed console script in a subprocess); a test's
follow-up commands that only read or change the registry run in this process (`lantern_here`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from support.common import PROJECT_ROOT, env_without_store, lantern_executable, lantern_here


def lantern(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([lantern_executable(), *args], capture_output=True, text=True, env=env, cwd=cwd,
                            timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def register_args(checkpoints: dict[str, Path], *extra: str) -> list[str]:
    return ["register", "--name", "shapes", "--checkpoint", str(checkpoints["pt"]), "--arch", "small_cnn",
            "--labels", str(checkpoints["labels"]), "--task", "multiclass",
            "--set", "valid_resize_size=40", "--set", "valid_crop_size=32", *extra]


def test_register_show_alias_settings_and_list(store, checkpoints):
    out = lantern(*register_args(checkpoints, "--alias", "champion"))
    assert out.stdout.strip() == "models:/shapes/1"
    assert "Exporting ONNX" in out.stderr and "Checking ONNX Runtime against torch" in out.stderr

    shown = json.loads(lantern_here("models", "show", "shapes@champion", "--json").stdout)
    assert shown["version"] == 1 and shown["aliases"] == ["champion"]
    assert shown["spec"]["arch"] == "small_cnn" and shown["spec"]["gradcam_layer"] == "features.3"
    assert shown["settings"] == {"valid_resize_size": 40, "valid_crop_size": 32}
    assert shown["labels"] == ["circle", "square", "triangle"]
    assert shown["onnx_max_abs_diff"] < 1e-3 and shown["source_run"]

    changed = lantern_here("models", "settings", "shapes", "1", "--set", "valid_crop_size=24")
    assert changed.stdout.strip() == "models:/shapes/2"
    assert json.loads(lantern_here("models", "show", "shapes/1", "--json").stdout)["settings"]["valid_crop_size"] == 32
    assert json.loads(lantern_here("models", "show", "shapes", "--json").stdout)["settings"]["valid_crop_size"] == 24

    lantern_here("models", "alias", "shapes", "champion", "2")
    assert json.loads(lantern_here("models", "show", "models:/shapes@champion", "--json").stdout)["version"] == 2
    table = lantern("models", "list").stdout  # a process's pipe: the table whole
    assert "shapes" in table and "@champion=2" in table
    assert "models:/shapes" in lantern_here("models", "show", "shapes/2").stdout


def test_python_dash_m_lantern_is_the_same_command(store):
    """`python -m lantern` (for installs without console scripts) runs the same CLI, under the same name."""
    python = sys.executable
    result = subprocess.run([python, "-m", "lantern", "models", "list"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == lantern("models", "list").stdout
    usage = subprocess.run([python, "-m", "lantern", "--help"], capture_output=True, text=True, timeout=300).stdout
    assert usage.startswith("Usage: lantern ") and "serve" in usage


def test_errors_are_clear_messages_with_exit_status_2(store, checkpoints, tmp_path):
    bad_labels = tmp_path / "labels.txt"
    bad_labels.write_text("a\nb\n")
    result = lantern("register", "--name", "shapes", "--checkpoint", str(checkpoints["pt"]), "--arch", "small_cnn",
                     "--labels", str(bad_labels), "--task", "multiclass", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "classifier.weight: checkpoint (3, 128) vs model (2, 128)" in result.stderr.replace("\n", " ")
    result = lantern_here("models", "settings", "shapes", "1", "--set", "valid_crop_size=24", exit_code=2)
    assert "no registered model named 'shapes'" in result.stderr
    result = lantern_here(*register_args(checkpoints, "--set", "crop=3"), exit_code=2)
    assert "crop: unknown setting" in result.stderr


def test_tracking_uri_flag_points_the_registry_elsewhere(tmp_path, checkpoints):
    other = f"sqlite:///{tmp_path / 'elsewhere' / 'registry.db'}"
    env = {**env_without_store(), "LANTERN_HOME": str(tmp_path / "home")}
    lantern(*register_args(checkpoints, "--tracking-uri", other), env=env)
    assert [m.name for m in MlflowClient(other, other).search_registered_models()] == ["shapes"]
    assert not (tmp_path / "home" / "mlflow.db").exists()
    assert "shapes" in lantern_here("models", "list", "--tracking-uri", other).stdout


def test_concurrent_registrations_each_get_their_own_version(store, checkpoints):
    Path(store.removeprefix("sqlite:///")).unlink()  # no store yet: the three processes race to make it too
    processes = [
        subprocess.Popen([lantern_executable(), *register_args(checkpoints)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert all(p.returncode == 0 for p in processes), [err[-2000:] for _, err in outputs]
    uris = sorted(out.strip() for out, _ in outputs)
    assert uris == [f"models:/shapes/{v}" for v in range(1, 4)]
    versions = MlflowClient(store, store).search_model_versions("name='shapes'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    assert len({v.run_id for v in versions}) == 3


@pytest.mark.parametrize(("task", "endpoint", "model"), [("classification", "endpoint.yaml", "shapes-demo"),
                                                      ("object_detection", "endpoint-detection.yaml", "shapes-boxes")])
def test_demo_endpoint_serves_the_demo_model_as_printed(tmp_path, monkeypatch, task, endpoint, model):
    """`lantern demo` trains, registers and shows the demo model (a second run finds it registered), then what `make
    demo` (`make demo ENDPOINT=endpoint-detection.yaml`) does after it: serve the shipped endpoint file, and the
    printed request works."""
    import re
    import shlex

    import httpx
    import yaml

    from support.servers import Server

    env = {**env_without_store(), "LANTERN_HOME": str(tmp_path / ".lantern")}
    out = lantern("demo", "--data-dir", str(tmp_path / "demo-data"), "--count", "60", "--iterations", "5",
                  "--port", "3999", "--task", task, env=env, cwd=tmp_path)
    assert f"Registered models:/{model}/1" in out.stderr
    assert f"models:/{model}/1" in out.stdout and "champion" in out.stdout
    printed = " ".join(out.stderr.split())
    assert f"KEY=$(.venv/bin/lantern endpoint get-credentials {endpoint} --key primary)" in printed
    assert ("/explain?method=xrai" in printed) == (task == "classification")
    command = re.search(r"curl -s http://127\.0\.0\.1:3999/predict [^\n]*?\.png", printed).group(0)
    sample = Path(shlex.split(command)[-1].lstrip("@"))
    assert sample.exists() and sample.name.startswith("sample-")

    # the follow-up commands run in this process, in the same Lantern home
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LANTERN_HOME", env["LANTERN_HOME"])
    monkeypatch.chdir(tmp_path)
    if task == "classification":
        assert "val_accuracy" in out.stderr
        again = lantern_here("demo", "--data-dir", str(tmp_path / "demo-data"))
        assert "already registered (version 1)" in again.stderr

    config = yaml.safe_load((PROJECT_ROOT / endpoint).read_text())
    server = Server(config, tmp_path, env).start()
    try:
        key = lantern_here("endpoint", "get-credentials", str(server.config_path), "--key", "primary").stdout.strip()
        response = httpx.post(f"{server.url}/predict", content=sample.read_bytes(), timeout=60,
                              headers={"Authorization": f"Bearer {key}", "Content-Type": "image/png"})
        assert response.status_code == 200, response.text
        assert response.json()["model_version"] == f"models:/{model}/1"
        assert response.headers["x-lantern-deployment"] == "blue"
        prediction = response.json()["predictions"][0]
        assert set(prediction) == ({"boxes"} if task == "object_detection" else {"predicted", "top_k"})
    finally:
        server.stop()
