"""The web page at `/` with a detector and an instance segmenter (this folder's endpoint), in headless Chromium: an
uploaded image comes back with the deployment's boxes drawn over it, labelled, one table row each, as `/predict`
answers them; the segmenter's outlines are filled in. A screenshot of each goes to test-output/screenshots/."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from support.browser import chromium, opened_page, screenshots_dir, wait_for
from support.servers import Server

from .test_detection_endpoint import png, samples

CHANGED_PIXELS = """([x, y]) => {
  // how many canvas pixels within 1 px of (x, y) differ from the uploaded image (kept in window.uploaded)
  const canvas = document.getElementById("boxes");
  const drawn = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const plain = window.uploaded;
  let changed = 0;
  for (let dy = -1; dy <= 1; dy++) for (let dx = -1; dx <= 1; dx++) {
    const [px, py] = [Math.round(x) + dx, Math.round(y) + dy];
    if (px < 0 || py < 0 || px >= canvas.width || py >= canvas.height) continue;
    const at = 4 * (py * canvas.width + px);
    if (Math.abs(drawn[at] - plain[at]) + Math.abs(drawn[at + 1] - plain[at + 1]) +
        Math.abs(drawn[at + 2] - plain[at + 2]) > 30) changed++;
  }
  return changed;
}"""
KEEP_UPLOAD = """async (scale) => {
  // the uploaded file's own pixels, enlarged as the page enlarges them, to tell what the page drew over it
  const file = document.getElementById("image").files[0];
  const picture = await createImageBitmap(file);
  const [width, height] = [picture.width * scale, picture.height * scale];
  const canvas = new OffscreenCanvas(width, height);
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = false;
  context.drawImage(picture, 0, 0, width, height);
  window.uploaded = context.getImageData(0, 0, width, height).data;
}"""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with chromium() as running:
        yield running


@pytest.fixture()
def page(browser, server: Server, keys: dict[str, str]):  # noqa: ANN001, ANN201 - Playwright's Browser and Page
    with opened_page(browser, f"{server.url}/", keys["primary"]) as opened:
        yield opened


@pytest.mark.parametrize("name", ["blue", "segments"])
def test_the_page_draws_a_deployments_boxes_over_the_image(page, server: Server, keys: dict[str, str],  # noqa: ANN001
                                                            name: str) -> None:
    image = next(sample.image for sample in samples(12, seed=43) if len(sample.objects) >= 2)
    data = png(image)
    answer = httpx.post(f"{server.url}/predict", content=data, timeout=120,
                        headers={"Authorization": f"Bearer {keys['primary']}", "Content-Type": "image/png",
                                 "x-lantern-deployment": name})
    assert answer.status_code == 200, answer.text
    boxes = answer.json()["predictions"][0]["boxes"]
    assert boxes, "the served model found nothing to draw in this image"

    page.fill("#deployment", name)
    page.set_input_files("#image", [{"name": "shapes.png", "mimeType": "image/png", "buffer": data}])
    page.focus("#run")
    page.keyboard.press("Enter")
    wait_for(page, "!document.getElementById('detections').hidden")
    scale = int(page.evaluate("document.getElementById('boxes').dataset.scale"))
    assert scale == 512 // max(image.size)  # a 96 px image drawn at 480 px, whole pixels
    page.evaluate(KEEP_UPLOAD, scale)
    assert page.evaluate(CHANGED_PIXELS, [2, 2]) == 0  # a corner with no box: the image as uploaded

    assert page.inner_text("#boxes-caption").startswith(f"{len(boxes)} detection(s)")
    assert page.inner_text("#served").startswith(f"deployment {name}, ")
    rows = page.locator("#labels tr")
    assert rows.count() == len(boxes)
    assert [rows.nth(i).locator("td").first.inner_text() for i in range(len(boxes))] == [b["label"] for b in boxes]
    width, height = image.size[0] * scale, image.size[1] * scale
    assert page.evaluate("[document.getElementById('boxes').width, document.getElementById('boxes').height]") == \
        [width, height]
    for found in boxes:
        box = found["box"]
        left_edge = [box["topX"] * width, (box["topY"] + box["bottomY"]) / 2 * height]
        assert page.evaluate(CHANGED_PIXELS, left_edge) > 0, f"no box drawn at {found}"
        for ring in found.get("polygon", []):  # the outline filled in: its middle is drawn over (the shapes are convex)
            middle = [sum(ring[0::2]) / (len(ring) / 2) * width, sum(ring[1::2]) / (len(ring) / 2) * height]
            assert page.evaluate(CHANGED_PIXELS, middle) > 0, f"outline not filled at {found}"
    if name == "segments":
        assert any(found.get("polygon") for found in boxes)
    page.screenshot(path=str(screenshots_dir() / f"detection-{name}.png"), full_page=True)
