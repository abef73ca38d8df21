#!/usr/bin/env python3
"""Benchmark the two transports side by side: Ollama's own API and the OpenAI-compatible one.

    python3 bench/transports.py [--repeats 3] [--images 40] [--request-time 0.08] [--parallel 4]

The same folder run (`caption --no-cache --jobs 4`, two model calls per image) goes to one fake
server through each face, interleaved --repeats times (medians reported):

* the overhead probe: no simulated time at all, so the wall time is what the client and the fake
  cost per model call (NDJSON vs server-sent events, base64 vs data URLs, the vision probe);
* a server with --parallel slots and --request-time seconds per request: images per minute.

Both fakes are the tests' (tests/fake_ollama.py), `FakeOllama()` and `FakeOllama(api="openai")`,
with the same models, slots and times; the vision model answers in parallel (as gemma3 does). The
OpenAI-compatible run names its server with a /v1 URL. Times are the engine's own (`seconds` in
--report). Standard library only. Exits 1 when the OpenAI-compatible transport is more than
TARGET slower on the simulated server.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)]

from batch import CLI, child_env, make_dataset, table, verdict  # noqa: E402
from fake_ollama import FakeOllama  # noqa: E402
from traced import TEXT, VISION, derived_answer  # noqa: E402

TARGET = 0.9  # OpenAI-compatible images per minute / Ollama's, on the simulated server
MODELS = {VISION: {"capabilities": ("completion", "vision"), "family": "gemma3"},
          TEXT: {"capabilities": ("completion",), "family": "qwen3"}}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each case (default 3)")
    parser.add_argument("--images", type=int, default=40, help="images per run (default 40)")
    parser.add_argument("--request-time", type=float, default=0.08,
                        help="simulated seconds per request (default 0.08)")
    parser.add_argument("--parallel", type=int, default=4, help="slots per model (default 4)")
    return parser.parse_args()


def run(api: str, dataset: Path, workdir: Path, images: int, **settings: float) -> float:
    """One folder run through one face of a fresh fake; returns the engine's seconds."""
    fake = FakeOllama(api=api, models=MODELS, serial_families=(), **settings).start()
    fake.default_text = derived_answer
    out = Path(tempfile.mkdtemp(dir=workdir))
    report_file = out / "report.json"
    host = fake.url + ("/v1" if api == "openai" else "")
    argv = [sys.executable, str(CLI), "caption", str(dataset), "--quiet", "--no-cache", "--jobs", "4",
            "--output-dir", str(out / "captions"), "--report", str(report_file), "--host", host]
    try:
        proc = subprocess.run(argv, env=child_env(), capture_output=True, text=True, check=False)
    finally:
        fake.stop()
    if fake.errors:
        sys.exit("the fake server failed internally:\n" + "\n".join(fake.errors))
    report = json.loads(report_file.read_text()) if report_file.exists() else {}
    if proc.returncode or report.get("written") != images:
        sys.exit(f"{api}: the CLI exited {proc.returncode}, wrote {report.get('written')} of {images}\n"
                 f"{shlex.join(argv)}\n{proc.stderr}")
    return float(report["seconds"])


def main() -> int:
    args = parse_args()
    print(f"python3 bench/transports.py --repeats {args.repeats} --images {args.images} "
          f"--request-time {args.request_time:g} --parallel {args.parallel}")
    print(f"{platform.python_implementation()} {platform.python_version()} on {platform.machine()}, "
          f"caption --no-cache --jobs 4, two model calls per image\n")
    cases = {"overhead probe (no simulated time)": {},
             f"{args.parallel} slots, {args.request_time:g} s a request":
                 {"parallel": args.parallel, "request_time": args.request_time}}
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        dataset = workdir / "set"
        make_dataset(dataset, args.images)
        for label, settings in cases.items():
            seconds: dict[str, list[float]] = {"ollama": [], "openai": []}
            for _ in range(args.repeats):  # interleaved, so a noisy moment hits both alike
                for api in seconds:
                    seconds[api].append(run(api, dataset, workdir, args.images, **settings))
            ollama, openai = (statistics.median(seconds[api]) for api in ("ollama", "openai"))
            per_call = {api: value * 1000 / (2 * args.images) for api, value in (("ollama", ollama), ("openai", openai))}
            ratio = ollama / openai  # images per minute, OpenAI-compatible / Ollama
            checked = bool(settings)
            ok = ok and (not checked or ratio >= TARGET)
            rows.append([label, f"{ollama:.2f} s ({per_call['ollama']:.1f} ms/call)",
                         f"{openai:.2f} s ({per_call['openai']:.1f} ms/call)", f"{ratio:.2f}",
                         f">= {TARGET} {verdict(ratio >= TARGET)}" if checked else "-"])
    print(table(["server", "Ollama's API", "OpenAI-compatible", "speed ratio", "target"], rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
