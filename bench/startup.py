#!/usr/bin/env python3
"""Start-up cost of ollama_generate.py next to the least Python can do for the same job.

    python3 bench/startup.py [--pairs 30] [--warmup 2] [--python PATH] [--cli PATH] [--no-site]

Agents run the script many times per task, so its start-up matters. Two comparisons, each as
alternating child processes (A, B, A, B, ...) so that machine noise hits both sides alike:

1. `python3 ollama_generate.py --help` vs `python3 -c "import argparse, json, urllib.request"`:
   target ratio <= 1.0.
2. `python3 ollama_generate.py prompt "a fox" --no-stream --host URL` vs bench/baseline_prompt.py,
   a 20-line urllib script that POSTs the same JSON body to URL/api/generate (stream true), reads
   the NDJSON stream to the end and prints the text: target ratio <= 1.2.

URL is the tests' fake Ollama server (tests/fake_ollama.py) on 127.0.0.1, in this process, with no
simulated latency. `python3 -c pass` runs in the first interleave too, as the interpreter's floor.
Each command runs --warmup times before measuring (byte-code caches written, files in the page
cache). Wall time is time.perf_counter() around subprocess.run. The children run without OLLAMA_*,
proxy and cost-changing PYTHON* variables (PYTHONDONTWRITEBYTECODE among them, so imported modules
are read from their byte-code caches). The ratios are of medians (the verdict) and of minimums (the
least noisy run of each). Then, for diagnosis: `-X importtime` of the --help and prompt runs, the
imports the script makes that its baseline does not, the time to compile the script's source, which
Python pays on every run because it never caches byte code for a script run by path, and the same
--help with the code loaded from a byte-code cache instead (what a small launcher script would cost).

--cli measures another copy of the script (a candidate change) in place of ./ollama_generate.py.
--no-site runs every child with -S: no site-packages .pth hooks, which on some machines pre-import
modules (re, tempfile, pathlib, ...) for every command alike and so hide what the script imports.

Exits 1 when a target is missed. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = "ollama_generate.py"  # children run in ROOT, so commands read as a user types them
BASELINE = "bench/baseline_prompt.py"
sys.path[:0] = [str(ROOT / "tests")]

from fake_ollama import FakeOllama

HELP_TARGET = 1.0
PROMPT_TARGET = 1.2
BASELINE_IMPORTS = "import argparse, json, urllib.request"
CONCEPT = "a fox"
# A real-length t5 prompt (60-120 words), streamed by the fake in 8-character NDJSON pieces.
ANSWER = ("A red fox standing alert in a snowy birch forest at dawn, its thick winter coat glowing "
          "copper against the pale blue snow, breath visible in the cold air. Low golden sunlight "
          "slants through the thin white trunks and casts long violet shadows across the drifts. "
          "Eye-level medium shot with a shallow depth of field, the background dissolving into soft "
          "bokeh. Wildlife photography, shot on a 400mm telephoto lens, crisp detail in the fur and "
          "whiskers, muted cool palette with warm highlights, serene and quiet mood.")
PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy",
              "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
# Python settings that would change what a run does or costs.
PYTHON_VARS = ("PYTHONPROFILEIMPORTTIME", "PYTHONDEVMODE", "PYTHONVERBOSE", "PYTHONTRACEMALLOC",
               "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX", "PYTHONWARNINGS", "PYTHONASYNCIODEBUG")


def child_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if not k.startswith("OLLAMA_") and k not in PROXY_VARS and k not in PYTHON_VARS}


def run(argv: list[str], env: dict[str, str], expect: str | None = None) -> float:
    """Run one child to completion; its wall time in seconds. Any failure ends the benchmark."""
    t0 = time.perf_counter()
    result = subprocess.run(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    elapsed = time.perf_counter() - t0
    out = result.stdout.decode("utf-8", "replace")
    if result.returncode != 0 or (expect is not None and out.strip() != expect):
        sys.exit(f"benchmark run failed (exit {result.returncode}): {shlex.join(argv)}\n"
                 f"stdout: {out[:500]!r}\nstderr: {result.stderr.decode('utf-8', 'replace')[:2000]}")
    return elapsed


def interleave(commands: list[tuple[list[str], str | None]], rounds: int,
               env: dict[str, str]) -> list[list[float]]:
    """Run the commands in turn, `rounds` times: A, B, A, B, ..."""
    times: list[list[float]] = [[] for _ in commands]
    for _ in range(rounds):
        for i, (argv, expect) in enumerate(commands):
            times[i].append(run(argv, env, expect))
    return times


def importtime(argv: list[str], env: dict[str, str],
               skip: frozenset[str] | set[str] = frozenset()) -> list[tuple[str, int, int, int]]:
    """(module, level, self us, cumulative us) of each import -X importtime reports, but those in skip
    (what the interpreter loads before any command: site and its .pth hooks)."""
    result = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], cwd=ROOT, env=env, check=False,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    rows: list[tuple[str, int, int, int]] = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        head, cumulative, name = line.split("|", 2)  # "import time: SELF | CUMULATIVE | <indent>NAME"
        own = head.split(":", 1)[1]
        level = (len(name) - len(name.lstrip(" ")) - 1) // 2
        if name.strip() not in skip:
            rows.append((name.strip(), level, int(own), int(cumulative)))
    return rows


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def verdict(ratio: float, target: float) -> str:
    return "ok" if ratio <= target else "MISSED"


def print_table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        print("  " + "  ".join(cells).rstrip())
        if n == 0:
            print("  " + "  ".join("-" * w for w in widths))


def stats_row(label: str, samples: list[float]) -> list[str]:
    return [label, ms(statistics.median(samples)), ms(min(samples)), ms(max(samples)),
            ms(statistics.stdev(samples)) if len(samples) > 1 else "-"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=30, help="measured A/B rounds per comparison (default 30)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured runs of each command first (default 2)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for the children (default: this one, resolved past any shim)")
    parser.add_argument("--cli", default=CLI, help=f"the script to measure (default {CLI}, relative to the repository)")
    parser.add_argument("--no-site", action="store_true", help="run every child with -S (no site-packages hooks)")
    args = parser.parse_args()
    if args.pairs < 2 or args.warmup < 1:
        parser.error("--pairs must be >= 2 and --warmup >= 1")
    if not (ROOT / args.cli).is_file():
        parser.error(f"--cli {args.cli}: no such file")
    py = args.python
    cli = args.cli
    flags = ["-S"] if args.no_site else []
    py_cmd = [py, *flags]
    env = child_env()

    print("command:    " + shlex.join([Path(sys.executable).name, *sys.argv]))
    print(f"parameters: --pairs {args.pairs} --warmup {args.warmup} --python {py} --cli {cli}"
          + (" --no-site (children run with -S)" if flags else ""))
    print(f"machine:    Python {platform.python_version()} ({platform.python_implementation()}), "
          f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}")
    cleared = sorted(set(os.environ) - set(env))
    print(f"children:   cwd {ROOT}; cleared: {', '.join(cleared) or 'nothing set'}; kept: "
          + (", ".join(k for k in sorted(env) if k.startswith("PYTHON")) or "no PYTHON* variables"))

    fake = FakeOllama().start()
    fake.default_text = ANSWER
    work = Path(tempfile.mkdtemp(prefix="ollama-startup-"))
    body_file = work / "body.json"
    try:
        help_cmds: list[tuple[list[str], str | None]] = [
            ([*py_cmd, cli, "--help"], None),
            ([*py_cmd, "-c", BASELINE_IMPORTS], None),
            ([*py_cmd, "-c", "pass"], None),
        ]
        prompt_argv = [*py_cmd, cli, "prompt", CONCEPT, "--no-stream", "--host", fake.url]
        # The first run of the tool shows what it sends; the baseline sends exactly those bytes.
        run(prompt_argv, env)
        generations = [r for r in fake.requests if r.path == "/api/generate"]
        if len(fake.requests) != 1 or len(generations) != 1:
            sys.exit(f"expected one /api/generate request per prompt call, got "
                     f"{[(r.method, r.path) for r in fake.requests]}")
        body = generations[0].body
        if not (isinstance(body, dict) and body.get("stream") is True):
            sys.exit(f"the tool's request is not a streaming one: {body!r}")
        body_file.write_bytes(generations[0].raw)
        prompt_cmds: list[tuple[list[str], str | None]] = [
            (prompt_argv, None),
            ([*py_cmd, BASELINE, fake.url, str(body_file)], ANSWER),
        ]
        tool_text = subprocess.run(prompt_argv, cwd=ROOT, env=env, capture_output=True, text=True,
                                   check=True).stdout.strip()
        prompt_cmds[0] = (prompt_argv, tool_text)

        print(f"server:     FakeOllama at {fake.url}, no latency; answer {len(ANSWER)} characters in "
              f"8-character NDJSON pieces; request body {len(generations[0].raw)} bytes "
              f"(model {body.get('model')}), replayed by {BASELINE}")
        print(f"method:     {args.warmup} warm-up runs of each command, then {args.pairs} rounds "
              f"interleaved A, B[, floor], A, B, ...; wall time of subprocess.run (perf_counter)")
        print(flush=True)

        for argv, expect in help_cmds + prompt_cmds:
            for _ in range(args.warmup):
                run(argv, env, expect)
        t0 = time.perf_counter()
        help_times = interleave(help_cmds, args.pairs, env)
        fake.requests.clear()
        prompt_times = interleave(prompt_cmds, args.pairs, env)
        generate_calls = len([r for r in fake.requests if r.path == "/api/generate"])
        measured = time.perf_counter() - t0
        if fake.errors:
            sys.exit("the fake server failed:\n" + "\n".join(fake.errors))
    finally:
        fake.stop()
        shutil.rmtree(work, ignore_errors=True)

    def show(argv: list[str]) -> str:
        return shlex.join(["python3", *argv[1:]]).replace(str(body_file), "BODY.json").replace(fake.url, "URL")

    rows = [["command", "median ms", "min ms", "max ms", "stdev ms"]]
    rows += [stats_row(show(argv), t) for (argv, _), t in zip(help_cmds + prompt_cmds, help_times + prompt_times)]
    print(f"Wall time per run ({args.pairs} runs each, {measured:.1f} s in all; URL = {fake.url}; "
          f"{generate_calls} /api/generate requests in the prompt rounds):")
    print_table(rows)
    print()

    missed = False
    floor = statistics.median(help_times[2])
    for name, (a, b), target in (("--help vs import argparse, json, urllib.request", help_times[:2], HELP_TARGET),
                                 ("prompt vs baseline_prompt.py", prompt_times, PROMPT_TARGET)):
        r_med = statistics.median(a) / statistics.median(b)
        r_min = min(a) / min(b)
        missed |= r_med > target
        print(f"{name}:")
        print(f"  ratio of medians {r_med:.3f}  (target <= {target:.1f})  {verdict(r_med, target)}")
        print(f"  ratio of minimums {r_min:.3f} (target <= {target:.1f})  {verdict(r_min, target)}")
        print(f"  above the interpreter floor (`python3 -c pass`, median {ms(floor)} ms): "
              f"{ms(statistics.median(a) - floor)} ms vs {ms(statistics.median(b) - floor)} ms")
    print()

    # -- Diagnosis ---------------------------------------------------------------------------
    print("Diagnosis (single runs, indicative):")
    startup = {name for name, *_ in importtime([*py_cmd, "-c", "pass"], env)}
    tool_help = importtime(help_cmds[0][0], env, startup)
    base_help = importtime(help_cmds[1][0], env, startup)
    print(f"  python3 -X importtime {cli} --help: top 10 cumulative imports beyond `python3 -c pass`'s "
          f"(level 0 = imported by the script itself):")
    top = sorted(tool_help, key=lambda row: -row[3])[:10]
    print_table([["module", "level", "self ms", "cumulative ms"]]
                + [[name, str(level), f"{own / 1000:.1f}", f"{cum / 1000:.1f}"] for name, level, own, cum in top])
    base_modules = {name for name, *_ in base_help}
    extra = [(name, cum) for name, level, _, cum in tool_help if level == 0 and name not in base_modules]
    print(f"  level-0 imports of {cli} --help that `{BASELINE_IMPORTS}` never loads "
          f"(cumulative, shared dependencies counted where first loaded):")
    print("    " + ", ".join(f"{name} {cum / 1000:.1f}" for name, cum in sorted(extra, key=lambda e: -e[1]))
          + f"  = {sum(c for _, c in extra) / 1000:.1f} ms")
    print(f"  all imports beyond `python3 -c pass`'s: {len(tool_help)} modules, "
          f"{sum(o for _, _, o, _ in tool_help) / 1000:.1f} ms ({cli} --help) vs {len(base_help)} modules, "
          f"{sum(o for _, _, o, _ in base_help) / 1000:.1f} ms (baseline)")
    source = (ROOT / cli).read_text(encoding="utf-8")
    compile_times = []
    for _ in range(5):
        c0 = time.perf_counter()
        compile(source, cli, "exec")
        compile_times.append(time.perf_counter() - c0)
    print(f"  compiling {cli} ({len(source.encode()) // 1024} KB, {source.count(chr(10))} lines), paid on "
          f"every `python3 {cli}` run (no byte-code cache for a script): min {ms(min(compile_times))} ms "
          f"of 5 in this process")
    if min(compile_times) > 0.002 and "\ndef main(" in source:
        # The same --help with the code loaded from a byte-code cache (a private one, in a temporary
        # folder, so the repository gets no __pycache__): what a tiny launcher script would cost.
        cache = Path(tempfile.mkdtemp(prefix="ollama-startup-pyc-"))
        try:
            cache_env = {**env, "PYTHONPYCACHEPREFIX": str(cache)}
            script = (ROOT / cli).resolve()
            code = (f"import sys; sys.path.insert(0, {str(script.parent)!r}); "
                    f"import {script.stem} as m; sys.exit(m.main(['--help']))")
            cached = [*py_cmd, "-c", code]
            pair = [([*py_cmd, cli, "--help"], None), (cached, None)]
            for argv, _ in pair:
                for _ in range(args.warmup + 1):  # the first run writes the cache
                    run(argv, cache_env)
            as_script, from_cache = interleave(pair, args.pairs, cache_env)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        print(f"  the same --help with {script.name} loaded from a byte-code cache, as a small launcher "
              f"script would (`python3 -c \"import {script.stem}; {script.stem}.main(['--help'])\"`, "
              f"{args.pairs} interleaved runs): median {ms(statistics.median(from_cache))} ms vs "
              f"{ms(statistics.median(as_script))} ms as a script "
              f"({ms(statistics.median(as_script) - statistics.median(from_cache))} ms saved; ratio to "
              f"the --help baseline {statistics.median(from_cache) / statistics.median(help_times[1]):.3f})")

    fake = FakeOllama().start()
    fake.default_text = ANSWER
    work = Path(tempfile.mkdtemp(prefix="ollama-startup-"))
    try:
        tool_prompt = importtime([*py_cmd, cli, "prompt", CONCEPT, "--no-stream", "--host", fake.url], env, startup)
        body_file = work / "body.json"
        body_file.write_bytes(fake.requests[-1].raw)
        base_prompt = importtime([*py_cmd, BASELINE, fake.url, str(body_file)], env, startup)
    finally:
        fake.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"  python3 -X importtime {cli} prompt ... : top 10 cumulative imports beyond `python3 -c pass`'s:")
    top = sorted(tool_prompt, key=lambda row: -row[3])[:10]
    print_table([["module", "level", "self ms", "cumulative ms"]]
                + [[name, str(level), f"{own / 1000:.1f}", f"{cum / 1000:.1f}"] for name, level, own, cum in top])
    base_modules = {name for name, *_ in base_prompt}
    extra = [(name, cum) for name, level, _, cum in tool_prompt if level == 0 and name not in base_modules]
    print(f"  level-0 imports of {cli} prompt that {BASELINE} never loads:")
    print("    " + ", ".join(f"{name} {cum / 1000:.1f}" for name, cum in sorted(extra, key=lambda e: -e[1]))
          + f"  = {sum(c for _, c in extra) / 1000:.1f} ms")
    print(f"  all imports beyond `python3 -c pass`'s: {len(tool_prompt)} modules, "
          f"{sum(o for _, _, o, _ in tool_prompt) / 1000:.1f} ms ({cli} prompt) vs {len(base_prompt)} modules, "
          f"{sum(o for _, _, o, _ in base_prompt) / 1000:.1f} ms (baseline)")
    print()
    print("Result: " + ("a target was MISSED" if missed else "both targets met"))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
