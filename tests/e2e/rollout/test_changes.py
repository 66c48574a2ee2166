"""The management API's changes: the admin key alone, every worker's view, rules that refuse a whole change, the
split and the mirror followed by every worker, and deployments of one version batching together."""

from __future__ import annotations

import time
from collections import Counter

import httpx
import torch

from support.operations import FAST, Admin, cli, deployment, predict
from support.servers import Server


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
