"""The composer app as a person uses it: Playwright (Python, sync API) driving Debian's Chromium (/usr/bin/chromium).

Playwright never downloads a browser here: it launches the system Chromium by path, headless, with the flags a
closed-network machine needs. The test opens the served app, checks that Generate without a LoRA shows an error
in the page, uploads two LoRA files it made, sets two boxes in the numeric fields, clicks Generate and waits for
the image in the gallery. A full-page screenshot goes to $VISADAPT_TEST_ARTIFACTS or <repo>/test-artifacts/.
"""

import io
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image, ImageChops

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's Chromium is not installed (/usr/bin/chromium): apt-get install -y chromium",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed "
                                                             "(pip install playwright; no `playwright install`)")

from visadapt.apps import composer  # noqa: E402
from visadapt.diffusion.tiny import save_random_lora  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("VISADAPT_TEST_ARTIFACTS") or Path(__file__).parents[1] / "test-artifacts")
TIMEOUT_MS = 30_000
GENERATION_MS = 120_000  # a generation on a busy 2-core CI machine


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pipe = composer.load_pipeline(device="cpu")
    folder = tmp_path_factory.mktemp("loras")
    loras = [save_random_lora(pipe, folder / f"{n}.safetensors", seed=i + 1) for i, n in enumerate(("cat", "dog"))]
    out = tmp_path_factory.mktemp("app-out")
    app = composer.build_app(pipe, max_lora_mb=4, output_dir=out)
    _, url, _ = composer.launch(app, port=None, max_lora_mb=4, output_dir=out, prevent_thread_lock=True, quiet=True)
    try:
        yield url, loras
    finally:
        app.close()


@pytest.fixture()
def page(tmp_path):
    with sync_api.sync_playwright() as p:
        # A fresh profile per test; persistent context because Chromium's --user-data-dir is set this way.
        context = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=CHROMIUM_ARGS)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            context.close()


def fill(page, label: str, value) -> None:
    field = page.get_by_label(label, exact=True)
    field.fill(str(value))
    field.press("Tab")  # commit the value as a person leaving the field does


def test_compose_two_loras_in_the_browser(served, page):
    url, loras = served
    page.goto(url)
    generate = page.locator("button", has_text="Generate").first
    generate.wait_for()

    # An error is shown in the page, and the app keeps working afterwards.
    generate.click()
    page.get_by_text("no LoRA file").first.wait_for()

    fill(page, "Prompt", "a cat and a dog in a park")
    for i, (path, name, box) in enumerate(zip(loras, ("cat", "dog"), ((0.0, 0.1, 0.45, 0.9), (0.55, 0.2, 1.0, 1.0))),
                                          start=1):
        # The innermost block labelled "LoRA i": an uploaded File drops its input, so no index across slots.
        block = page.locator(".block", has_text=f"LoRA {i} (.safetensors or ED-LoRA .pth)").last
        block.locator("input[type=file]").set_input_files(str(path))
        # Upload finished: the File lists it. Its filename cell splits stem and suffix into two spans ("dog"
        # ".safetensors"), so the full name is its aria-label, not its text: waiting for the text timed out in 3 of 6
        # runs on busy cores with the file listed (it passed only when it caught the name elsewhere during the upload).
        block.get_by_label(path.name, exact=True).wait_for()
        fill(page, f"Name {i}", name)
        fill(page, f"Regional prompt {i}", f"a photo of a {name}")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), box):
            fill(page, f"{key} {i}", value)

    generate.click()
    image = page.locator("img[src*='composed-seed']").first
    image.wait_for(state="visible", timeout=GENERATION_MS)
    assert image.evaluate("img => img.complete && img.naturalWidth") == 64
    caption = page.get_by_text("cat@1 [0, 0.1, 0.45, 0.9]").first
    caption.wait_for()
    assert "dog@1 [0.55, 0.2, 1, 1]" in caption.inner_text()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "composer-app.png"), full_page=True)


def test_two_clicks_on_the_preview_set_a_box(served, page):
    url, _ = served
    page.goto(url)
    page.locator("label", has_text="2").filter(has=page.locator("input[type=radio]")).first.click()
    preview = page.locator("#box-preview img").first
    preview.wait_for(state="visible")
    size = preview.bounding_box()
    preview.click(position={"x": 0.2 * size["width"], "y": 0.3 * size["height"]})
    # No wait between the clicks: the queue runs this session's select events one at a time, in order.
    preview.click(position={"x": 0.7 * size["width"], "y": 0.9 * size["height"]})
    xmax = page.get_by_label("xmax 2", exact=True)
    page.wait_for_function("el => Math.abs(parseFloat(el.value) - 0.7) < 0.02", arg=xmax.element_handle())
    values = [float(page.get_by_label(f"{k} 2", exact=True).input_value()) for k in ("xmin", "ymin", "xmax", "ymax")]
    assert values == pytest.approx([0.2, 0.3, 0.7, 0.9], abs=0.02)
    assert float(page.get_by_label("xmin 1", exact=True).input_value()) == 0  # the other concept is untouched


def test_the_whole_preview_canvas_is_visible_and_clickable(served, page):
    url, _ = served
    page.goto(url)
    preview = page.locator("#box-preview img").first
    preview.wait_for(state="visible")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=preview.element_handle())
    size = preview.bounding_box()
    assert size["width"] > 100 and size["height"] > 100
    # No label or button lies over the canvas, not even one that lets clicks through: the pixels on the screen are
    # the preview's own, top rows included (boxes at ymin 0 start there).
    shot = Image.open(io.BytesIO(page.screenshot(clip=size))).convert("RGB")
    drawn = composer.draw_boxes(64, 64, [  # the tiny pipeline's default 64×64 canvas and two default boxes
        ("concept1", (0.0, 0.0, 0.5, 1.0)), ("concept2", (0.5, 0.0, 1.0, 1.0))])
    assert shot.size == drawn.size
    difference = ImageChops.difference(shot, drawn).convert("L")
    top = difference.crop((0, 0, drawn.width, 24))
    assert max(top.getdata()) < 64, "something covers the top of the preview"
    assert max(difference.getdata()) < 64
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator("#box-preview").screenshot(path=str(ARTIFACTS / "composer-preview.png"))

    # A corner on the top row of the canvas sets ymin 0.
    page.locator("label", has_text="2").filter(has=page.locator("input[type=radio]")).first.click()
    preview.click(position={"x": 0.1 * size["width"], "y": 1})
    preview.click(position={"x": 0.4 * size["width"], "y": 0.5 * size["height"]})
    xmin = page.get_by_label("xmin 2", exact=True)
    page.wait_for_function("el => Math.abs(parseFloat(el.value) - 0.1) < 0.02", arg=xmin.element_handle())
    values = [float(page.get_by_label(f"{k} 2", exact=True).input_value()) for k in ("xmin", "ymin", "xmax", "ymax")]
    assert values == pytest.approx([0.1, 0.0, 0.4, 0.5], abs=0.02)


def test_the_demo_button_fills_the_shipped_concepts_within_seconds_then_generates(served, page):
    url, _ = served
    page.goto(url)
    page.locator("button", has_text="Make two demo LoRAs").first.click()
    # The shipped demo concepts are copied, not trained: both slots are filled within 10 s.
    start = time.perf_counter()
    page.get_by_label("sks_hexagon.safetensors").first.wait_for(timeout=10_000)  # the File's filename cell
    page.get_by_label("zwx_heart.safetensors").first.wait_for(timeout=10_000)
    assert time.perf_counter() - start < 10
    assert page.get_by_label("Name 1", exact=True).input_value() == "sks_hexagon"
    assert page.get_by_label("Regional prompt 2", exact=True).input_value() == "a sks hexagon and a zwx heart"
    assert page.get_by_label("Focus words 2", exact=True).input_value() == "zwx heart"
    page.get_by_text("Loaded the 2 shipped demo concept LoRAs.").first.wait_for()
    page.locator("button", has_text="Generate").first.click()
    image = page.locator("img[src*='composed-seed']").first
    image.wait_for(state="visible", timeout=GENERATION_MS)
    assert image.evaluate("img => img.complete && img.naturalWidth") == 64
    page.get_by_text("sks_hexagon@1").first.wait_for()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "composer-app-demo.png"), full_page=True)
