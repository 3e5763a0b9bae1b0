"""The studio page served for a HiDream-I1 pipeline, in a real headless browser (Debian's chromium):
no references input (I1 is text to image), a note on its sizes, and an image made from the form."""

from server_helpers import browser_tools, running_server

from hidream_mlx.images import read_metadata
from i1_support import FIXTURES

CHROMIUM, sync_api = browser_tools()


def test_the_i1_page_hides_references_and_renders_an_image(tmp_path):
    with running_server(FIXTURES, tmp_path) as (url, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        assert not page.is_visible("#refs") and page.is_visible("#family-note")
        page.fill("#prompt", "a red fox")
        page.fill("#seed", "7")
        page.select_option("#preset", "")
        page.fill("#size", "128x128")
        page.check("#no-snap")
        page.fill("#steps", "2")
        page.click("#go")
        page.wait_for_selector("#gallery .card img", timeout=120_000)
        page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
        assert page.text_content("#error") == ""
        browser.close()
    assert not errors, errors
    [saved] = sorted(tmp_path.glob("*.png"))
    meta = read_metadata(saved)
    assert meta["family"] == "i1" and meta["seed"] == 7 and meta["steps"] == 2 and meta["width"] == 128
