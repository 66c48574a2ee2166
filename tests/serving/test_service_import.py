"""BentoML's arbiter imports the service module only to read the service's settings, then starts the workers that
serve. That import must not load the runtime (torch, torchvision, MLflow, captum: seconds of CPU) which every worker
loads again: it would delay every start of a replica."""

from __future__ import annotations

import json
import subprocess
import sys

from support.common import PROJECT_ROOT

RUNTIME = ("torch", "torchvision", "mlflow", "captum", "onnxruntime", "skimage")


def test_the_service_module_imports_no_runtime(tmp_path) -> None:
    config = tmp_path / "endpoint.yaml"
    config.write_text("name: light\ndeployments:\n  - name: blue\n    model: models:/mc/1\ntraffic:\n  blue: 100\n")
    probe = ("import json, sys; import serving.service as s; "
             f"print(json.dumps([m for m in {RUNTIME!r} if m in sys.modules] + [len(s.app.routes)]))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT,
                          env={"PATH": "/usr/bin:/bin", "LANTERN_ENDPOINT_CONFIG": str(config),
                               "LANTERN_HOME": str(tmp_path / "home"), "BENTOML_HOME": str(tmp_path / "bentoml")})
    assert done.returncode == 0, done.stderr[-3000:]
    *loaded, routes = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing serving.service loaded {loaded}"
    assert routes <= 4, "the routes are added in the worker, with the runtime they import"  # FastAPI's docs only
