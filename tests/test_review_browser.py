"""The review page in a real Chromium (Debian's /usr/bin/chromium, headless, driven by Playwright)."""

from __future__ import annotations

import os

import pytest

import ollama_generate as og
from cli import run
from test_review import CAPTIONS, Review, make_dataset
from traced import make_images

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (.ci/run installs it)")]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


@pytest.fixture
def served(tmp_path):
    folder = make_dataset(tmp_path / "set")
    server = Review(folder)
    yield folder, server
    server.close()


def open_page(page, server):
    page.goto(server.server.url)
    page.wait_for_selector('body[data-ready="true"]')


def card(page, name):
    return page.locator(f'.card[data-image="{name}"]')


def test_filter_edit_save_and_reload(page, served):
    folder, server = served
    open_page(page, server)
    assert page.locator(".card").count() == 4
    assert page.locator("#count").inner_text() == "4 of 4 images"
    assert page.url.endswith("/") and "token" not in page.url
    page.fill('input[type="search"]', "black hair")
    assert page.locator("#count").inner_text() == "1 of 4 images"
    assert page.locator(".card").count() == 1
    page.fill('input[type="search"]', "")
    page.locator("#tags li", has_text="red hair").click()
    assert page.locator("#count").inner_text() == "3 of 4 images"
    page.locator("#tag-filter button").click()
    page.select_option("#flag", "__any")  # captions of a few tags are all out of the 20-40 range
    assert page.locator("#count").inner_text() == "4 of 4 images"
    page.select_option("#flag", "")
    page.select_option("#sort", "length")
    assert page.locator(".card").first.get_attribute("data-image") == "c.png"  # the longest caption

    card(page, "a.png").locator("textarea").fill("ohwx, 1girl, red hair, big smile")
    card(page, "a.png").locator("button.save").click()
    page.wait_for_selector('.card[data-image="a.png"] .status.ok')
    assert (folder / "a.txt").read_text() == "ohwx, 1girl, red hair, big smile\n"
    card(page, "b.png").locator("textarea").fill("ohwx, 1girl, frowning")
    card(page, "b.png").locator("textarea").press("Control+Enter")
    page.wait_for_selector('.card[data-image="b.png"] .status.ok')
    assert (folder / "b.txt").read_text() == "ohwx, 1girl, frowning\n"

    page.reload()
    page.wait_for_selector('body[data-ready="true"]')
    assert card(page, "a.png").locator("textarea").input_value() == "ohwx, 1girl, red hair, big smile"
    assert card(page, "b.png").locator("textarea").input_value() == "ohwx, 1girl, frowning"


def test_an_empty_caption_is_refused_on_the_page(page, served):
    folder, server = served
    open_page(page, server)
    card(page, "c.png").locator("textarea").fill("   ")
    card(page, "c.png").locator("button.save").click()
    status = page.wait_for_selector('.card[data-image="c.png"] .status.error')
    assert status.inner_text().startswith("an empty caption is not saved")
    assert (folder / "c.txt").read_text() == CAPTIONS["c.png"] + "\n"


def test_a_caption_changed_on_disk_is_not_overwritten_from_the_page(page, served):
    folder, server = served
    open_page(page, server)
    (folder / "a.txt").write_text("changed elsewhere\n")
    card(page, "a.png").locator("textarea").fill("mine")
    card(page, "a.png").locator("button.save").click()
    status = page.wait_for_selector('.card[data-image="a.png"] .status.error')
    assert "changed on disk" in status.inner_text() and "reload" in status.inner_text()
    assert (folder / "a.txt").read_text() == "changed elsewhere\n"


def test_bulk_rename_a_tag_and_undo_it(page, served):
    folder, server = served
    open_page(page, server)
    page.locator("#tags li", has_text="red hair").click()
    assert page.input_value("#tag-name") == "red hair"
    page.fill("#tag-to", "auburn hair")
    page.click("#rename-preview")
    page.wait_for_selector("#preview:not(.hidden)")
    assert page.locator("#preview-text").inner_text() == \
        "rename 'red hair' to 'auburn hair': 3 files change"
    assert page.locator("#preview-list li").count() == 3
    page.click("#apply")
    page.wait_for_selector("#message.ok")
    assert page.locator("#message").inner_text() == "Done: rename 'red hair' to 'auburn hair' in 3 files."
    assert (folder / "a.txt").read_text() == "ohwx, 1girl, auburn hair, smile\n"
    assert card(page, "sub/d.png").locator("textarea").input_value() == "ohwx, 1boy, auburn hair, hat"
    assert page.locator("#tags li", has_text="auburn hair").count() == 1
    page.click("#undo")
    page.wait_for_selector("#message.ok >> text=Undone")
    for name, caption in CAPTIONS.items():
        assert (folder / name).with_suffix(".txt").read_text() == caption + "\n"
    assert page.is_disabled("#undo")


def test_find_and_replace_in_the_shown_captions(page, served):
    folder, server = served
    open_page(page, server)
    page.fill('input[type="search"]', "1boy")
    page.check("#scope")
    page.fill("#find", "ohwx")
    page.fill("#replace", "sks")
    page.click("#replace-preview")
    page.wait_for_selector("#preview:not(.hidden)")
    assert page.locator("#preview-text").inner_text() == "replace 'ohwx' with 'sks': 2 files change"
    page.click("#apply")
    page.wait_for_selector("#message.ok")
    assert (folder / "c.txt").read_text() == "sks, 1boy, black hair, smile\n"
    assert (folder / "a.txt").read_text() == CAPTIONS["a.png"] + "\n"


def test_recaption_one_image_against_the_fake_server(page, ollama, capsys, tmp_path):
    folder = make_images(tmp_path / "set", ["a.png", "b.png"])
    assert run(capsys, "caption", folder, "--style", "tags")[0] == 0
    first = (folder / "a.txt").read_text().strip()
    (folder / "a.txt").write_text("a caption to redo\n")
    server = Review(folder, config=og.Config(hosts=(ollama.url,)))
    try:
        open_page(page, server)
        page.wait_for_selector("#server.on")
        assert card(page, "a.png").locator("textarea").input_value() == "a caption to redo"
        card(page, "a.png").locator("button.recaption").click()
        status = page.wait_for_selector('.card[data-image="a.png"] .status.ok')
        assert status.inner_text() == "Recaptioned (from the cached description)."
        assert card(page, "a.png").locator("textarea").input_value() == first
        assert (folder / "a.txt").read_text() == first + "\n"
    finally:
        server.close()


def test_the_page_says_when_no_server_is_reachable(page, tmp_path):
    folder = make_dataset(tmp_path / "set")
    server = Review(folder, config=og.Config(hosts=("http://127.0.0.1:9",)))
    try:
        open_page(page, server)
        box = page.wait_for_selector("#server.off")
        assert box.inner_text().startswith("Recaption is off: cannot connect to Ollama at http://127.0.0.1:9")
        assert card(page, "a.png").locator("button.recaption").is_disabled()
    finally:
        server.close()


def test_the_static_export_opens_read_only(page, capsys, tmp_path):
    folder = make_dataset(tmp_path / "set")
    html = tmp_path / "review.html"
    assert run(capsys, "review", folder, "-r", "--html", html)[0] == 0
    page.goto(html.as_uri())
    page.wait_for_selector('body[data-ready="true"]')
    assert page.locator(".card").count() == 4
    assert card(page, "a.png").locator("textarea").get_attribute("readonly") is not None
    assert card(page, "a.png").locator("button.save").count() == 0
    assert page.locator("#editing").is_hidden()
    natural = page.eval_on_selector('.card[data-image="sub/d.png"] img', "img => img.decode().then(() => img.naturalWidth)")
    assert natural == 2  # the image loaded by its relative path
