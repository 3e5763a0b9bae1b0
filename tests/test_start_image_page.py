"""The studio page starting from an image, in a real headless browser (Debian's chromium): a start
image upload, a mask upload and a strength slider that follows the default of what is chosen."""

import numpy as np
import pytest
from conftest import FIXTURES
from PIL import Image
from server_helpers import browser_tools, running_server

from hidream_mlx.images import read_metadata

CHROMIUM, sync_api = browser_tools()
SIZE = (320, 256)  # a free O1 size: the source's own size renders without a Size field


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    out = tmp_path_factory.mktemp("page")
    with running_server(FIXTURES, out) as (url, _):
        yield url, out


@pytest.fixture()
def page(served):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(served[0] + "/")
        yield page
        browser.close()
    assert not errors, errors


@pytest.fixture()
def pictures(tmp_path):
    w, h = SIZE
    source = np.random.default_rng(1).integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    mask[:, w // 2:] = 255
    Image.fromarray(source).save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "photo.png", tmp_path / "mask.png"


def fill_form(page, seed):
    page.fill("#prompt", "a boat on a lake")
    page.fill("#seed", str(seed))
    page.select_option("#preset", "")
    page.check("#no-snap")
    page.fill("#steps", "10")


def render(page, served, count):
    page.click("#go")
    page.wait_for_function(f"document.querySelectorAll('#gallery .card').length === {count}", timeout=120_000)
    page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
    assert page.text_content("#error") == ""
    seed = page.locator("#gallery .card").first.get_attribute("data-seed")
    [saved] = [p for p in served[1].glob(f"*-seed{seed}.png")]
    return page.text_content("#gallery .card pre"), read_metadata(saved)


def test_the_page_starts_from_an_uploaded_image_at_the_slider_s_strength(page, served, pictures):
    fill_form(page, 21)
    assert page.input_value("#strength") == "0.8" and page.text_content("#strength-value") == "0.80"
    page.set_input_files("#init-image", str(pictures[0]))
    page.fill("#strength", "0.3")
    assert page.text_content("#strength-value") == "0.30"
    text, meta = render(page, served, 1)
    assert "3 of 10 steps (strength 0.3)" in text and f"{SIZE[0]}x{SIZE[1]}" in text
    assert meta["strength"] == 0.3 and meta["steps_run"] == 3 and "mask" not in meta


def test_choosing_a_mask_moves_an_untouched_slider_to_1_and_inpaints(page, served, pictures):
    fill_form(page, 22)
    page.set_input_files("#init-image", str(pictures[0]))
    page.set_input_files("#mask", str(pictures[1]))
    assert page.input_value("#strength") == "1" and page.text_content("#strength-value") == "1.00"
    text, meta = render(page, served, 1)
    assert "10 of 10 steps (strength 1)" in text
    assert meta["mask"]["name"].startswith("mask-") and meta["strength"] == 1.0
