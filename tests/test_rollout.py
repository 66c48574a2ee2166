"""End to end: the control plane of a running two-worker endpoint, driven over HTTP and through the CLI."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from support.common import LABELS, SMALL_SETTINGS, lantern_executable
from support.servers import Server, SlowUpload, png_bytes

FAST = {"request_timeout_ms": 30000, "max_concurrent_requests_per_instance": 16, "max_queue_wait_ms": 10000}
PROBE = {"initial_delay": 0, "period": 0.5}


def deployment(name: str, model: str = "models:/mc/1", **fields) -> dict:
    return {"name": name, "model": model, "request_settings": FAST, "readiness_probe": PROBE, **fields}


@pytest.fixture(scope="module")
def registered(module_store: str, checkpoints: dict[str, Path]) -> str:
    from registry.register import register_checkpoint

    for _ in range(2):  # versions 1 and 2 (same weights)
        register_checkpoint("mc", checkpoints["safetensors"], "small_cnn", LABELS, "multiclass", SMALL_SETTINGS)
    return module_store


@pytest.fixture(scope="module")
def server(registered: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANTERN_API_KEY", "LANTERN_ADMIN_KEY"))}
    config = {"name": "ops", "deployments": [deployment("blue")], "traffic": {"blue": 100}}
    running = Server(config, tmp_path_factory.mktemp("ops"), env, workers=2).start()
    yield running
    running.stop()


def credential(server: Server, kind: str) -> str:
    out = subprocess.run([lantern_executable(), "endpoint", "get-credentials", "ops", "--key", kind],
                         capture_output=True, text=True, check=True, env=server.env)
    return out.stdout.strip()


@pytest.fixture(scope="module")
def keys(server: Server) -> dict[str, str]:
    return {kind: credential(server, kind) for kind in ("primary", "secondary", "admin")}


class Admin:
    """The management API with the admin key; each change waits until every worker applied it."""

    def __init__(self, server: Server, key: str) -> None:
        self.server = server
        self.http = httpx.Client(base_url=f"{server.url}/manage", headers={"Authorization": f"Bearer {key}"},
                                 timeout=60)

    def endpoint(self) -> dict:
        response = self.http.get("/endpoint")
        assert response.status_code == 200, response.text
        return response.json()

    def applied(self, answer: httpx.Response) -> dict:
        assert answer.status_code in (200, 202), f"{answer.text}\n{self.server.log()}"
        revision = self.endpoint()["revision"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            view = self.endpoint()
            if view["applied"] and view["revision"] >= revision:
                return view
            time.sleep(0.05)
        raise AssertionError(f"revision {revision} not applied by every worker: {self.endpoint()['workers']}")

    def ready(self, name: str, generation: int | None = None) -> dict:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            view = self.http.get(f"/deployments/{name}").json()
            assert view["state"] != "failed", view
            if view["state"] == "ready" and (generation is None or view["generation"] == generation):
                return view
            time.sleep(0.1)
        raise AssertionError(f"deployment {name} not ready: {view}")

    def add(self, config: dict) -> dict:
        self.applied(self.http.post("/deployments", json=config))
        return self.ready(config["name"])

    def traffic(self, **split: int) -> dict:
        return self.applied(self.http.put("/traffic", json=split))

    def mirror(self, **split: int) -> dict:
        return self.applied(self.http.put("/mirror-traffic", json=split))

    def remove(self, name: str) -> dict:
        return self.applied(self.http.delete(f"/deployments/{name}"))

    def reset(self) -> None:
        """Back to blue=100 with no other deployment and no mirror."""
        view = self.endpoint()
        if view["mirror_traffic"]:
            self.mirror()
        if view["traffic"].get("blue") != 100:
            self.traffic(blue=100)
        for d in view["deployments"]:
            if d["name"] != "blue":
                self.remove(d["name"])


@pytest.fixture()
def admin(server: Server, keys: dict[str, str]) -> Iterator[Admin]:
    client = Admin(server, keys["admin"])
    client.reset()
    yield client
    client.reset()


def predict(server: Server, key: str, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}/predict", content=png_bytes(), timeout=60,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": "image/png", **headers})


def test_admin_key_alone_changes_the_endpoint(server: Server, keys: dict[str, str], admin: Admin) -> None:
    manage = f"{server.url}/manage"
    before = admin.endpoint()
    assert [w["revision"] for w in before["workers"]] and len(before["workers"]) == 2
    assert httpx.get(f"{manage}/endpoint").status_code == 401
    assert httpx.get(f"{manage}/endpoint", headers={"Authorization": "Bearer nope"}).status_code == 401
    for scoring in (keys["primary"], keys["secondary"]):
        refused = httpx.put(f"{manage}/traffic", json={"blue": 100}, headers={"Authorization": f"Bearer {scoring}"})
        assert refused.status_code == 403 and "admin key" in refused.json()["error"]["message"]
        assert httpx.post(f"{manage}/deployments", json=deployment("x"),
                          headers={"Authorization": f"Bearer {scoring}"}).status_code == 403
    assert predict(server, keys["admin"]).status_code == 401  # the admin key does not score
    assert predict(server, keys["primary"]).status_code == 200
    assert admin.endpoint()["revision"] == before["revision"]
    assert admin.endpoint()["key_fingerprints"]["admin"] == before["key_fingerprints"]["admin"]


def test_every_worker_says_where_a_deployment_runs(admin: Admin) -> None:
    provider = "CUDAExecutionProvider" if torch.cuda.is_available() else "CPUExecutionProvider"
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the deployments ask for device auto
    admin.add(deployment("green", backend="torch", device="cpu"))
    for name, backend, explain_device in (("blue", f"onnxruntime ({provider})", device),
                                          ("green", "torch (cpu)", "cpu")):
        workers = admin.http.get(f"/deployments/{name}").json()["workers"]
        assert len(workers) == 2
        assert {(w["backend"], w["explain_device"]) for w in workers.values()} == {(backend, explain_device)}, workers
    for worker in admin.endpoint()["workers"]:  # how full the GPU its deployments run on is: none here on a CPU
        if torch.cuda.is_available():
            [gpu] = worker["gpu_memory"]
            assert gpu["device"] == f"cuda:{torch.cuda.current_device()}", worker
            assert 0 < gpu["used_bytes"] <= gpu["total_bytes"] and gpu["torch_reserved_bytes"] >= 0, worker
        else:
            assert worker["gpu_memory"] == [], worker


def test_every_rule_refuses_the_whole_change(server: Server, admin: Admin) -> None:
    admin.add(deployment("green"))
    http = admin.http
    http.post("/deployments", json=deployment("late", readiness_probe={"initial_delay": 3600}))
    before = admin.endpoint()

    def refused(response: httpx.Response, status: int, text: str) -> None:
        assert response.status_code == status, response.text
        assert text in response.json()["error"]["message"], response.text

    refused(http.put("/traffic", json={"blue": 90}), 422, "sum to 100")
    refused(http.put("/traffic", json={"blue": 90, "green": 20}), 422, "sum to 100")
    refused(http.put("/traffic", json={"blue": 90, "red": 10}), 422, "unknown deployment")
    refused(http.put("/traffic", json={"blue": "90", "green": 10}), 422, "blue")
    refused(http.put("/traffic", json={"blue": 90.0, "green": 10}), 422, "blue")
    refused(http.put("/traffic", json={"blue": 101}), 422, "from 0 to 100")
    refused(http.put("/traffic", json={"blue": 90, "late": 10}), 409, "only ready deployments")
    refused(http.put("/mirror-traffic", json={"green": 51}), 422, "at most 50")
    refused(http.put("/mirror-traffic", json={"blue": 10}), 422, "live or mirrored")
    refused(http.put("/mirror-traffic", json={"green": 10, "late": 10}), 422, "one deployment")
    refused(http.put("/mirror-traffic", json={"red": 10}), 422, "unknown deployment")
    refused(http.delete("/deployments/blue"), 409, "live traffic")
    refused(http.delete("/deployments/red"), 404, "no deployment 'red'")
    refused(http.post("/deployments", json=deployment("green")), 409, "exists")
    refused(http.post("/deployments", json=deployment("red", "models:/nope/1")), 422, "nope")
    refused(http.post("/deployments", json=deployment("red", "https://example.com/model.onnx")), 422, "registry")
    refused(http.post("/deployments", json=deployment("red", settings={"valid_crop_size": -3})), 422, "valid_crop_size")
    refused(http.post("/deployments", json=deployment("Red_1")), 422, "not a valid name")
    refused(http.post("/deployments", json={**deployment("red"), "replicas": 3}), 422, "replicas")
    refused(http.post("/deployments", json={**deployment("red"), "instance_count": 2}), 422,
            "instance_count: unknown field (every worker of `lantern serve` runs each deployment")
    refused(http.post("/deployments", content=b"{oops", headers={"content-type": "application/json"}), 400, "JSON")
    refused(http.patch("/deployments/green", json={"name": "teal"}), 422, "renamed")
    refused(http.patch("/deployments/red", json={"model": "models:/mc/2"}), 404, "no deployment 'red'")
    refused(http.patch("/deployments/green", json={"max_batch_size": 0}), 422, "max_batch_size")
    refused(http.post("/keys/root/regenerate"), 404, "no key")
    after = admin.endpoint()
    assert (after["revision"], after["traffic"], after["mirror_traffic"]) == (
        before["revision"], before["traffic"], before["mirror_traffic"])
    admin.mirror(green=10)
    refused(http.put("/traffic", json={"blue": 50, "green": 50}), 422, "live or mirrored")
    refused(http.delete("/deployments/green"), 409, "mirrored")
    assert {d["name"]: d["state"] for d in admin.endpoint()["deployments"]}["late"] == "loading"


def test_split_follows_the_traffic_in_every_worker(server: Server, keys: dict[str, str], admin: Admin) -> None:
    admin.add(deployment("green"))
    pinned = predict(server, keys["primary"], **{"azureml-model-deployment": "green"})
    assert pinned.status_code == 200 and pinned.headers["x-lantern-deployment"] == "green"  # 0 % yet pinnable
    for split in ({"blue": 0, "green": 100}, {"blue": 100, "green": 0}):
        start = time.monotonic()
        view = admin.traffic(**split)
        print(f"traffic {split} answered and applied by {len(view['workers'])} workers in "
              f"{time.monotonic() - start:.2f} s")
        assert len(view["workers"]) == 2 and all(w["revision"] == view["revision"] for w in view["workers"])
        served = Counter(predict(server, keys["primary"]).headers["x-lantern-deployment"] for _ in range(40))
        assert served == Counter({max(split, key=split.get): 40})


def test_mirror_copies_without_touching_the_answer(server: Server, keys: dict[str, str], admin: Admin) -> None:
    admin.add(deployment("shadow"))
    admin.mirror(shadow=50)
    answered_before = server.metric("lantern_requests_total", deployment="shadow")
    copies_before = server.metric("lantern_mirrored_requests_total", deployment="shadow")
    completed_before = server.metric("lantern_mirrored_requests_total", deployment="shadow", outcome="completed")
    answers = [predict(server, keys["primary"]) for _ in range(60)]
    assert all(a.status_code == 200 and a.headers["x-lantern-deployment"] == "blue" for a in answers)
    pinned = [predict(server, keys["primary"], **{"x-lantern-deployment": "blue"}) for _ in range(20)]
    assert all(a.status_code == 200 for a in pinned)
    deadline, copies = time.monotonic() + 30, 0.0
    while time.monotonic() < deadline:  # copies are answered in the background
        copies = server.metric("lantern_mirrored_requests_total", deployment="shadow") - copies_before
        time.sleep(0.5)
        if copies == server.metric("lantern_mirrored_requests_total", deployment="shadow") - copies_before:
            break
    completed = server.metric("lantern_mirrored_requests_total", deployment="shadow", outcome="completed") \
        - completed_before
    print(f"mirror 50 %: {copies:.0f} copies of 60 unpinned requests (20 pinned ones not mirrored)")
    assert 12 <= copies <= 48  # 60 draws at 50 %: 30 +- 4.6 sd; pinned requests are never mirrored
    assert completed == copies  # every copy answered by shadow, none counted as a caller's request
    assert server.metric("lantern_requests_total", deployment="shadow") == answered_before
    view = admin.http.get("/deployments/shadow").json()
    assert view["mirror_traffic"] == 50 and sum(view["counters"]["mirrored"].values()) >= copies


def test_deployments_of_one_version_fill_batches_together(server: Server, keys: dict[str, str], admin: Admin) -> None:
    """Twin serves blue's version with other request settings: requests pinned to each are answered by their own
    deployment, and model calls mix them (a mixed call counts its whole size for each deployment in it, so the batch
    sizes add up to more than the images). Twin shares blue's loaded model in each worker. Twin's removal leaves
    blue's model and batches running."""
    from concurrent.futures import ThreadPoolExecutor

    admin.add(deployment("twin", request_settings={**FAST, "request_timeout_ms": 20000}))
    loaded = [line for line in server.log_path.read_text(errors="replace").splitlines()
              if "deployment twin loaded: models:/mc/1" in line]
    assert len(loaded) == 2 and all("(shared with another deployment)" in line for line in loaded), loaded
    workers = {name: admin.http.get(f"/deployments/{name}").json()["workers"] for name in ("blue", "twin")}
    assert [w["shares_model_with"] for w in workers["twin"].values()] == [["blue"], ["blue"]], workers
    assert [w["shares_model_with"] for w in workers["blue"].values()] == [["twin"], ["twin"]], workers
    assert "model shared with twin" in cli(server, keys["admin"], "endpoint", "show").stdout

    def totals() -> tuple[float, float]:
        return (sum(server.metric("lantern_batch_size_sum", deployment=d) for d in ("blue", "twin")),
                sum(server.metric("lantern_images_total", deployment=d) for d in ("blue", "twin")))

    with ThreadPoolExecutor(16) as clients:
        for burst in range(5):  # 16 clients at once, half pinned to each: the first burst mixes in practice
            (sizes_before, images_before) = totals()
            pins = ["blue", "twin"] * 24
            answers = list(clients.map(lambda pin: predict(server, keys["primary"], **{"x-lantern-deployment": pin}),
                                       pins))
            assert [(a.status_code, a.headers["x-lantern-deployment"]) for a in answers] == \
                [(200, pin) for pin in pins]
            sizes, images = totals()
            assert images - images_before == len(pins)
            print(f"burst {burst}: batch sizes {sizes - sizes_before:.0f} for {len(pins)} images")
            if sizes - sizes_before > images - images_before:
                break
        else:
            raise AssertionError("no model call mixed blue's and twin's images in 5 bursts of 48 requests")
    admin.remove("twin")
    assert all(predict(server, keys["primary"]).status_code == 200 for _ in range(10))
    deadline = time.monotonic() + 30  # each worker publishes its status once it has let twin go
    while any(w["shares_model_with"] for w in admin.http.get("/deployments/blue").json()["workers"].values()):
        assert time.monotonic() < deadline, "blue still shows its model shared after twin's removal"
        time.sleep(0.2)


def test_update_readies_a_new_generation_while_the_old_one_serves(server: Server, keys: dict[str, str],
                                                                  admin: Admin) -> None:
    assert predict(server, keys["primary"]).headers["x-lantern-model-version"] == "models:/mc/1"
    answer = admin.http.patch("/deployments/blue", json={"model": "models:/mc/2",
                                                         "settings": {"valid_crop_size": 28}})
    assert answer.status_code == 202 and answer.json()["generation"] == 2
    statuses = [predict(server, keys["primary"]).status_code for _ in range(20)]  # while generation 2 loads
    view = admin.ready("blue", generation=2)
    assert statuses == [200] * 20
    assert view["model_version"] == "models:/mc/2" and view["config"]["settings"] == {"valid_crop_size": 28}
    assert view["settings"]["valid_crop_size"] == 28 and view["labels"] == LABELS
    served = {predict(server, keys["primary"]).headers["x-lantern-model-version"] for _ in range(10)}
    assert served == {"models:/mc/2"}
    same = admin.http.patch("/deployments/blue", json={"settings": {"valid_crop_size": 28}}).json()
    assert same["generation"] == 2  # no change, no new generation
    admin.applied(admin.http.patch("/deployments/blue", json={"model": "models:/mc/1", "settings": None}))
    assert admin.ready("blue", generation=3)["model_version"] == "models:/mc/1"


def test_concurrent_updates_of_different_fields_both_hold(server: Server, admin: Admin) -> None:
    """Two PATCHes at once, through either worker: each is merged on the record as it is when written, so neither
    loses the other's change (the merge was made outside the state's lock: the last write won)."""
    admin.add(deployment("patchy"))
    for round_ in range(3):
        patches = [{"settings": {"valid_crop_size": 28 + round_}},
                   {"request_settings": {**FAST, "max_queue_wait_ms": 9000 - round_}}]
        barrier = threading.Barrier(len(patches))
        answers: list[httpx.Response] = []

        def send(patch: dict) -> None:
            with httpx.Client(base_url=admin.http.base_url, headers=admin.http.headers, timeout=60) as http:
                barrier.wait()
                answers.append(http.patch("/deployments/patchy", json=patch))

        threads = [threading.Thread(target=send, args=(patch,)) for patch in patches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [answer.status_code for answer in answers] == [202, 202], [answer.text for answer in answers]
        config = admin.http.get("/deployments/patchy").json()["config"]
        assert config["settings"] == {"valid_crop_size": 28 + round_}
        assert config["request_settings"]["max_queue_wait_ms"] == 9000 - round_


def test_an_update_fails_no_upload_or_explanation_routed_before_it(server: Server, keys: dict[str, str],
                                                                   admin: Admin) -> None:
    """Requests routed to a generation keep it until they are answered: uploads still in progress when an update
    swaps the generation (not yet admitted), an explanation among them (never counted by the deployment's
    admission), finish on the old generation well after it was replaced; it retires only then."""
    admin.add(deployment("canary"))
    image = png_bytes()
    score = json.dumps({"input_data": {"columns": ["image"], "data": [base64.b64encode(image).decode()]}}).encode()
    pinned = {"Authorization": f"Bearer {keys['primary']}", "x-lantern-deployment": "canary"}
    uploads = [SlowUpload(server.url, "/score", score, {**pinned, "Content-Type": "application/json"}, len(score) // 2)
               for _ in range(4)]
    uploads += [SlowUpload(server.url, "/explain?method=integrated_gradients&n_steps=64", image,
                           {**pinned, "Content-Type": "image/png"}, len(image) // 2) for _ in range(2)]
    time.sleep(0.5)  # routed to generation 1 in both workers
    admin.applied(admin.http.patch("/deployments/canary", json={"model": "models:/mc/2"}))
    admin.ready("canary", generation=2)
    time.sleep(3)  # past the old generation's grace period: it retired here before
    answers = [upload.finish() for upload in uploads]
    assert [answer.status_code for answer in answers] == [200] * 6, [answer.text for answer in answers]
    assert {answer.headers["x-lantern-model-version"] for answer in answers} == {"models:/mc/1"}
    assert predict(server, keys["primary"], **{"x-lantern-deployment": "canary"}).headers[
        "x-lantern-model-version"] == "models:/mc/2"
    deadline = time.monotonic() + 30  # and the old generation retires once they are answered
    while "deployment canary generation 1 retired" not in server.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, "generation 1 of canary did not retire"
        time.sleep(0.2)


def test_clients_that_hang_up_mid_body_change_nothing_and_log_no_error(server: Server, keys: dict[str, str],
                                                                        admin: Admin) -> None:
    """A management change or a prediction whose client leaves while its body is uploading: nothing changes, and the
    server's log says nothing of it (it was logged as an unexpected error, with a 500 counted)."""
    before = admin.endpoint()["revision"]
    body = json.dumps({"blue": 100}).encode()
    uploads = [SlowUpload(server.url, "/manage/traffic", body,
                          {"Authorization": f"Bearer {keys['admin']}", "Content-Type": "application/json"}, 5,
                          method="PUT"),
               SlowUpload(server.url, "/predict", png_bytes(),
                          {"Authorization": f"Bearer {keys['primary']}", "Content-Type": "image/png"}, 20)]
    time.sleep(0.5)
    for upload in uploads:
        upload.abandon()
    time.sleep(1)
    assert admin.endpoint()["revision"] == before
    assert predict(server, keys["primary"]).status_code == 200
    assert "unexpected error" not in server.log_path.read_text(errors="replace")


def cli(server: Server, admin_key: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**server.env, "LANTERN_URL": server.url, "LANTERN_ADMIN_KEY": admin_key}
    result = subprocess.run([lantern_executable(), *args], capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_cli_changes_wait_until_they_take_effect(server: Server, keys: dict[str, str], admin: Admin) -> None:
    added = cli(server, keys["admin"], "deploy", "add", "green", "models:/mc/2", "--set", "valid_crop_size=28",
                "--set", "readiness_probe.period=0.5", "--set", "readiness_probe.initial_delay=0")
    assert "green is ready in every worker: models:/mc/2" in added.stderr
    cli(server, keys["admin"], "traffic", "mirror", "green=20")
    assert admin.endpoint()["mirror_traffic"] == {"green": 20}
    cli(server, keys["admin"], "traffic", "mirror", "--off")
    cli(server, keys["admin"], "traffic", "set", "blue=90", "green=10")
    view = admin.endpoint()
    assert view["traffic"] == {"blue": 90, "green": 10} and view["applied"]
    shown = cli(server, keys["admin"], "endpoint", "show")
    assert "green" in shown.stdout and "10 %" in shown.stdout and "ready" in shown.stdout
    words = " ".join(shown.stdout.split())  # rich wraps long lines
    assert "onnxruntime" in words and words.count(" MiB)") == 2, shown.stdout  # each worker's memory
    assert ("GiB in use by every process on it" in words) == torch.cuda.is_available(), shown.stdout  # the GPU's
    as_json = json.loads(cli(server, keys["admin"], "endpoint", "show", "--json").stdout)
    assert as_json["traffic"] == {"blue": 90, "green": 10}
    assert all(100 * 2**20 < worker["memory_bytes"] < 20 * 2**30 for worker in as_json["workers"]), as_json["workers"]
    refused = cli(server, keys["admin"], "deploy", "remove", "green", check=False)
    assert refused.returncode == 2 and "live traffic" in refused.stderr
    updated = cli(server, keys["admin"], "deploy", "update", "green", "--model", "models:/mc/1")
    assert "serves generation 2 in every worker: models:/mc/1" in updated.stderr
    again = cli(server, keys["admin"], "deploy", "update", "green", "--model", "models:/mc/1")
    assert "green unchanged: generation 2 already serves models:/mc/1" in " ".join(again.stderr.split())
    assert "updated" not in again.stderr and admin.http.get("/deployments/green").json()["generation"] == 2
    cli(server, keys["admin"], "traffic", "set", "blue=100")
    cli(server, keys["admin"], "deploy", "remove", "green")
    assert [d["name"] for d in admin.endpoint()["deployments"]] == ["blue"]
    wrong = cli(server, keys["primary"], "endpoint", "show", check=False)
    assert wrong.returncode == 2 and "403" in wrong.stderr


def test_regenerated_key_replaces_the_old_one_in_every_worker(server: Server, keys: dict[str, str],
                                                              admin: Admin) -> None:
    old = keys["secondary"]
    new = cli(server, keys["admin"], "keys", "regenerate", "secondary").stdout.strip()
    assert new and new != old and credential(server, "secondary") == new
    assert all(predict(server, old).status_code == 401 for _ in range(10))
    assert all(predict(server, new).status_code == 200 for _ in range(10))
    keys["secondary"] = new


def test_rollout_command_moves_traffic_and_rolls_back(server: Server, keys: dict[str, str], admin: Admin) -> None:
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(timeout=60) as client:
            while not stop.is_set():
                client.post(f"{server.url}/predict", content=png_bytes(),
                            headers={"Authorization": f"Bearer {keys['primary']}", "Content-Type": "image/png"})

    clients = [threading.Thread(target=load) for _ in range(4)]
    for thread in clients:
        thread.start()
    try:
        done = cli(server, keys["admin"], "rollout", "green", "models:/mc/2", "--steps", "50,100", "--interval", "2s",
                   "--min-requests", "5", "--max-p99-ms", "60000", "--set", "readiness_probe.initial_delay=0")
        assert "rollout of green done: blue=0, green=100" in done.stderr
        assert admin.endpoint()["traffic"] == {"blue": 0, "green": 100}
        failed = cli(server, keys["admin"], "rollout", "teal", "models:/mc/1", "--steps", "10,100", "--interval",
                     "20s", "--min-requests", "5", "--max-p99-ms", "1", "--set", "readiness_probe.initial_delay=0",
                     check=False)
    finally:
        stop.set()
        for thread in clients:
            thread.join()
    assert failed.returncode == 1 and "Rolled back" in failed.stderr and "p99 latency" in failed.stderr
    view = admin.endpoint()
    assert view["traffic"] == {"blue": 0, "green": 100, "teal": 0}
    admin.traffic(blue=100)


def test_live_rollout_loses_no_request(server: Server, keys: dict[str, str], admin: Admin) -> None:
    """20 clients send requests while blue=100 -> 90/10 -> 50/50 -> 0/100 and blue is removed and re-added, ten
    times; no request fails and the observed split matches the configured one."""
    admin.add(deployment("green"))
    stop = threading.Event()
    results: list[tuple[float, float, int, str]] = []  # sent, answered, status, deployment
    lock = threading.Lock()
    image = base64.b64encode(png_bytes()).decode()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    answer = http.post(f"{server.url}/score", headers={"Authorization": f"Bearer {keys['primary']}"},
                                       json={"input_data": {"columns": ["image"], "data": [image]}})
                    outcome = (answer.status_code, answer.headers.get("x-lantern-deployment", ""))
                except httpx.HTTPError as error:
                    outcome = (0, type(error).__name__)
                with lock:
                    results.append((sent, time.monotonic(), *outcome))

    phases: list[tuple[float, float, int]] = []  # start, end, green percent
    threads = [threading.Thread(target=client) for _ in range(20)]
    for thread in threads:
        thread.start()
    try:
        for cycle in range(10):
            for green in (0, 10, 50, 100):
                admin.traffic(blue=100 - green, green=green)
                start = time.monotonic()
                time.sleep(1.0)
                phases.append((start, time.monotonic(), green))
            admin.remove("blue")
            admin.add(deployment("blue"))
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    statuses = Counter(status for _, _, status, _ in results)
    print(f"live rollout: {len(results)} requests, statuses {dict(statuses)}")
    failed = [r for r in results if r[2] != 200]
    if failed:  # the server's log without its access lines: a worker that died says why there
        log = server.log_path.read_text(errors="replace").splitlines()
        pytest.fail(f"{len(failed)} requests failed, e.g. {failed[:5]}; server log:\n"
                    + "\n".join([line for line in log if "(scheme=http" not in line][-60:]))
    for green in (0, 10, 50, 100):
        served = Counter(d for start, end, g in phases if g == green
                         for sent, answered, _, d in results if start <= sent and answered <= end)
        total = served["blue"] + served["green"]
        share = served["green"] / total
        tolerance = 4 * (green / 100 * (1 - green / 100) / total) ** 0.5
        print(f"  blue={100 - green} green={green}: {total} requests, green share {share:.3f} (+-{tolerance:.3f})")
        assert total >= 100 and set(served) <= {"blue", "green"}
        assert abs(share - green / 100) <= tolerance


def test_a_damaged_state_file_is_logged_once_and_serving_goes_on(server: Server, keys: dict[str, str],
                                                                 admin: Admin) -> None:
    """A state file broken by hand: every worker keeps serving its last good state and logs the problem once (not
    at each of its 5 polls a second), a change is refused naming the file, and the log says when it works again."""
    path = Path(os.environ["LANTERN_HOME"]) / "endpoints" / "ops" / "state.json"
    good = path.read_text()
    logged = len(server.log_path.read_text(errors="replace"))

    def replace_with(text: str) -> None:
        """In one step, as an editor saves: with `write_text` a worker's poll could read the empty file between its
        truncation and its write, and log that other error too."""
        temporary = path.with_suffix(".tmp")
        temporary.write_text(text)
        os.replace(temporary, path)

    replace_with("{damaged by hand")
    try:
        time.sleep(2)  # about 10 polls in each worker
        assert predict(server, keys["primary"]).status_code == 200
        refused = admin.http.put("/traffic", json={"blue": 100})
        assert refused.status_code == 422 and "damaged" in refused.json()["error"]["message"], refused.text
    finally:
        replace_with(good)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        log = server.log_path.read_text(errors="replace")[logged:]
        if log.count("following the endpoint state works again") >= 2:
            break
        time.sleep(0.2)
    assert log.count("following the endpoint state failed") == 2, log[-3000:]  # once in each of the 2 workers
    assert log.count("following the endpoint state works again") == 2, log[-3000:]
    assert predict(server, keys["primary"]).status_code == 200


def test_restart_comes_back_with_the_same_state(server: Server, keys: dict[str, str]) -> None:
    """Last in this module: it stops the module's server, with a request in flight, which is answered in full before
    the server ends (SIGTERM lets in-flight requests finish, as an orchestrator's rolling restart expects; new
    connections are refused). The restarted server drains before it stops (`--drain-seconds`)."""
    admin = Admin(server, keys["admin"])
    admin.reset()
    admin.add(deployment("green"))
    admin.traffic(blue=70, green=30)
    before = admin.endpoint()
    row = json.dumps({"image_base64": base64.b64encode(png_bytes()).decode(), "model_explainability": True,
                      "xai_parameters": {"xai_algorithm": "xrai", "n_steps": 256}})
    answers: list[httpx.Response] = []
    in_flight = threading.Thread(target=lambda: answers.append(httpx.post(
        f"{server.url}/score", json={"input_data": {"columns": ["image"], "data": [row] * 8}}, timeout=120,
        headers={"Authorization": f"Bearer {keys['primary']}"})))
    explained = server.metric("lantern_explanation_duration_seconds_count")
    in_flight.start()
    deadline = time.monotonic() + 60  # its first row explained: the request is under way, 7 rows to go
    while server.metric("lantern_explanation_duration_seconds_count") == explained and time.monotonic() < deadline:
        time.sleep(0.01)
    server.stop()
    in_flight.join(60)
    assert answers and answers[0].status_code == 200, answers and answers[0].text
    assert [bool(answer["visualizations"]) for answer in answers[0].json()] == [True] * 8
    with pytest.raises(httpx.ConnectError):
        predict(server, keys["primary"])
    restarted = Server(yaml_config(server), server.folder, server.env, workers=2, options=("--drain-seconds", "5"))
    restarted.config_path = server.config_path
    restarted.start()
    try:
        again = Admin(restarted, keys["admin"])
        deadline = time.monotonic() + 120
        while not all(d["state"] == "ready" for d in again.endpoint()["deployments"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        after = again.endpoint()
        assert (after["revision"], after["traffic"], after["key_fingerprints"]) == (
            before["revision"], before["traffic"], before["key_fingerprints"])
        assert [(d["name"], d["generation"], d["state"]) for d in after["deployments"]] == [
            (d["name"], d["generation"], "ready") for d in before["deployments"]]
        assert predict(restarted, keys["primary"]).status_code == 200
        assert "restored" in restarted.log()
        drains_then_stops(restarted, keys["primary"])
    finally:
        restarted.stop()


def drains_then_stops(server: Server, key: str) -> None:
    """SIGTERM to `lantern serve` alone, as an orchestrator sends it, with `--drain-seconds`: every worker is unready at
    once but answers on, each answer closing its connection (so clients reconnect through the load balancer); then the
    server stops."""
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 4
    while httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200:
        assert time.monotonic() < deadline, "still ready after SIGTERM"
        time.sleep(0.05)
    time.sleep(0.2)  # the arbiter signals the workers one after the other
    answers = [predict(server, key) for _ in range(4)]
    assert [(answer.status_code, answer.headers.get("connection")) for answer in answers] == [(200, "close")] * 4
    assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503
    server.process.wait(timeout=60)
    with pytest.raises(httpx.ConnectError):
        predict(server, key)
    log = server.log()
    assert log.count("SIGTERM: draining for 5 s") == 2, log  # one line per worker


def yaml_config(server: Server) -> dict:
    import yaml

    return yaml.safe_load(server.config_path.read_text())
