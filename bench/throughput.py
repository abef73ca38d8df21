#!/usr/bin/env python3
"""Benchmark overlapped stages (--stages) and learned concurrency (--jobs auto) against the tests'
fake Ollama server.

    python3 bench/throughput.py [--repeats 3] [--images 40] [--request-time 0.15] [--only auto] ...

One run measures, side by side and --repeats times (medians reported):

* overlap: --images images on a simulated server with two GPUs (both models resident, one slot
  each), stage-batched (--stages sequential) versus a pipeline (--stages overlap, and the default
  --stages auto on a server where both models are already loaded), against the pipeline limit
  (the longer stage's total request time plus one request);
* the same default on a server that holds one model at a time: still two loads, no slower;
* --jobs auto versus the best fixed --jobs on servers with 1, 2, 4 and 8 slots per model, and on
  qwen3-vl (one request at a time, as Ollama forces) with a 4-slot text model;
* --jobs auto versus --jobs 1 on each of those servers, on --images-per-slot images (the 1-slot
  server's set), so that --jobs 1 on 8 slots does not take minutes.

Every run is a fresh `python3 ollama_generate.py caption` child process against a fresh fake server
(threads of this process, 127.0.0.1), with --no-cache, so every image costs two model calls. Times
are the engine's own (`seconds` in --report: the captioning, without start-up and model checks).
Standard library only. Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "tests"), str(ROOT)]

from batch import CLI, child_env, make_dataset, table, verdict  # noqa: E402
from fake_ollama import FakeOllama  # noqa: E402
from traced import TEXT, VISION, derived_answer  # noqa: E402

import ollama_generate as og  # noqa: E402

# The targets.
PIPELINE_LIMIT_TARGET = 1.2  # overlapped wall time at most this times the pipeline limit
OVERLAP_SPEEDUP_TARGET = 1.7  # sequential / overlapped
ONE_MODEL_SLOWDOWN = 1.05  # auto / sequential on a one-model server: "no slower", with 5 % for noise
AUTO_SHARE_TARGET = 0.9  # --jobs auto / best fixed --jobs
AUTO_VS_ONE_TARGET = 0.95  # --jobs auto / --jobs 1: "never loses", with 5 % for noise
SLOTS = (1, 2, 4, 8)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each case; medians are shown (default 3)")
    parser.add_argument("--images", type=int, default=40, help="images for the overlap cases (default 40)")
    parser.add_argument("--request-time", type=float, default=0.15,
                        help="simulated seconds per request in the overlap cases (default 0.15)")
    parser.add_argument("--slot-request-time", type=float, default=0.15,
                        help="simulated seconds per request in the --jobs cases (default 0.15)")
    parser.add_argument("--images-per-slot", type=int, default=40,
                        help="images per slot in the --jobs cases, so each run lasts about as long "
                             "(default 40: a stage is 40 request times at full speed)")
    parser.add_argument("--load-cost", type=float, default=0.6,
                        help=f"simulated seconds per model load (default 0.6; a load is seen at "
                             f"load_duration >= {og.LOAD_SEEN_SECONDS:g} s)")
    parser.add_argument("--only", choices=("overlap", "auto"),
                        help="run only the overlapped-stages cases or only the --jobs auto cases")
    args = parser.parse_args()
    if min(args.repeats, args.images, args.images_per_slot) < 1 or args.request_time < 0.1 \
            or args.slot_request_time < 0.1:
        parser.error("counts must be >= 1 and request times >= 0.1 s (below that the benchmark "
                     "measures Python on a shared machine, not the server)")
    return args


def caption(dataset: Path, workdir: Path, flags: list[str], *, warm: bool = False, **settings) -> dict:
    """One CLI run on a fresh fake server: the --report, plus the server's loads and peaks."""
    images = len(list(dataset.iterdir()))
    out = Path(tempfile.mkdtemp(dir=workdir))
    report_file = out / "report.json"
    fake = FakeOllama(**settings).start()
    fake.default_text = derived_answer  # in-range answers: one text call per image
    try:
        if warm:  # an earlier run left both models loaded
            client = og.OllamaClient(fake.url)
            for model in (VISION, TEXT):
                client.set_keep_alive(model, -1)
        argv = [sys.executable, str(CLI), "caption", str(dataset), "--quiet", "--no-cache",
                "--host", fake.url, "--output-dir", str(out / "captions"), "--report", str(report_file), *flags]
        proc = subprocess.run(argv, env=child_env(), capture_output=True, text=True, check=False)
        report = json.loads(report_file.read_text()) if report_file.exists() else {}
        if proc.returncode or report.get("written") != images or fake.errors:
            sys.exit(f"the CLI exited {proc.returncode}, wrote {report.get('written')} of {images}\n"
                     f"{shlex.join(argv)}\n{proc.stderr}{''.join(fake.errors)}")
        return {"seconds": report["seconds"], "per_minute": report["images_per_minute"],
                "loads": fake.loads - 2 * warm, "throughput": report["throughput"][0],
                "in_flight": dict(fake.max_in_flight_by_model)}
    finally:
        fake.stop()


def median_run(repeats: int, *args, **kwargs) -> dict:
    """The run with the median time of `repeats`, and every run's loads."""
    runs = sorted((caption(*args, **kwargs) for _ in range(repeats)), key=lambda run: run["seconds"])
    middle = dict(runs[len(runs) // 2])
    middle["all_loads"] = sorted({run["loads"] for run in runs})
    middle["all_seconds"] = [run["seconds"] for run in runs]
    return middle


def main() -> int:
    args = parse_args()
    rt, srt, load, reps = args.request_time, args.slot_request_time, args.load_cost, args.repeats
    print("command:    " + shlex.join([Path(sys.executable).name, *sys.argv]))
    print(f"parameters: --repeats {reps} --images {args.images} --request-time {rt:g} --slot-request-time "
          f"{srt:g} --images-per-slot {args.images_per_slot} --load-cost {load:g}"
          + (f" --only {args.only}" if args.only else ""))
    print(f"machine:    Python {platform.python_version()}, {os.cpu_count()} CPUs, {platform.system()}; "
          f"ollama_generate {og.__version__}")
    print(f"each run:   {Path(sys.executable).name} ollama_generate.py caption DATASET --quiet --no-cache "
          "--host URL --output-dir FRESH_DIR --report FILE FLAGS, against a fresh FakeOllama")
    print(flush=True)
    started = time.monotonic()
    ok = True
    ratios: list = []
    rows: list = []
    versus_one: list = []
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        work = Path(tmp)
        if args.only != "auto":
            ok &= overlap_cases(args, work, ratios)
        if args.only != "overlap":
            ok &= auto_cases(args, work, rows, versus_one)
    if ratios:
        print(table(["ratio", "measured", "target", "result"], ratios))
        print()
    if rows:
        print(table(["--jobs auto on", "images", "img/min", "best fixed img/min", "auto / best",
                     "chose vision/text", "in flight", "loads", "result"], rows))
        print()
        print(table(["--jobs auto vs --jobs 1 on", "images", "auto img/min", "--jobs 1 img/min",
                     "auto / --jobs 1", "loads", "result"], versus_one))
        print()
        print(f"targets: auto / best >= {AUTO_SHARE_TARGET}, 2 loads; qwen3-vl + 4-slot text: 1/4, 2 loads; "
              f"auto / --jobs 1 >= {AUTO_VS_ONE_TARGET} (no loss beyond noise).")
    print(f"Took {time.monotonic() - started:.0f} s.")
    return 0 if ok else 1


def overlap_cases(args: argparse.Namespace, work: Path, ratios: list) -> bool:
    """Overlapped stages: prints the cases' table and fills the ratio rows; False if a target is missed."""
    rt, load, reps = args.request_time, args.load_cost, args.repeats
    ok = True
    overlap_set = work / "overlap"
    make_dataset(overlap_set, args.images)
    two_gpus = {"max_loaded": 2, "parallel": 1, "request_time": rt}
    one_gpu = {"max_loaded": 1, "parallel": 1, "request_time": rt, "load_cost": load}
    cases = {
        "two GPUs, --stages sequential": median_run(reps, overlap_set, work, ["--stages", "sequential"],
                                                    **two_gpus),
        "two GPUs, --stages overlap": median_run(reps, overlap_set, work, ["--stages", "overlap"], **two_gpus),
        "two GPUs (warm), default (auto)": median_run(reps, overlap_set, work, [], warm=True, **two_gpus),
        "one GPU, --stages sequential": median_run(reps, overlap_set, work, ["--stages", "sequential"],
                                                   **one_gpu),
        "one GPU, default (auto)": median_run(reps, overlap_set, work, [], **one_gpu),
    }
    rows = [[name, f"{run['seconds']:.2f}", " ".join(f"{s:.2f}" for s in run["all_seconds"]),
             f"{run['per_minute']:.0f}", "/".join(map(str, run["all_loads"])),
             "yes" if run["throughput"]["overlapped"] else "no"] for name, run in cases.items()]
    print(table(["overlap case", "median s", "runs s", "img/min", "loads", "overlapped"], rows))
    print()
    limit = args.images * rt + rt  # both stages take images x rt; plus one request to fill the pipe
    sequential = cases["two GPUs, --stages sequential"]["seconds"]
    for name in ("two GPUs, --stages overlap", "two GPUs (warm), default (auto)"):
        seconds = cases[name]["seconds"]
        within, speedup = seconds / limit, sequential / seconds
        good = within <= PIPELINE_LIMIT_TARGET and speedup >= OVERLAP_SPEEDUP_TARGET \
            and cases[name]["all_loads"] == [0 if "warm" in name else 2]
        ok &= good
        ratios.append([f"{name}: time / pipeline limit {limit:.2f} s", f"{within:.2f}x",
                       f"<= {PIPELINE_LIMIT_TARGET}x", ""])
        ratios.append([f"{name}: sequential / it", f"{speedup:.2f}x", f">= {OVERLAP_SPEEDUP_TARGET}x",
                       verdict(good)])
    one_seq, one_auto = cases["one GPU, --stages sequential"], cases["one GPU, default (auto)"]
    slower = one_auto["seconds"] / one_seq["seconds"]
    good = slower <= ONE_MODEL_SLOWDOWN and one_auto["all_loads"] == one_seq["all_loads"] == [2]
    ok &= good
    loads = "/".join(map(str, one_auto["all_loads"]))
    ratios.append([f"one GPU: default / sequential (loads {loads})",
                   f"{slower:.2f}x", f"<= {ONE_MODEL_SLOWDOWN}x, 2 loads", verdict(good)])
    return ok


def auto_cases(args: argparse.Namespace, work: Path, rows: list, versus_one: list) -> bool:
    """--jobs auto against the best fixed --jobs and against --jobs 1; False if a target is missed."""
    srt, load, reps = args.slot_request_time, args.load_cost, args.repeats
    ok = True
    small = work / "small"
    make_dataset(small, args.images_per_slot)

    def stages(run: dict, key: str) -> str:
        return "/".join(str(run["throughput"]["stages"][name][key]) for name in ("vision", "text"))

    for slots in SLOTS:
        dataset = work / f"slots{slots}"
        make_dataset(dataset, args.images_per_slot * slots)
        server = {"parallel": slots, "serial_families": (), "request_time": srt, "max_loaded": 1,
                  "load_cost": load}
        auto = median_run(reps, dataset, work, ["--jobs", "auto"], **server)
        fixed = {jobs: median_run(reps, dataset, work, ["--jobs", str(jobs)], **server)
                 for jobs in sorted({slots, 2 * slots})}
        best_jobs, best = max(fixed.items(), key=lambda item: item[1]["per_minute"])
        share = auto["per_minute"] / best["per_minute"]
        good = share >= AUTO_SHARE_TARGET and auto["all_loads"] == [2] and stages(auto, "jobs") == f"{slots}/{slots}"
        ok &= good
        rows.append([f"{slots} slot{'s' * (slots > 1)}", str(args.images_per_slot * slots),
                     f"{auto['per_minute']:.0f}", f"--jobs {best_jobs}: {best['per_minute']:.0f}",
                     f"{share:.2f}", stages(auto, "jobs"), stages(auto, "in_flight"),
                     "/".join(map(str, auto["all_loads"])), verdict(good)])
        # against --jobs 1, side by side on the small set (--jobs 1 on 320 images would take minutes)
        auto_small = auto if slots == 1 else median_run(reps, small, work, ["--jobs", "auto"], **server)
        one = fixed[1] if slots == 1 else median_run(reps, small, work, ["--jobs", "1"], **server)
        versus = auto_small["per_minute"] / one["per_minute"]
        good = versus >= AUTO_VS_ONE_TARGET and auto_small["all_loads"] == one["all_loads"] == [2]
        ok &= good
        versus_one.append([f"{slots} slot{'s' * (slots > 1)}", str(args.images_per_slot),
                           f"{auto_small['per_minute']:.0f}", f"{one['per_minute']:.0f}", f"{versus:.2f}",
                           "/".join(map(str, sorted({*auto_small["all_loads"], *one["all_loads"]}))),
                           verdict(good)])
    mixed_set = work / "mixed"
    make_dataset(mixed_set, args.images)
    server = {"parallel": 4, "request_time": srt, "max_loaded": 1, "load_cost": load}
    mixed = median_run(reps, mixed_set, work, ["--jobs", "auto", "--stages", "sequential"], **server)
    good = stages(mixed, "jobs") == "1/4" and mixed["all_loads"] == [2]
    ok &= good
    rows.append(["qwen3-vl (1) + text (4)", str(args.images), f"{mixed['per_minute']:.0f}", "", "",
                 stages(mixed, "jobs"), stages(mixed, "in_flight"), "/".join(map(str, mixed["all_loads"])),
                 verdict(good)])
    one = median_run(reps, mixed_set, work, ["--jobs", "1", "--stages", "sequential"], **server)
    versus = mixed["per_minute"] / one["per_minute"]
    good = versus >= AUTO_VS_ONE_TARGET and one["all_loads"] == [2]
    ok &= good
    versus_one.append(["qwen3-vl (1) + text (4)", str(args.images), f"{mixed['per_minute']:.0f}",
                       f"{one['per_minute']:.0f}", f"{versus:.2f}", "/".join(map(str, one["all_loads"])),
                       verdict(good)])
    return ok


if __name__ == "__main__":
    sys.exit(main())
