#!/usr/bin/env python3
"""What --max-side saves: bytes sent, image tokens, and the time preparing costs per image.

    python3 bench/images.py [--images 6] [--runs 3] [--width 6000] [--height 4000] [--max-side 1536]
                            [--family qwen25vl] [--seed 1]

Makes a temporary folder of 24-megapixel JPEGs with Pillow (gradients, shapes and Gaussian
sensor-like noise, saved at quality 92, so they compress like camera photos: several MB each),
then for each image reports:

- the bytes the vision request carries: the original file and its base64 text (what
  `--max-side 0` sends, and what is sent without Pillow) vs the file `--max-side` prepares;
- the server-side image-token estimate for a Qwen-VL-family model (ollama_generate's table:
  28-pixel patches, 1,024 to 4,096 tokens) for the size sent each way, and the num_ctx a run of
  such images gets;
- the time prepare_image() takes (read the header, decode at reduced scale, turn upright,
  resample, encode JPEG quality 90): the median over --runs runs of each image, and the median
  over all images, next to a typical vision call of 1-6 s.

The timing is ollama_generate.prepare_image() itself, the function the vision stage calls, with
time.perf_counter() around it. Needs Pillow (`pip install 'ollama-generate[images]'`); exits 1
when the prepared image is not smaller than the original or preparing takes more than a second.
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import ollama_generate as og

PREPARE_TARGET_SECONDS = 1.0


def photo(path: Path, width: int, height: int, seed: int) -> None:
    """A camera-like JPEG: smooth colour gradients, some shapes, and per-channel Gaussian noise."""
    from PIL import Image, ImageDraw, ImageFilter

    rng = random.Random(seed)
    small = (width // 8, height // 8)
    channels = [Image.linear_gradient("L").rotate(rng.randrange(360)).resize(small) for _ in range(3)]
    base = Image.merge("RGB", channels)
    draw = ImageDraw.Draw(base)
    for _ in range(40):
        x, y = rng.randrange(small[0]), rng.randrange(small[1])
        r = rng.randrange(10, small[1] // 3)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(256) for _ in range(3)))
    base = base.filter(ImageFilter.GaussianBlur(4)).resize((width, height), Image.Resampling.BICUBIC)
    noise = Image.merge("RGB", [Image.effect_noise((width, height), 24) for _ in range(3)])
    Image.blend(base, noise, 0.3).save(path, "JPEG", quality=92)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--width", type=int, default=6000)
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--max-side", type=int, default=og.DEFAULT_MAX_SIDE)
    parser.add_argument("--family", default="qwen25vl")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    if not og.pillow_installed():
        print("bench/images.py needs Pillow: pip install 'ollama-generate[images]'", file=sys.stderr)
        return 1
    import PIL

    print(f"$ python3 bench/images.py --images {args.images} --runs {args.runs} --width {args.width} "
          f"--height {args.height} --max-side {args.max_side} --family {args.family} --seed {args.seed}")
    print(f"Python {platform.python_version()}, Pillow {PIL.__version__}, {os.cpu_count()} CPUs, "
          f"{platform.machine()}")
    rows, medians = [], []
    prompt = og.prompt_tokens("".join(og.vision_prompt(og.Config())))
    with tempfile.TemporaryDirectory(prefix="bench-images-") as folder:
        for n in range(args.images):
            path = Path(folder) / f"photo{n:02d}.jpg"
            photo(path, args.width, args.height, args.seed + n)
            data = og.read_image(str(path))
            size = og.image_size_of(data)
            times = []
            for _ in range(args.runs):
                started = time.perf_counter()
                prepared = og.prepare_image(og.read_image(str(path)), args.max_side)
                times.append(time.perf_counter() - started)
            sent = og.image_size_of(prepared)
            rows.append((path.name, len(data), len(base64.b64encode(data)), len(prepared),
                         len(base64.b64encode(prepared)),
                         og.image_tokens(args.family, *size.upright),
                         og.image_tokens(args.family, sent.width, sent.height),
                         f"{sent.width}x{sent.height}", statistics.median(times)))
            medians.append(statistics.median(times))
            del data, prepared
    print(f"\n{args.width}x{args.height} JPEGs; tokens estimated for the {args.family} family; "
          f"prepare = median of {args.runs} runs\n")
    header = ("image", "original MB", "as base64", "sent size", f"--max-side {args.max_side} MB",
              "as base64", "tokens original", "tokens sent", "prepare s")
    print(" | ".join(header))
    for name, original, original64, prepared, prepared64, tokens_original, tokens_sent, sent, seconds in rows:
        print(f"{name} | {original / 1e6:.2f} | {original64 / 1e6:.2f} | {sent} | {prepared / 1e6:.3f} | "
              f"{prepared64 / 1e6:.3f} | {tokens_original} | {tokens_sent} | {seconds:.3f}")
    original = statistics.median(row[1] for row in rows)
    prepared = statistics.median(row[3] for row in rows)
    median = statistics.median(medians)
    print(f"\nmedian bytes sent: {original / 1e6:.2f} MB original vs {prepared / 1e6:.3f} MB prepared "
          f"({original / prepared:.0f}x smaller; base64 adds a third to both)")
    print(f"image tokens ({args.family}): {rows[0][5]} original vs {rows[0][6]} prepared; vision num_ctx "
          f"{og.vision_context(rows[0][5], prompt)} vs {og.vision_context(rows[0][6], prompt)}")
    print(f"prepare: median {median:.3f} s per image (min {min(medians):.3f}, max {max(medians):.3f}); "
          f"a typical vision call takes 1-6 s, so {median / 6:.0%}-{median / 1:.0%} of one")
    missed = prepared >= original or median > PREPARE_TARGET_SECONDS
    if missed:
        print(f"TARGET MISSED: prepared must be smaller and prepare under {PREPARE_TARGET_SECONDS} s")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
