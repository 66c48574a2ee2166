"""Updates: a new generation readied while the old one serves, concurrent updates, requests routed before an
update answered by the old generation, clients hanging up mid-body."""

from __future__ import annotations

import base64
import json
import threading
import time

import httpx

from support.common import LABELS
from support.operations import FAST, Admin, deployment, predict
from support.servers import Server, SlowUpload, png_bytes


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
