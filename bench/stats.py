#!/usr/bin/env python3
"""Time `ollama-generate stats` on a dataset of 10,000 images and captions.

    python3 bench/stats.py [--images 10000] [--style tags|prose] [--runs 3]

Builds the dataset in a temporary folder: tiny distinct PNGs (tests/images.py) and one caption
each, drawn with a fixed seed from a vocabulary whose frequencies fall off as real datasets' do
(a few tags in most captions, a long tail of rare ones), with a trigger first, some captions
missing, empty, duplicated or nearly duplicated. Then it runs `python3 ollama_generate.py stats
DATASET --json` as a child process --runs times and prints the wall time of each (process start
to exit, so Python's start-up is included), its CPU time, and the best. Exits 1 when the best
CPU time is over --target seconds. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "ollama_generate.py"
sys.path[:0] = [str(ROOT / "tests")]

from images import png_bytes

TRAITS = ["black hair", "long hair", "blue eyes", "red coat"]
SUBJECTS = ["1girl", "solo", "looking at viewer", "smile", "standing", "sitting", "outdoors", "indoors"]
WORDS = ("woman girl park street bench cup coffee tree lamp snow rain night dusk "
         "dawn city window room table chair book flower river bridge mountain sky cloud sun moon "
         "light shadow wall door stairs train station car road field grass sea beach boat").split()


def tag_vocabulary(size: int) -> list[str]:
    """size made-up two-word tags."""
    rng = random.Random(1)
    return [f"{rng.choice(WORDS)} {rng.choice(WORDS)}-{index}" for index in range(size)]


def caption(rng: random.Random, vocabulary: list[str], style: str) -> str:
    """One caption: the trigger, traits in most, then tags (or sentences) drawn Zipf-like."""
    chosen = [trait for trait in TRAITS if rng.random() < 0.8]
    chosen += [tag for tag in SUBJECTS if rng.random() < 0.5]
    size = rng.randint(20, 40)
    while len(chosen) < size:
        tag = vocabulary[min(len(vocabulary) - 1, int(rng.paretovariate(0.7)) - 1)]
        if tag not in chosen:
            chosen.append(tag)
    if style == "tags":
        return "ohwx, " + ", ".join(chosen)
    sentences = [f"A woman with {chosen[0]} stands near the {chosen[4]} and the {chosen[5]}.",
                 f"She holds a {chosen[6]} while {chosen[7]} and {chosen[8]} fill the scene.",
                 f"Behind her are {', '.join(chosen[9:16])}, in soft light."]
    return "ohwx, " + " ".join(sentences)


def build(folder: Path, images: int, style: str) -> None:
    """The dataset: images, and captions of which some are missing, empty or copied."""
    rng = random.Random(10)
    vocabulary = tag_vocabulary(3000)
    previous = ""
    for index in range(images):
        stem = folder / f"img_{index:05d}"
        stem.with_suffix(".png").write_bytes(png_bytes(seed=index))
        roll = rng.random()
        if roll < 0.01:
            continue  # missing
        if roll < 0.02:
            text = ""
        elif roll < 0.03 and previous:
            text = previous  # a duplicate
        elif roll < 0.04 and previous:
            text = previous + ", extra tag"  # a near duplicate
        else:
            text = caption(rng, vocabulary, style)
        stem.with_suffix(".txt").write_text(text + "\n", encoding="utf-8")
        previous = text or previous


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--style", choices=("tags", "prose"), default="tags")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--target", type=float, default=15.0,
                        help="CPU seconds the best run must beat (CPU time, unlike wall time, does not "
                             "grow on a busy machine)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="stats-bench-") as temp:
        folder = Path(temp) / "dataset"
        folder.mkdir()
        started = time.perf_counter()
        build(folder, args.images, args.style)
        print(f"built {args.images} images and captions ({args.style}) in "
              f"{time.perf_counter() - started:.1f} s")
        command = [sys.executable, str(CLI), "stats", str(folder), "--json"]
        print(f"$ {shlex.join(command)}")
        print(f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.platform()}")
        times, cpu = [], []
        for _ in range(args.runs):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            times.append(time.perf_counter() - started)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                return 1
        data = json.loads(done.stdout)
        print(f"images {data['images']}, captioned {data['captioned']}, missing {data['missing']}, "
              f"empty {data['empty']}, tags {len(data['tags'])}, duplicate groups "
              f"{len(data['duplicates'])}, near duplicate groups {len(data['near_duplicates'])}, "
              f"identity {[entry['phrase'] for entry in data['identity']]}")
        print("runs (wall): " + ", ".join(f"{seconds:.2f} s" for seconds in times))
        print("runs (CPU, user + system): " + ", ".join(f"{seconds:.2f} s" for seconds in cpu))
        print(f"load average before: {os.getloadavg()[0]:.2f} (a busy machine stretches the wall time)")
        best = min(times)
        print(f"best: {best:.2f} s wall, {min(cpu):.2f} s CPU for {args.images} images "
              f"({args.images / best:,.0f} images per second), target {args.target:g} s CPU")
        return 0 if min(cpu) <= args.target else 1


if __name__ == "__main__":
    sys.exit(main())
