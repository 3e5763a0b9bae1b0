"""The studio page served for a HiDream-E1 model, in a real headless browser (Debian's chromium): a
source upload and the edit's own guidance fields instead of references, presets, Exact and the start
image; a note on what E1.1 and E1-Full expect; an edit made from the form records its source."""

import numpy as np
from PIL import Image
from server_helpers import browser_tools, running_server

from e1_support import e1_1_budget, user_layout
from hidream_mlx.images import read_metadata

CHROMIUM, sync_api = browser_tools()


def test_the_e1_page_uploads_a_source_and_edits_it(tmp_path):
    layout = user_layout(tmp_path / "models")
    wide = tmp_path / "wide.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (90, 200, 3), dtype=np.uint8)).save(wide)
    out = tmp_path / "out"
    with running_server(layout["e1_1"], out, base=layout["base"]) as (url, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(url + "/")
        for hidden in ("#refs", "#preset", "#no-snap", "#init-image", "#mask", "#strength", "#family-note"):
            assert not page.is_visible(hidden), hidden
        for shown in ("#source", "#image-guidance", "#refine-strength", "#e1-note"):
            assert page.is_visible(shown), shown
        assert "Target Image Description" in " ".join(page.text_content("#e1-note").split())
        page.fill("#prompt", "Make it blue.")
        page.fill("#seed", "7")
        page.fill("#size", "{}x{}".format(*e1_1_budget()))
        page.fill("#steps", "2")
        page.fill("#image-guidance", "2")
        page.fill("#refine-strength", "0")
        page.set_input_files("#source", str(wide))
        page.click("#go")
        page.wait_for_selector("#gallery .card img", timeout=120_000)
        page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=60_000)
        assert page.text_content("#error") == ""
        card = page.text_content("#gallery .card pre")
        browser.close()
    assert not errors, errors
    [saved] = sorted(out.glob("*.png"))
    meta = read_metadata(saved)
    assert meta["family"] == "e1" and meta["seed"] == 7 and meta["steps"] == 2
    assert meta["image_guidance"] == 2 and meta["refine_strength"] == 0 and meta["source_size"] == [200, 90]
    assert "{}x{}".format(*meta["edited_size"]) in card
