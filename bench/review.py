#!/usr/bin/env python3
"""Opening `ollama-generate review` on a large dataset in Chromium: time to first paint and to interactive.

    python3 bench/review.py [--images 5000] [--runs 3] [--chromium /usr/bin/chromium] [--screenshot PATH]

Builds a temporary dataset of --images small distinct PNGs with tag captions (a few flagged:
missing, empty, duplicate), starts `python3 ollama_generate.py review DATASET --no-browser` as a
child process, and opens the printed address in a fresh headless Chromium page (Playwright) --runs
times. For each run it reports, from the page's own clock (performance.now(), 0 = navigation start):
first contentful paint, and *interactive*: the page has parsed its data, drawn its summary, tag
panel and first cards, and wired its controls (it sets body[data-ready-ms]). Then it types a search
and times until the card count shows the filtered result (one filter over every image). Target:
first paint and interactive under 2000 ms on every run. Exits 1 when a target is missed.

--screenshot PATH instead writes a screenshot of the page on a small demo dataset (used in README.md).
Needs Playwright (pip install playwright; the test extra has it) and Debian's chromium.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TARGET_MS = 2000
TAGS = ("1girl, 1boy, solo, smile, red hair, black hair, blonde hair, long hair, short hair, blue eyes, "
        "green eyes, outdoors, indoors, night, day, city, forest, beach, snow, rain, red coat, school uniform, "
        "hat, glasses, looking at viewer, upper body, full body, sitting, standing, holding cup").split(", ")


def png(width: int, height: int, pixel) -> bytes:
    """An 8-bit RGB PNG whose pixel(x, y) gives (r, g, b)."""
    rows = bytearray()
    for y in range(height):
        rows.append(0)
        for x in range(width):
            rows += bytes(pixel(x, y))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(rows))) + chunk(b"IEND", b""))


def caption(number: int) -> str:
    picked = [TAGS[(number * 7 + k * 13) % len(TAGS)] for k in range(8 + number % 12)]
    return ", ".join(["ohwx", *dict.fromkeys(picked)])


def make_dataset(folder: str, count: int) -> None:
    """count images (4x4 PNGs, distinct), each with a tag caption; a few missing, empty or duplicated."""
    os.makedirs(folder, exist_ok=True)
    for number in range(count):
        name = os.path.join(folder, f"img_{number:05d}")
        with open(name + ".png", "wb") as handle:
            handle.write(png(4, 4, lambda x, y, n=number: ((n * 37 + x * 40) % 256, (n * 11 + y * 50) % 256, n % 256)))
        if number % 97 == 5:
            continue  # no caption
        with open(name + ".txt", "w", encoding="utf-8") as handle:
            handle.write("" if number % 89 == 3 else caption(number - number % 2 if number % 50 == 1 else number) + "\n")


def make_demo(folder: str) -> None:
    """A dozen colourful images with captions; one flagged by the last run's report."""
    os.makedirs(os.path.join(folder, ".ollama-generate"), exist_ok=True)
    palettes = [((250, 120, 90), (60, 40, 120)), ((40, 160, 200), (250, 230, 150)), ((30, 90, 60), (200, 220, 120)),
                ((240, 200, 210), (90, 60, 140)), ((20, 30, 60), (230, 120, 40)), ((200, 60, 60), (250, 240, 220))]
    captions = [
        "ohwx, 1girl, solo, red hair, long hair, green eyes, red coat, snow, outdoors, smile",
        "ohwx, 1girl, solo, red hair, short hair, school uniform, classroom, indoors, sitting",
        "ohwx, 1girl, red hair, long hair, beach, sunset, looking at viewer, upper body",
        "ohwx, 1girl, red hair, glasses, cafe, holding cup, indoors, smile",
        "ohwx, 1girl, red hair, long hair, city, night, rain, umbrella, full body",
        "1girl, red hair, forest, standing, green eyes",
        "ohwx, 1girl, red hair, long hair, green eyes, red coat, snow, outdoors, smile",
        "ohwx, 1girl, solo, red hair, hat, flower field, day, smile",
        None,
        "ohwx, 1girl, red hair, long hair, library, reading, sitting, indoors",
        "ohwx, 1girl, red hair, ponytail, running, park, day, motion blur",
        "ohwx, 1girl, solo, red hair, long hair, green eyes, red coat, snow, outdoors, smile",
    ]
    for number, text in enumerate(captions):
        (r1, g1, b1), (r2, g2, b2) = palettes[number % len(palettes)]
        size = 96

        def pixel(x, y, n=number):
            t = (x + y) / (2 * size)
            ring = ((x - size * 0.6) ** 2 + (y - size * 0.4) ** 2) < (size * (0.15 + 0.02 * (n % 4))) ** 2
            if ring:
                return 250, 250, 240
            return int(r1 + (r2 - r1) * t), int(g1 + (g2 - g1) * t), int(b1 + (b2 - b1) * t)

        name = os.path.join(folder, f"photo_{number + 1:02d}")
        with open(name + ".png", "wb") as handle:
            handle.write(png(size, size, pixel))
        if text is not None:
            with open(name + ".txt", "w", encoding="utf-8") as handle:
                handle.write(text + "\n")
    with open(os.path.join(folder, ".ollama-generate", "descriptions.jsonl"), "w", encoding="utf-8") as handle:
        handle.write(json.dumps({"key": "demo", "image": "photo_04.png", "description":
                                 "A young woman with red hair and round glasses sits in a cafe, holding a white "
                                 "cup in both hands and smiling."}) + "\n")
    with open(os.path.join(folder, ".ollama-generate", "last-report.json"), "w", encoding="utf-8") as handle:
        json.dump({"needs_review": [{"image": "photo_04.png", "reason": "meta talk", "rules": ["meta-talk"]}],
                   "captions": [{"image": "photo_04.png", "rules": ["meta-talk"],
                                 "raw": "Here are the tags: ohwx, 1girl, red hair, glasses, cafe, holding cup",
                                 "spans": [{"rule": "meta-talk", "action": "strip", "text": "Here are the tags: "}]}]},
                  handle)


def start_review(folder: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "ollama_generate.py"), "review", folder,
                                "--no-browser"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               env={k: v for k, v in os.environ.items() if not k.startswith("OLLAMA_")}
                               | {"OLLAMA_HOST": "http://127.0.0.1:9"})
    return process, process.stdout.readline().strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--screenshot", metavar="PATH")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as temp, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
        folder = os.path.join(temp, "dataset")
        if args.screenshot:
            make_demo(folder)
            process, url = start_review(folder)
            try:
                page = browser.new_page(viewport={"width": 1360, "height": 1020})
                page.goto(url)
                page.wait_for_selector('body[data-ready="true"]')
                page.wait_for_selector("#server.off")
                page.locator('.card[data-image="photo_04.png"] details').evaluate("node => node.open = true")
                page.locator('.card[data-image="photo_06.png"] textarea').evaluate(
                    "area => { area.value = 'ohwx, 1girl, red hair, forest, standing, green eyes';"
                    " area.dispatchEvent(new Event('input')); }")
                page.evaluate("Promise.all([...document.images].map(img => img.decode().catch(() => null)))")
                page.evaluate("scrollTo(0, 0)")
                page.screenshot(path=args.screenshot)
            finally:
                process.terminate()
                process.wait()
            print(f"wrote {args.screenshot}")
            return 0
        started = time.perf_counter()
        make_dataset(folder, args.images)
        print(f"python3 bench/review.py --images {args.images} --runs {args.runs} --chromium {args.chromium}")
        print(f"dataset: {args.images} images (4x4 PNG) with tag captions, built in "
              f"{time.perf_counter() - started:.1f} s")
        process, url = start_review(folder)
        missed = False
        try:
            print(f"{'run':>3}  {'first paint ms':>14}  {'interactive ms':>14}  {'search ms':>9}  cards drawn")
            for run in range(1, args.runs + 1):
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(url)
                page.wait_for_selector('body[data-ready="true"]', timeout=60000)
                paint = page.evaluate("(performance.getEntriesByName('first-contentful-paint')[0] || {}).startTime")
                ready = float(page.get_attribute("body", "data-ready-ms"))
                cards = page.locator(".card").count()
                search = page.evaluate("""() => new Promise(done => {
                    const box = document.querySelector('input[type=search]');
                    const start = performance.now();
                    box.value = 'img_00421';
                    box.dispatchEvent(new Event('input'));
                    requestAnimationFrame(() => done(performance.now() - start));
                })""")
                assert page.inner_text("#count").startswith("1 of "), page.inner_text("#count")
                print(f"{run:>3}  {paint:>14.0f}  {ready:>14.0f}  {search:>9.0f}  {cards}")
                missed |= not (paint < TARGET_MS and ready < TARGET_MS)
                page.close()
        finally:
            process.terminate()
            process.wait()
            browser.close()
    print(f"target: first paint and interactive under {TARGET_MS} ms: {'MISSED' if missed else 'met'}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
