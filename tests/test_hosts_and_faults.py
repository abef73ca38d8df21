"""Folder runs over several servers, servers that fail in every way, reruns that repeat no work,
and memory over a thousand images."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import threading

import pytest
from cli import run
from images import png_bytes
from traced import CACHE, DESCRIPTION, TEXT, VISION, derived_answer, expected_caption, make_images, tag_of

import ollama_generate as og

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "ollama_generate.py")


# -- helpers -------------------------------------------------------------------------------------




def request_tag(rec) -> str:
    """Which image a content request is about."""
    if rec.path == "/api/chat":
        return tag_of(base64.b64decode(rec.body["messages"][1]["images"][0]))
    found = re.search(r"Picture ([0-9a-f]{12}) seen\.", rec.body.get("prompt", ""))
    return found.group(1) if found else ""




def chats(fake):
    return fake.requests_to("/api/chat")


def caption_requests(fake):
    return [r for r in fake.requests_to("/api/generate") if r.body.get("prompt")]


def assert_captions(dataset, names):
    for name in names:
        assert (dataset / name).with_suffix(".txt").read_text() == expected_caption(dataset / name), name


def leftovers(folder):
    """Temp files, and empty or partial caption files: none may ever remain."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.name.endswith(".tmp") or (p.suffix == ".txt" and p.stat().st_size == 0))


def cached_descriptions(dataset):
    return sorted(json.loads(line)["description"] for line in (dataset / CACHE).read_text().splitlines())


class Killer:
    """Kill servers from another thread (as a crash would), and wait for that before restarting."""

    def __init__(self):
        self.threads = []

    def kill(self, *servers):
        for server in servers:
            thread = threading.Thread(target=server.kill)
            thread.start()
            self.threads.append(thread)

    def join(self):
        for thread in self.threads:
            thread.join(10)


def serve(make_ollama, monkeypatch=None, **kwargs):
    server = make_ollama(**kwargs)
    server.default_text = derived_answer
    if monkeypatch is not None:
        monkeypatch.setenv("OLLAMA_HOST", server.url)
    return server


NAMES = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]


# -- several hosts -------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["flags", "env"])
def test_two_hosts_share_a_folder(make_ollama, capsys, tmp_path, monkeypatch, how):
    one = serve(make_ollama, request_time=0.05)
    two = serve(make_ollama, request_time=0.05)
    dataset = make_images(tmp_path / "set", NAMES)
    if how == "flags":
        argv = ["--host", one.url, "--host", two.url]
    else:
        monkeypatch.setenv("OLLAMA_HOST", f"{one.url}, {two.url},")
        argv = []
    code, out, _err = run(capsys, "caption", dataset, *argv, "--report", tmp_path / "r.json")
    assert (code, out) == (0, "")
    assert_captions(dataset, NAMES)
    for server in (one, two):
        assert [r.body["model"] for r in server.requests_to("/api/show")] == [VISION, TEXT]
        assert chats(server) and caption_requests(server)
        releases = [r.body for r in server.requests_to("/api/generate") if not r.body.get("prompt")]
        assert {b["model"] for b in releases} == {VISION, TEXT}
    # Every image was described once and captioned once, on one server or the other.
    assert sorted(request_tag(r) for r in chats(one) + chats(two)) == sorted(
        tag_of((dataset / n).read_bytes()) for n in NAMES)
    assert len(caption_requests(one) + caption_requests(two)) == 6
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["hosts"] == [
        {"url": one.url, "model_calls": len(chats(one) + caption_requests(one)), "model_loads": 0, "dropped": None, "api": "ollama", "not_reported": []},
        {"url": two.url, "model_calls": len(chats(two) + caption_requests(two)), "model_loads": 0, "dropped": None, "api": "ollama", "not_reported": []},
    ]
    assert report["model_calls"] == 12


def test_jobs_apply_to_each_host(make_ollama, capsys, tmp_path):
    one = serve(make_ollama, parallel=4, request_time=0.1)
    two = serve(make_ollama, parallel=4, request_time=0.1)
    names = [f"{n}.png" for n in "abcdefgh"]
    dataset = make_images(tmp_path / "set", names)
    code, _out, _err = run(capsys, "caption", dataset, "--host", one.url, "--host", two.url, "--jobs", "2")
    assert code == 0
    assert (one.max_concurrent_seen, two.max_concurrent_seen) == (2, 2)
    assert_captions(dataset, names)


def test_a_server_that_holds_one_model_swaps_once_per_chunk_beside_one_that_holds_both(make_ollama, capsys,
                                                                                      tmp_path):
    both = serve(make_ollama, max_loaded=2, load_cost=0.3, request_time={VISION: 0.2, "*": 0.05})
    one = serve(make_ollama, max_loaded=1, load_cost=0.3, request_time=0.05)
    names = [f"{n:02}.png" for n in range(36)]
    dataset = make_images(tmp_path / "set", names)
    code, out, _err = run(capsys, "caption", dataset, "--host", both.url, "--host", one.url, "--chunk", "6")
    assert (code, out) == (0, "")
    assert_captions(dataset, names)
    # Stages overlap on the first from the second chunk on; the other describes its share of each
    # chunk, then writes: it never sends a caption request while a description of its own is due.
    chunk_of = {tag_of((dataset / name).read_bytes()): index // 6 for index, name in enumerate(names)}
    asked = [(chunk_of[request_tag(r)], r.path) for r in one.requests
             if r.path == "/api/chat" or r.body and r.body.get("prompt")]
    for chunk in range(6):
        paths = [path for at, path in asked if at == chunk]
        assert paths == sorted(paths), f"chunk {chunk}: {paths}"  # /api/chat ones, then /api/generate ones
    assert both.loads == 2 and one.loads <= 2 * 6


def test_a_host_down_at_the_start_is_left_out(make_ollama, capsys, tmp_path):
    dead = make_ollama()
    dead_url = dead.url
    dead.stop()
    live = serve(make_ollama)
    dataset = make_images(tmp_path / "set", NAMES[:3])
    code, out, err = run(capsys, "caption", dataset, "--host", dead_url, "--host", live.url)
    assert (code, out) == (0, "")
    first = err.splitlines()[0]
    assert first.startswith(f"ollama-generate: warning: leaving out {dead_url}: cannot connect to Ollama at {dead_url} (")
    assert err.count("warning") == 1
    assert err.splitlines()[1] == "[1/3] a.png: written"
    assert_captions(dataset, NAMES[:3])
    assert len(chats(live)) == 3


def test_no_host_up_at_the_start(make_ollama, capsys, tmp_path):
    urls = []
    for _ in range(2):
        server = make_ollama()
        urls.append(server.url)
        server.stop()
    dataset = make_images(tmp_path / "set", ["a.png"])
    code, out, err = run(capsys, "caption", dataset, "--host", urls[0], "--host", urls[1])
    assert (code, out) == (3, "")
    lines = err.splitlines()
    assert [line.split(": cannot")[0] for line in lines[:2]] == [
        f"ollama-generate: warning: leaving out {urls[0]}", f"ollama-generate: warning: leaving out {urls[1]}"]
    assert lines[2].startswith(f"ollama-generate: error: cannot connect to Ollama at {urls[0]} (")
    assert os.listdir(dataset) == ["a.png"]


def _die_mid_stage(make_ollama, capsys, tmp_path, stage):
    """Host one dies while answering its first request of `stage`; host two goes on."""
    one = serve(make_ollama, request_time=0.3)
    two = serve(make_ollama, request_time=0.05)
    killer = Killer()
    lost = []
    path = "/api/chat" if stage == "vision" else "/api/generate"

    def answer(rec):
        if rec.path == path and not lost:
            lost.append(request_tag(rec))
            killer.kill(one)
        return derived_answer(rec)

    one.default_text = answer
    dataset = make_images(tmp_path / "set", NAMES)
    code, out, err = run(capsys, "caption", dataset, "--host", one.url, "--host", two.url,
                         "--report", tmp_path / "r.json")
    killer.join()
    return one, two, dataset, lost[0], code, out, err


# The text variant caught a job handed over with its description already cleared (fixed in 1a4065d).
@pytest.mark.parametrize("stage", ["vision", "text"])
def test_a_host_that_dies_mid_run_is_left_out_and_its_image_goes_elsewhere(make_ollama, capsys, tmp_path, stage):
    one, two, dataset, lost, code, out, err = _die_mid_stage(make_ollama, capsys, tmp_path, stage)
    assert (code, out) == (0, "")
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"ollama-generate: warning: leaving out {one.url} for the rest of the run: "
                                  f"cannot connect to Ollama at {one.url} (")
    # The image host one was working on was done again by host two.
    path = "/api/chat" if stage == "vision" else "/api/generate"
    assert lost in [request_tag(r) for r in two.requests_to(path)]
    assert_captions(dataset, NAMES)
    assert leftovers(dataset) == []
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["written"] == 6 and report["interrupted"] is False
    assert report["hosts"][0]["url"] == one.url
    assert report["hosts"][0]["dropped"].startswith(f"cannot connect to Ollama at {one.url} (")
    assert report["hosts"][1] == {"url": two.url, "model_calls": report["hosts"][1]["model_calls"],
                                  "model_loads": 0, "dropped": None, "api": "ollama", "not_reported": []}
    # The dropped host is not asked to hand its models back (its one /api/ps is --stages auto's
    # look before the chunk).
    assert len(one.requests_to("/api/ps")) == len(two.requests_to("/api/ps")) - 1 == 1
    assert [r for r in one.requests_to("/api/generate") if not r.body.get("prompt")] == []


def test_the_run_stops_only_when_no_host_is_left_and_keeps_its_work(make_ollama, capsys, tmp_path):
    one = serve(make_ollama, request_time=0.1)
    two = serve(make_ollama, request_time=0.1)
    killer = Killer()
    lock = threading.Lock()
    seen = []

    def answer(rec):
        with lock:
            if rec.path == "/api/chat":
                seen.append(rec)
                if len(seen) == 3:  # the second chunk's vision stage
                    killer.kill(one, two)
        return derived_answer(rec)

    one.default_text = two.default_text = answer
    dataset = make_images(tmp_path / "set", NAMES)
    code, out, err = run(capsys, "caption", dataset, "--host", one.url, "--host", two.url, "--chunk", "2",
                         "--report", tmp_path / "r.json")
    killer.join()
    assert (code, out) == (3, "")
    lines = err.splitlines()
    assert lines[-2].startswith(f"ollama-generate: error: no Ollama server is left to work on ({one.url}: ")
    assert f"; {two.url}: " in lines[-2]
    assert lines[-1] == ("ollama-generate: hint: start the servers again and rerun the same command: "
                         "finished work is kept")
    assert sorted(p.name for p in dataset.glob("*.txt")) == ["a.txt", "b.txt"]
    assert_captions(dataset, ["a.png", "b.png"])
    assert leftovers(dataset) == []
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["interrupted"], report["written"], report["not_reached"]) == (True, 2, 4)
    assert all(host["dropped"] for host in report["hosts"])

    one.restart()
    two.restart()
    one.default_text = two.default_text = derived_answer
    before = (len(one.requests), len(two.requests))
    code, out, err = run(capsys, "caption", dataset, "--host", one.url, "--host", two.url, "--chunk", "2")
    assert code == 0
    rerun = one.requests[before[0]:] + two.requests[before[1]:]
    done = {tag_of((dataset / n).read_bytes()) for n in ["a.png", "b.png"]}
    described = [request_tag(r) for r in rerun if r.path == "/api/chat"]
    captioned = [request_tag(r) for r in rerun if r.path == "/api/generate" and r.body.get("prompt")]
    rest = sorted(tag_of((dataset / n).read_bytes()) for n in NAMES[2:])
    assert sorted(captioned) == rest and not done & set(captioned)
    assert sorted(described) == rest  # nothing of the second chunk had been described
    assert_captions(dataset, NAMES)


# -- faults --------------------------------------------------------------------------------------

PARTIAL = "A partial answer that is cut off somewhere in the middle of it"
BUSY = "server busy, please try again.  maximum pending requests exceeded"
FAULTS = {
    "reset": {"text": PARTIAL, "fault": "reset"},
    "eof": {"text": PARTIAL, "fault": "eof"},
    "drop": {"fault": "drop"},
    "busy": {"status": 503, "error": BUSY},
    "garbage": {"fault": "garbage"},
    "mid-stream": {"text": PARTIAL, "mid_stream": True},
    "stall": {"text": PARTIAL, "fault": "stall", "delay": 1.0},
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_fault_in_each_stage_is_retried(make_ollama, capsys, tmp_path, monkeypatch, fault):
    server = serve(make_ollama, monkeypatch)
    server.reply(endpoint="/api/chat", **FAULTS[fault])
    server.reply(endpoint="/api/generate", **FAULTS[fault])
    dataset = make_images(tmp_path / "set", NAMES[:3])
    code, out, _err = run(capsys, "caption", dataset, "--timeout", "0.3")
    assert (code, out) == (0, "")
    assert_captions(dataset, NAMES[:3])
    assert (len(chats(server)), len(caption_requests(server))) == (4, 4)
    assert request_tag(chats(server)[0]) == request_tag(chats(server)[1])  # the same image again
    assert cached_descriptions(dataset) == sorted(
        f"Picture {tag_of((dataset / n).read_bytes())} seen. {DESCRIPTION}" for n in NAMES[:3])
    assert leftovers(dataset) == []


def _reason(fault, url):
    """How each lasting fault is reported (the start of the reason)."""
    return {
        # A stream cut without its last chunk reads, to http.client, as an early end.
        "reset": (f"the answer from Ollama at {url} stopped before it was complete",
                  f"the connection to Ollama at {url} dropped ("),
        "eof": f"the answer from Ollama at {url} stopped before it was complete",
        "drop": f"the connection to Ollama at {url} dropped (",
        "busy": f"Ollama at {url} answered HTTP 503: {BUSY}",
        "garbage": f"Ollama at {url} sent something that is not JSON: '<html>oops</html>'",
        "mid-stream": "Ollama failed while answering: an error was encountered while running the model",
    }[fault]


@pytest.mark.parametrize("stage", ["vision", "text"])
@pytest.mark.parametrize("fault", [f for f in FAULTS if f != "stall"])
def test_a_lasting_fault_fails_one_image_and_a_rerun_finishes(make_ollama, capsys, tmp_path, monkeypatch,
                                                              fault, stage):
    server = serve(make_ollama, monkeypatch)
    for _ in range(og.RETRIES + 1):
        server.reply(endpoint="/api/chat" if stage == "vision" else "/api/generate", **FAULTS[fault])
    dataset = make_images(tmp_path / "set", NAMES[:3])
    code, out, err = run(capsys, "caption", dataset, "--report", tmp_path / "r.json")
    assert (code, out) == (1, "")
    assert sorted(p.name for p in dataset.glob("*.txt")) == ["b.txt", "c.txt"]
    assert_captions(dataset, ["b.png", "c.png"])
    assert leftovers(dataset) == []
    failed = json.loads((tmp_path / "r.json").read_text())["failed"]
    assert [f["image"] for f in failed] == ["a.png"]
    assert failed[0]["reason"].startswith(_reason(fault, server.url))
    assert failed[0]["reason"].endswith(f"(gave up after {og.RETRIES + 1} attempts)")
    assert f"Failed:\n  a.png: {failed[0]['reason']}\n" in err
    # Only whole descriptions are cached.
    assert set(cached_descriptions(dataset)) <= {
        f"Picture {tag_of((dataset / n).read_bytes())} seen. {DESCRIPTION}" for n in NAMES[:3]}

    before = len(server.requests)
    assert run(capsys, "caption", dataset)[0] == 0
    rerun = server.requests[before:]
    a = tag_of((dataset / "a.png").read_bytes())
    assert [request_tag(r) for r in rerun if r.path == "/api/chat"] == ([a] if stage == "vision" else [])
    assert [request_tag(r) for r in rerun if r.path == "/api/generate" and r.body.get("prompt")] == [a]
    assert_captions(dataset, NAMES[:3])


def test_a_server_that_keeps_stalling_stops_the_run_and_a_rerun_finishes(make_ollama, capsys, tmp_path,
                                                                         monkeypatch):
    server = serve(make_ollama, monkeypatch)
    for _ in range(og.RETRIES + 1):
        server.reply(endpoint="/api/generate", **FAULTS["stall"])
    dataset = make_images(tmp_path / "set", NAMES[:3])
    code, out, err = run(capsys, "caption", dataset, "--timeout", "0.3")
    assert (code, out) == (3, "")
    assert err.splitlines()[-2] == (
        f"ollama-generate: error: no Ollama server is left to work on ({server.url}: Ollama at {server.url} "
        "did not answer within 0.3 s (gave up after 4 attempts))")
    assert list(dataset.glob("*.txt")) == []
    assert leftovers(dataset) == []
    before = len(server.requests)
    assert run(capsys, "caption", dataset, "--timeout", "0.3")[0] == 0
    rerun = server.requests[before:]
    assert [r for r in rerun if r.path == "/api/chat"] == []
    assert len([r for r in rerun if r.path == "/api/generate" and r.body.get("prompt")]) == 3
    assert_captions(dataset, NAMES[:3])


@pytest.mark.parametrize("stage", ["vision", "text"])
def test_a_server_killed_mid_run_and_a_rerun_after_its_restart(make_ollama, capsys, tmp_path, monkeypatch,
                                                               stage):
    server = serve(make_ollama, monkeypatch, request_time=0.1)
    killer = Killer()
    path = "/api/chat" if stage == "vision" else "/api/generate"
    count = []

    def answer(rec):
        if rec.path == path and rec.body.get("messages", rec.body.get("prompt")):
            count.append(1)
            if len(count) == 2:
                killer.kill(server)
        return derived_answer(rec)

    server.default_text = answer
    names = NAMES[:4]
    dataset = make_images(tmp_path / "set", names)
    code, out, _err = run(capsys, "caption", dataset, "--report", tmp_path / "r.json")
    killer.join()
    assert (code, out) == (3, "")
    written = sorted(p.name for p in dataset.glob("*.txt"))
    assert written == ([] if stage == "vision" else ["a.txt"])
    assert leftovers(dataset) == []
    described = len(cached_descriptions(dataset))
    assert described == (1 if stage == "vision" else 4)
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["interrupted"], report["written"]) == (True, len(written))

    server.restart()
    server.default_text = derived_answer
    before = len(server.requests)
    assert run(capsys, "caption", dataset)[0] == 0
    rerun = server.requests[before:]
    assert len([r for r in rerun if r.path == "/api/chat"]) == 4 - described
    assert len([r for r in rerun if r.path == "/api/generate" and r.body.get("prompt")]) == 4 - len(written)
    assert_captions(dataset, names)
    assert leftovers(dataset) == []


def test_a_server_that_restarts_quickly_is_waited_for(make_ollama, capsys, tmp_path, monkeypatch):
    # Real backoff, shrunk: 0.05 + 0.1 + 0.2 + 0.4 + 0.8 + 1.6 s of patience, restart after ~0.3 s.
    monkeypatch.setattr(og, "BACKOFF_SECONDS", 0.05)
    server = serve(make_ollama, monkeypatch, request_time=0.1)
    restarted = threading.Event()
    crashed = []

    def crash_and_restart():
        server.kill()
        threading.Timer(0.3, lambda: (server.restart(), restarted.set())).start()

    def answer(rec):
        if rec.path == "/api/chat" and len(chats(server)) == 2 and not crashed:
            crashed.append(request_tag(rec))
            threading.Thread(target=crash_and_restart).start()
        return derived_answer(rec)

    server.default_text = answer
    dataset = make_images(tmp_path / "set", NAMES[:3])
    code, out, err = run(capsys, "caption", dataset)
    assert restarted.wait(10)
    assert (code, out) == (0, "")
    assert "warning" not in err
    assert_captions(dataset, NAMES[:3])
    # b's request was cut by the crash and asked again once the server was back.
    assert [request_tag(r) for r in chats(server)].count(crashed[0]) == 2


# -- memory --------------------------------------------------------------------------------------


def test_a_thousand_images_stay_under_100_mb(make_ollama, tmp_path):
    server = make_ollama(parallel=4)  # a server with 4 slots: --jobs auto settles on 4 (and a spare)
    # A training caption in range (50-150 words), so no image is asked twice.
    caption = " ".join(["A red fox stands in deep snow"] + [f"detail{n}" for n in range(50)]) + "."
    server.default_text = caption
    dataset = tmp_path / "big"
    dataset.mkdir()
    for n in range(1000):
        (dataset / f"img{n:04d}.png").write_bytes(png_bytes(seed=n))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OLLAMA_", "COV_CORE"))}
    env["OLLAMA_HOST"] = server.url
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        proc = subprocess.Popen([sys.executable, SCRIPT, "caption", str(dataset), "--quiet"], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        watchdog = threading.Timer(120, proc.kill)
        watchdog.start()
        try:
            _pid, status, usage = os.wait4(proc.pid, 0)  # this child's own peak, not any other's
        finally:
            watchdog.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
    assert (proc.returncode, (tmp_path / "out").read_bytes(), (tmp_path / "err").read_bytes()) == (0, b"", b"")
    assert usage.ru_maxrss < 100 * 1024  # KB on Linux
    assert len(list(dataset.glob("*.txt"))) == 1000
    assert (dataset / "img0999.txt").read_text() == caption + "\n"
    assert len(caption_requests(server)) == len(chats(server)) == 1000
