"""The web page at `/` in headless Chromium against a real server, as a user drives it: an image's labels and heat
map (submitted from the keyboard), two deployments' explanations side by side with how alike they are, a batch
through an explanation job to its download, and the operator's view shifting traffic after a confirmation. A
screenshot of each view goes to test-output/screenshots/."""

from __future__ import annotations

import base64
import io
import json
import zipfile

import httpx
import numpy as np
import pytest
from scipy.stats import spearmanr

from support.browser import opened_page, screenshots_dir, wait_for
from support.servers import Server, png_bytes

IG = {"method": "integrated_gradients", "params": {"n_steps": 8}}


@pytest.fixture()
def page(browser, server: Server, keys: dict[str, str]):  # noqa: ANN001, ANN201 - Playwright's Browser and Page
    with opened_page(browser, f"{server.url}/", keys["scoring"]) as opened:
        yield opened


def image_file(name: str, data: bytes) -> dict:
    return {"name": name, "mimeType": "image/png", "buffer": data}


def predict_and_explain(page, image: bytes, method: str = "integrated_gradients") -> None:  # noqa: ANN001
    page.set_input_files("#image", [image_file("circle.png", image)])
    page.select_option("#method", method)
    page.fill("#n_steps", "8")
    page.focus("#run")
    page.keyboard.press("Enter")  # keyboard-usable: no mouse needed
    wait_for(page, "document.getElementById('heatmap').complete && "
                           "document.getElementById('heatmap').naturalWidth > 0 && "
                           "!document.getElementById('heatmap').hidden")


def test_an_image_shows_its_labels_and_heat_map(page) -> None:  # noqa: ANN001
    predict_and_explain(page, png_bytes())
    assert page.locator("#labels tr").count() == 3
    assert "deployment blue, models:/mc/1" in page.inner_text("#served")
    caption = page.inner_text("#caption")
    assert caption.startswith("integrated_gradients for ") and "models:/mc/1" in caption
    assert page.evaluate("document.getElementById('heatmap').naturalWidth") > 32  # the 2 x 2 grid
    page.screenshot(path=str(screenshots_dir() / "predict-and-explain.png"), full_page=True)

    page.set_viewport_size({"width": 390, "height": 844})  # a phone: nothing wider than the screen
    assert page.evaluate("document.documentElement.scrollWidth") <= 391
    page.screenshot(path=str(screenshots_dir() / "phone.png"), full_page=True)


def importance(answer: dict) -> np.ndarray:
    attributions = np.load(io.BytesIO(base64.b64decode(answer["explanations"][0]["attributions"])))
    return np.abs(attributions.astype(np.float64)).sum(0).ravel()


def test_two_deployments_side_by_side_with_their_similarity(page, server: Server,  # noqa: ANN001
                                                           keys: dict[str, str]) -> None:
    image = png_bytes()
    predict_and_explain(page, image)
    choices = page.locator("#compare-choices input")
    assert sorted(choices.evaluate_all("inputs => inputs.map(i => i.value)")) == ["blue", "green", "other"]

    def compare(*names: str) -> str:
        for name in ("blue", "green", "other"):
            page.set_checked(f"#compare-choices input[value={name}]", name in names)
        page.click("#compare-run")
        wait_for(page, f"document.querySelectorAll('#compare-maps img').length === {len(names)} && "
                               "[...document.querySelectorAll('#compare-maps img')].every(i => i.complete && "
                               "i.naturalWidth > 0) && document.getElementById('similarity').textContent !== ''")
        return page.inner_text("#similarity")

    same = compare("blue", "green")  # the same weights: the same map
    assert "blue vs green: Spearman ρ 1.000, top-10 % overlap 100 %" in same
    captions = page.locator("#compare-maps figcaption").all_inner_texts()
    assert captions[0].startswith("blue: models:/mc/1") and captions[1].startswith("green: models:/mc/2")
    page.screenshot(path=str(screenshots_dir() / "compare-same-weights.png"), full_page=True)

    differ = compare("blue", "other")
    label = page.locator("#compare-maps figcaption").first.inner_text().split('"')[1]
    shown_rho = float(page.get_attribute("#similarity", "data-spearman"))
    shown_overlap = float(page.get_attribute("#similarity", "data-overlap"))
    answers = [httpx.post(f"{server.url}/explain", timeout=60, json={
        "image_base64": base64.b64encode(image).decode(), "targets": [label], **IG},
        headers={"Authorization": f"Bearer {keys['scoring']}", "x-lantern-deployment": name}).json()
        for name in ("blue", "other")]
    a, b = (importance(answer) for answer in answers)
    assert shown_rho == pytest.approx(spearmanr(a, b).statistic, abs=1e-3) and shown_rho < 0.999, differ
    k = int(np.ceil(0.1 * a.size))
    overlap = len(set(np.argsort(-a, kind="stable")[:k]) & set(np.argsort(-b, kind="stable")[:k])) / k
    assert shown_overlap == pytest.approx(overlap, abs=0.03)
    assert f"blue vs other: Spearman ρ {shown_rho:.3f}" in differ
    page.screenshot(path=str(screenshots_dir() / "compare.png"), full_page=True)


def test_a_batch_runs_as_a_job_to_its_download(page) -> None:  # noqa: ANN001
    page.set_input_files("#image", [image_file("circle.png", png_bytes()),
                                    image_file("square.png", png_bytes(shape="square")),
                                    image_file("broken.png", b"not an image at all")])
    page.select_option("#method", "guided_backprop")
    page.click("#run")
    page.wait_for_selector("#batch-download:not([hidden])", timeout=120000)
    assert page.evaluate("[document.getElementById('batch-progress').value, "
                         "document.getElementById('batch-progress').max]") == [2, 2]  # in explanations
    state = page.inner_text("#batch-state")
    assert ": succeeded, 3 of 3 images (2 of 2 explanations) on deployment blue" in state
    rows = page.locator("#batch-images tr").all_inner_texts()
    assert "broken.png\tfailed\tunsupported_media_type" in rows[2]
    page.screenshot(path=str(screenshots_dir() / "batch-job.png"), full_page=True)
    with page.expect_download() as download:
        page.click("#batch-download")
    with zipfile.ZipFile(download.value.path()) as archive:
        document = json.loads(archive.read("result.json"))
    assert [row["name"] for row in document["results"]] == ["circle.png", "square.png", "broken.png"]


def test_the_operator_view_shifts_traffic_after_a_confirmation(page, server: Server,  # noqa: ANN001
                                                               keys: dict[str, str]) -> None:
    manage = httpx.Client(base_url=f"{server.url}/manage", headers={"Authorization": f"Bearer {keys['admin']}"},
                          timeout=60)
    page.click("#operator summary")
    page.fill("#admin-key", keys["admin"])
    page.click("#admin-load")
    page.wait_for_selector("#state:not([hidden])")
    rows = page.locator("#state-table tbody tr")
    assert rows.count() == 3 and "blue" in rows.first.inner_text() and "models:/mc/1" in rows.first.inner_text()
    try:
        page.fill("#state-table tr[data-deployment=blue] input", "0")
        page.fill("#state-table tr[data-deployment=green] input", "100")
        page.once("dialog", lambda dialog: dialog.dismiss())  # not confirmed: nothing changes
        page.click("#traffic-apply")
        page.wait_for_timeout(500)
        assert manage.get("/endpoint").json()["traffic"]["blue"] == 100
        messages: list[str] = []
        page.once("dialog", lambda dialog: (messages.append(dialog.message), dialog.accept()))
        page.click("#traffic-apply")
        wait_for(page, "document.getElementById('traffic-status').textContent.startsWith('revision')")
        assert messages == ["Shift the live traffic to: blue 0 %, green 100 %, other 0 %?"]
        assert manage.get("/endpoint").json()["traffic"] == {"blue": 0, "green": 100, "other": 0}
        wait_for(page, "document.querySelector('#state-table tr[data-deployment=green] input').value "
                               "=== '100'")
        page.screenshot(path=str(screenshots_dir() / "operator.png"), full_page=True)
    finally:
        manage.put("/traffic", json={"blue": 100})
