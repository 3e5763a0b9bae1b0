"""The studio page at ``/`` in a real headless browser (Debian's chromium driven by Playwright)."""

import pytest
from conftest import FIXTURES
from server_helpers import browser_tools, running_server

from hidream_mlx.images import read_metadata

CHROMIUM, sync_api = browser_tools()

TOKEN = "page-token"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    out = tmp_path_factory.mktemp("page")
    with running_server(FIXTURES, out, token=TOKEN) as (url, studio):
        yield url, out


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, served):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(served[0] + "/")
    yield page
    page.close()
    assert not errors, errors


def test_the_page_renders_an_image_with_progress_and_re_renders_it_at_high(page, served):
    out = served[1]
    page.fill("#token", TOKEN)
    page.dispatch_event("#token", "change")
    page.fill("#prompt", "a lighthouse at dusk")
    page.fill("#seed", "11")
    page.select_option("#preset", "quick")
    page.fill("#size", "256x256")
    page.check("#no-snap")
    page.fill("#steps", "8")
    # Every status line the page shows, however briefly.
    page.evaluate("""window.statuses = [];
        new MutationObserver(() => statuses.push(document.getElementById('status').textContent))
            .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true});""")
    page.click("#go")

    page.wait_for_selector("#gallery .card img", timeout=120_000)
    page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
    progress = [s for s in page.evaluate("statuses") if s.startswith("step ")]
    assert progress[0].startswith("step 1/8") and progress[-1].startswith("step 8/8")
    assert all("s/step" in s and "ETA" in s for s in progress)
    assert page.get_attribute("#preview", "src").startswith("data:image/jpeg;base64,")
    first = page.text_content("#gallery .card pre")
    assert "256x256" in first and "seed 11" in first and "8 steps" in first
    width = page.evaluate("document.querySelector('#gallery .card img').naturalWidth")
    assert width == 256

    page.click("#gallery .card .rerender")
    page.wait_for_function("document.querySelectorAll('#gallery .card').length === 2", timeout=180_000)
    newest = page.locator("#gallery .card").first
    assert newest.get_attribute("data-seed") == "11"
    assert int(newest.get_attribute("data-steps")) > 8  # the high preset's effort
    assert "preset high" in newest.locator("pre").text_content()

    saved = sorted(out.glob("*.png"))
    assert len(saved) == 2
    metas = [read_metadata(p) for p in saved]
    assert {m["prompt"] for m in metas} == {"a lighthouse at dusk"} and {m["seed"] for m in metas} == {11}


def test_new_seed_draws_another_seed(page):
    before = page.input_value("#seed")
    page.click("#new-seed")
    after = page.input_value("#seed")
    assert after != before and 0 <= int(after) <= 4294967295


def test_an_o1_page_offers_references_and_no_i1_note(page):
    assert page.is_visible("#refs") and not page.is_visible("#family-note")
