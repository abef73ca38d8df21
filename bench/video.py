#!/usr/bin/env python3
"""What a clip costs outside the model: probe, frame extraction and encoding, per clip.

    python3 bench/video.py [--clips 10] [--seconds 10] [--size 1280x720] [--frames 8] [--max-side 1536]

Makes a temporary folder of clips with ffmpeg (testsrc, H.264, 30 fps), then for each clip times
what the vision stage does before its request: ollama_generate.probe_clip() (ffprobe) and
extract_frames() (one ffmpeg seek, decode, scale and JPEG encode per frame), plus the base64
encoding, with time.perf_counter() around the production functions. Reports the median time per
clip, frames extracted per second, and the bytes a request carries. Needs ffmpeg and ffprobe on
PATH; exits 1 when a clip takes more than 30 s outside the model (a vision call on 8 frames takes
tens of seconds; this catches a runaway decode) or gives the wrong number of frames.
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

import ollama_generate as og  # noqa: E402

TARGET_SECONDS = 30.0  # a vision call on 8 frames takes tens of seconds; this catches a runaway decode


def make_clips(folder: Path, count: int, seconds: int, size: str) -> list[Path]:
    clips = []
    for index in range(count):
        path = folder / f"clip{index:02d}.mp4"
        # A different start per clip (testsrc's counter), so no two files are alike.
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc=duration={seconds}:size={size}:rate=30:decimals=2",
                        "-vf", f"setpts=PTS+{index}/TB",
                        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", str(path)],
                       check=True, stdin=subprocess.DEVNULL)
        clips.append(path)
    return clips


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=10)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--size", default="1280x720")
    parser.add_argument("--frames", type=int, default=og.DEFAULT_FRAMES)
    parser.add_argument("--max-side", type=int, default=og.DEFAULT_MAX_SIDE)
    args = parser.parse_args()
    if not (shutil.which("ffmpeg") and shutil.which("ffprobe")):
        print("bench/video.py needs ffmpeg and ffprobe on PATH (apt install ffmpeg, brew install ffmpeg)",
              file=sys.stderr)
        return 1
    print(f"command: python3 bench/video.py --clips {args.clips} --seconds {args.seconds} --size {args.size} "
          f"--frames {args.frames} --max-side {args.max_side}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as temp:
        clips = make_clips(Path(temp), args.clips, args.seconds, args.size)
        probe, extract, encode, sent = [], [], [], []
        ok = True
        for clip in clips:
            started = time.perf_counter()
            info, times, size = og.clip_plan(str(clip), args.frames, args.max_side)
            probed = time.perf_counter()
            frames = og.extract_frames(str(clip), times, size)
            extracted = time.perf_counter()
            encoded = [base64.b64encode(frame).decode("ascii") for frame in frames]
            done = time.perf_counter()
            probe.append(probed - started)
            extract.append(extracted - probed)
            encode.append(done - extracted)
            sent.append(sum(len(text) for text in encoded))
            ok = ok and len(frames) == args.frames
        total = [a + b + c for a, b, c in zip(probe, extract, encode)]
        per_clip = statistics.median(total)
        frames_per_second = args.frames * len(clips) / sum(extract)
        print(f"clips: {len(clips)} of {args.seconds} s at {args.size}, "
              f"{clips[0].stat().st_size / 1e6:.1f} MB each; "
              f"{args.frames} frames each at {size[0]}x{size[1]}")
        print(f"probe (ffprobe):           median {statistics.median(probe) * 1000:.0f} ms per clip")
        print(f"extract (ffmpeg per frame): median {statistics.median(extract) * 1000:.0f} ms per clip, "
              f"{frames_per_second:.1f} frames/s")
        print(f"base64:                    median {statistics.median(encode) * 1000:.1f} ms per clip")
        print(f"outside the model:         median {per_clip * 1000:.0f} ms per clip, "
              f"max {max(total) * 1000:.0f} ms")
        print(f"request carries:           median {statistics.median(sent) / 1e6:.2f} MB of base64 frames")
    if not ok:
        print("FAIL: a clip gave the wrong number of frames", file=sys.stderr)
        return 1
    if per_clip > TARGET_SECONDS:
        print(f"FAIL: over {TARGET_SECONDS:.0f} s per clip outside the model", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
