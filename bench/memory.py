#!/usr/bin/env python3
"""Peak memory of a large folder run of ollama_generate.py against the tests' fake Ollama server.

    python3 bench/memory.py [--images 10000] [--compare 1000] [--limit-mb 100]

Makes --compare and then --images small distinct PNGs in temporary folders, serves them with a
zero-latency fake server on 127.0.0.1, captions each folder with
`python3 ollama_generate.py caption FOLDER --quiet --no-cache` as a child process, and reports the
child's peak resident set size (ru_maxrss) and wall time. The smaller run shows whether peak memory
grows with the size of the dataset; the large one must stay under --limit-mb. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "ollama_generate.py"
sys.path[:0] = [str(ROOT / "tests")]

from fake_ollama import FakeOllama, Recorded
from images import png_bytes

# ru_maxrss is in kilobytes on Linux and in bytes on macOS.
RSS_UNIT = 1 if sys.platform == "darwin" else 1024

# Answers as long as real ones (a vision description is often 150-250 words, a training caption
# 50-150 words), so text the engine kept per image would show up in the peak; the fake's default
# "A fake answer." would hide it.
DESCRIPTION = ("A young woman in a red wool coat walks along a snowy path in a city park at dusk, "
               "street lamps glowing amber behind bare trees. ") * 8
CAPTION = ("a young woman in a red wool coat walking along a snowy park path at dusk, warm street "
           "lamps, bare trees, soft blue evening light, ") * 4


class QuietFake(FakeOllama):
    """The fake, minus its record of every request: 20,000 requests with their image payloads
    would only inflate this (unmeasured) parent process. It counts them instead."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.request_count = 0

    def _record(self, rec: Recorded) -> None:
        with self._lock:
            self.request_count += 1


@dataclass
class Measure:
    images: int
    wall: float
    peak_mb: float
    report: dict


def answer(rec: Recorded) -> str:
    """A description for the vision request (it carries the image), a caption for the text one."""
    return DESCRIPTION if b'"images"' in rec.raw else CAPTION


def make_dataset(folder: Path, count: int) -> None:
    folder.mkdir()
    for i in range(count):
        (folder / f"img_{i:06d}.png").write_bytes(png_bytes(8, 8, seed=i))


def child_env() -> dict[str, str]:
    """No OLLAMA_* settings and no proxies in the child: it must talk to the fake directly."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("OLLAMA_") and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}


def run_child(argv: list[str], log: Path) -> tuple[int, float, float]:
    """Run argv; return (exit code, wall seconds, peak RSS in MB) of that one child.

    os.wait4 gives the same ru_maxrss as resource.getrusage(RUSAGE_CHILDREN), but for this child
    alone; RUSAGE_CHILDREN is the maximum over every child waited for so far, so a second run
    could not be told apart from the first.
    """
    with log.open("wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(argv, env=child_env(), stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return proc.returncode, wall, usage.ru_maxrss * RSS_UNIT / 2**20


def measure(count: int, work: Path) -> Measure:
    """Caption a fresh folder of `count` images; exit if the run fails or misses an image."""
    folder = work / f"dataset-{count}"
    t0 = time.monotonic()
    make_dataset(folder, count)
    print(f"  {count} images generated in {time.monotonic() - t0:.1f} s; captioning...", flush=True)
    report_file = work / f"report-{count}.json"
    log = work / f"log-{count}.txt"
    fake = QuietFake().start()  # zero latency: request_time 0, no load cost, no parallel limit
    fake.default_text = answer
    try:
        argv = [sys.executable, str(CLI), "caption", str(folder), "--quiet", "--no-cache",
                "--host", fake.url, "--report", str(report_file)]
        code, wall, peak = run_child(argv, log)
    finally:
        fake.stop()
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    if code or report.get("written") != count or fake.errors:
        sys.exit(f"the {count}-image run exited {code} and wrote {report.get('written')} captions\n"
                 f"{shlex.join(argv)}\n{log.read_text(errors='replace')}\n" + "\n".join(fake.errors))
    if fake.request_count < 2 * count:
        sys.exit(f"the server saw {fake.request_count} requests for {count} images")
    return Measure(count, wall, peak, report)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="images of the large run (default 10000)")
    parser.add_argument("--compare", type=int, default=1_000,
                        help="images of the smaller run, to see growth; 0 skips it (default 1000)")
    parser.add_argument("--limit-mb", type=float, default=100.0,
                        help="peak RSS the large run must stay under (default 100)")
    args = parser.parse_args()
    if args.images < 1 or args.compare < 0:
        parser.error("--images must be >= 1 and --compare >= 0")

    print("command:    " + shlex.join([Path(sys.executable).name, *sys.argv]))
    print(f"parameters: --images {args.images} --compare {args.compare} --limit-mb {args.limit_mb:g}")
    print(f"machine:    Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.system()}")
    print(f"each run:   {Path(sys.executable).name} ollama_generate.py caption DATASET --quiet --no-cache "
          "--host URL --report FILE")
    print(f"            against a zero-latency FakeOllama on 127.0.0.1; answers of {len(DESCRIPTION)} "
          f"(description) and {len(CAPTION)} (caption) characters")
    print(flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        # The interpreter and the module alone: the floor under every run's peak.
        code, _, floor = run_child([sys.executable, str(CLI), "--version"], work / "log-version.txt")
        if code:
            sys.exit("ollama_generate.py --version failed")
        results = [measure(n, work) for n in sorted({args.compare, args.images} - {0})]
    print()

    rows = [["run", "images", "wall s", "img/min", "model calls", "peak RSS MB"],
            ["interpreter + module (--version)", "-", "-", "-", "-", f"{floor:.1f}"]]
    rows += [[f"caption {m.images} images", str(m.images), f"{m.wall:.1f}",
              f"{m.report['images_per_minute']:.0f}", str(m.report["model_calls"]), f"{m.peak_mb:.1f}"]
             for m in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()

    big = results[-1]
    if len(results) == 2:
        small = results[0]
        growth = (big.peak_mb - small.peak_mb) * 1024 / (big.images - small.images)
        print(f"Growth: {big.peak_mb - small.peak_mb:+.1f} MB from {small.images} to {big.images} images "
              f"({growth:.2f} KB per extra image).")
    print(f"getrusage(RUSAGE_CHILDREN).ru_maxrss over all runs: "
          f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * RSS_UNIT / 2**20:.1f} MB")
    ok = big.peak_mb < args.limit_mb
    print(f"{big.images}-image run: peak RSS {big.peak_mb:.1f} MB, "
          f"{'under' if ok else 'OVER'} the {args.limit_mb:g} MB limit; wall time {big.wall:.0f} s "
          f"({big.wall / (2 * big.images) * 1000:.1f} ms per model call with a zero-latency server).")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
