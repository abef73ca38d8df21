"""Folder runs: stage scheduling, keep-alive, --jobs, the description cache, progress, the report,
dataset options, dry runs and the manifest, against the fake server."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import sys
import zlib
from types import SimpleNamespace

import pytest
from cli import run, run_exit
from images import _png_chunk
from traced import (CACHE, DESCRIPTION, TAGS, TEXT, TRAINING, VISION, derived_answer, expected_caption,
                    make_images, tag_of)

import ollama_generate as og

# -- helpers -------------------------------------------------------------------------------------






def content_requests(fake):
    """Generation requests that ask for an answer (not the load/keep-alive requests)."""
    return [r for r in fake.generation_requests() if r.body.get("messages") or r.body.get("prompt")]


def chats(fake):
    return fake.requests_to("/api/chat")


def caption_prompts(fake):
    return [r for r in fake.requests_to("/api/generate") if r.body.get("prompt")]


def chat_tags(fake):
    return [tag_of(base64.b64decode(r.body["messages"][1]["images"][0])) for r in chats(fake)]


def tree(folder):
    """Every file under folder (relative, sorted), with its bytes."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                out[os.path.relpath(path, folder)] = handle.read()
    return dict(sorted(out.items()))


def cache_lines(folder):
    with open(os.path.join(folder, CACHE), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture
def fake(ollama):
    ollama.default_text = derived_answer
    return ollama


# -- stage batching ------------------------------------------------------------------------------


def test_one_chunk_loads_each_model_once(make_ollama, capsys, tmp_path, monkeypatch):
    server = make_ollama(max_loaded=1, load_cost=0.05)
    server.default_text = derived_answer
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    dataset = make_images(tmp_path / "set", ["a.png", "b.png", "c.png", "d.png"])
    code, out, _err = run(capsys, "caption", dataset)
    assert (code, out) == (0, "")
    assert server.loads == 2
    assert server.load_log == [VISION, TEXT]
    assert [r.path for r in content_requests(server)] == ["/api/chat"] * 4 + ["/api/generate"] * 4
    for name in "abcd":
        assert (dataset / f"{name}.txt").read_text() == expected_caption(dataset / f"{name}.png")


def test_chunk_1_alternates_and_loads_both_models_per_image(make_ollama, capsys, tmp_path, monkeypatch):
    server = make_ollama(max_loaded=1, load_cost=0.05)
    server.default_text = derived_answer
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    dataset = make_images(tmp_path / "set", ["a.png", "b.png", "c.png", "d.png"])
    assert run(capsys, "caption", dataset, "--chunk", "1")[0] == 0
    assert server.loads == 8
    assert server.load_log == [VISION, TEXT] * 4
    assert [r.path for r in content_requests(server)] == ["/api/chat", "/api/generate"] * 4


def test_chunk_2_over_5_images_runs_each_stage_per_chunk(make_ollama, capsys, tmp_path):
    # A server that holds one model at a time (one that holds both overlaps the stages, see
    # test_stages_overlap_from_the_second_chunk_on_a_server_that_holds_both).
    fake = make_ollama(max_loaded=1, load_cost=0.05)
    fake.default_text = derived_answer
    names = ["a.png", "b.png", "c.png", "d.png", "e.png"]
    dataset = make_images(tmp_path / "set", names)
    assert run(capsys, "caption", dataset, "--chunk", "2", "--host", fake.url)[0] == 0
    assert fake.loads == 6  # two per chunk
    chat, gen = "/api/chat", "/api/generate"
    assert [r.path for r in content_requests(fake)] == [chat, chat, gen, gen, chat, chat, gen, gen, chat, gen]
    # Each chunk is the next images in order, and its captions come from its own descriptions.
    tags = [tag_of((dataset / n).read_bytes()) for n in names]
    sent = []
    for r in content_requests(fake):
        if r.path == chat:
            sent.append(tag_of(base64.b64decode(r.body["messages"][1]["images"][0])))
        else:
            sent.append(re.search(r"Picture ([0-9a-f]{12}) seen", r.body["prompt"]).group(1))
    assert sent == [tags[0], tags[1], tags[0], tags[1], tags[2], tags[3], tags[2], tags[3], tags[4], tags[4]]


# -- keep_alive ----------------------------------------------------------------------------------


def test_default_run_keeps_models_loaded_then_hands_them_back(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    assert run(capsys, "caption", dataset)[0] == 0
    content = content_requests(fake)
    assert len(content) == 4
    assert [r.body["keep_alive"] for r in content] == [-1] * 4
    # After the work: ask /api/ps what is loaded, then give each of our models Ollama's 5 minutes.
    last = fake.requests[fake.requests.index(content[-1]) + 1:]
    assert [(r.method, r.path) for r in last] == [("GET", "/api/ps"), ("POST", "/api/generate"),
                                                 ("POST", "/api/generate")]
    assert sorted((r.body for r in last[1:]), key=lambda b: b["model"]) == [
        {"model": TEXT, "keep_alive": "5m", "stream": False},
        {"model": VISION, "keep_alive": "5m", "stream": False},
    ]


def test_only_models_still_loaded_are_handed_back(make_ollama, capsys, tmp_path, monkeypatch):
    server = make_ollama(max_loaded=1)
    server.default_text = derived_answer
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    dataset = make_images(tmp_path / "set", ["a.png"])
    assert run(capsys, "caption", dataset)[0] == 0
    releases = [r.body for r in server.requests_to("/api/generate") if not r.body.get("prompt")]
    assert releases == [{"model": TEXT, "keep_alive": "5m", "stream": False}]


@pytest.mark.parametrize(("value", "sent"), [("30m", "30m"), ("300", 300), ("-1", -1), ("1h30m", "1h30m"),
                                             ("2.5", 2.5)])
def test_keep_alive_flag_is_sent_and_nothing_is_handed_back(fake, capsys, tmp_path, value, sent):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    assert run(capsys, "caption", dataset, "--keep-alive", value)[0] == 0
    bodies = [r.body for r in fake.generation_requests()]
    assert len(bodies) == 4  # no hand-back request
    for body in bodies:
        assert body["keep_alive"] == sent
        assert type(body["keep_alive"]) is type(sent)
    # /api/ps is read once, before the chunk, to see whether both models are loaded (--stages
    # auto); a hand-back would read it again after the run.
    assert len(fake.requests_to("/api/ps")) == 1


@pytest.mark.parametrize("value", ["soon", "5 minutes", "", "30x", "m"])
def test_a_bad_keep_alive_is_a_usage_error(fake, capsys, tmp_path, value):
    dataset = make_images(tmp_path / "set", ["a.png"])
    code, out, err = run_exit(capsys, "caption", dataset, "--keep-alive", value)
    assert (code, out) == (2, "")
    assert err.splitlines() == [
        ("ollama-generate: error: argument --keep-alive: expected seconds (300, -1 for forever) or a "
        f"duration like 30m or 1h30m, got {value.strip()!r}"),
        "ollama-generate: hint: see `ollama-generate caption --help`",
    ]
    assert fake.requests == []


def test_single_images_and_text_commands_send_no_keep_alive(fake, capsys, tmp_path):
    make_images(tmp_path, ["a.png"])
    assert run(capsys, "caption", tmp_path / "a.png")[0] == 0
    assert run(capsys, "prompt", "a lighthouse")[0] == 0
    assert run(capsys, "lore", "a lighthouse", "--length", "short")[0] == 0
    bodies = [r.body for r in fake.generation_requests()]
    assert len(bodies) == 4
    assert [b for b in bodies if "keep_alive" in b] == []
    assert fake.requests_to("/api/ps") == []


def interrupt_first_caption(monkeypatch):
    """Make the first text-stage call raise KeyboardInterrupt, as Ctrl-C would."""
    real = og.write_caption
    fired = []

    def write_caption(*args, **kwargs):
        if not fired:
            fired.append(1)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(og, "write_caption", write_caption)


def test_an_interrupted_run_still_hands_the_models_back(fake, capsys, tmp_path, monkeypatch):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    interrupt_first_caption(monkeypatch)
    assert run(capsys, "caption", dataset)[0] == 130
    assert [r.body["keep_alive"] for r in content_requests(fake)] == [-1, -1]
    # Only the vision model was ever loaded (Ctrl-C came before the first text call),
    # so only it is handed back. (The first /api/ps is --stages auto's look before the chunk.)
    assert len(fake.requests_to("/api/ps")) == 2
    releases = [r.body for r in fake.requests_to("/api/generate") if not r.body.get("prompt")]
    assert releases == [{"model": VISION, "keep_alive": "5m", "stream": False}]


def test_ctrl_c_while_the_workers_start_stops_those_already_started(make_ollama, capsys, tmp_path,
                                                                    monkeypatch):
    import threading
    import time

    one = make_ollama(request_time=0.05)
    two = make_ollama(request_time=0.05)
    one.default_text = two.default_text = derived_answer
    dataset = make_images(tmp_path / "set", [f"{n}.png" for n in range(10)])
    lane = og.lane
    asked = []

    def interrupted_lane(host, stage, jobs):
        if threading.current_thread() is threading.main_thread():
            asked.append(host.client.host)
            if host.client.host == two.url:  # the first server's worker has started
                raise KeyboardInterrupt
        return lane(host, stage, jobs)

    monkeypatch.setattr(og, "lane", interrupted_lane)
    code = run(capsys, "caption", dataset, "--host", one.url, "--host", two.url, "--stages", "sequential")[0]
    assert code == 130 and asked == [one.url, two.url]
    time.sleep(0.5)
    assert len(one.requests_to("/api/chat")) <= 1  # the one on its way when Ctrl-C came, and no other


# -- --jobs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("jobs", [1, 3])
def test_jobs_sends_that_many_requests_at_once(make_ollama, capsys, tmp_path, monkeypatch, jobs):
    # The fake has a slot more than --jobs, so the count shows what the client sent, not the cap.
    server = make_ollama(parallel=4, request_time=0.1)
    server.default_text = derived_answer
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    names = [f"{n}.png" for n in "abcdefg"]
    dataset = make_images(tmp_path / "set", names)
    code, out, err = run(capsys, "caption", dataset, "--jobs", jobs)
    assert (code, out) == (0, "")
    assert server.max_concurrent_seen == jobs
    # Every image was described once, and each caption belongs to its own image.
    assert sorted(chat_tags(server)) == sorted(tag_of((dataset / n).read_bytes()) for n in names)
    for name in names:
        assert (dataset / name).with_suffix(".txt").read_text() == expected_caption(dataset / name)
    assert ": 7 written, 0 skipped, 0 failed (of 7 images)." in err
    assert sorted(line.split("] ", 1)[1] for line in err.splitlines() if line.startswith("[")) == [
        f"{n}: written" for n in names]


# -- the description cache -----------------------------------------------------------------------


def test_each_description_is_cached_the_moment_it_arrives(make_ollama, capsys, tmp_path, monkeypatch):
    server = make_ollama()
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    dataset = make_images(tmp_path / "set", ["a.png", "b.png", "c.png"])
    seen = []

    def answer(rec):
        with open(dataset / CACHE, "rb") as handle:
            seen.append((rec.path, handle.read().count(b"\n")))
        return derived_answer(rec)

    server.default_text = answer
    assert run(capsys, "caption", dataset)[0] == 0
    chat, gen = "/api/chat", "/api/generate"
    assert seen == [(chat, 0), (chat, 1), (chat, 2), (gen, 3), (gen, 3), (gen, 3)]
    lines = cache_lines(dataset)
    assert [(line["image"], line["model"], line["description"]) for line in lines] == [
        (n, VISION, f"Picture {tag_of((dataset / n).read_bytes())} seen. {DESCRIPTION}")
        for n in ["a.png", "b.png", "c.png"]]
    assert all(set(line) == {"key", "image", "model", "description"} for line in lines)
    assert len({line["key"] for line in lines}) == 3


def test_a_rerun_after_ctrl_c_asks_the_vision_model_nothing_again(fake, capsys, tmp_path, monkeypatch):
    names = ["a.png", "b.png", "c.png"]
    dataset = make_images(tmp_path / "set", names)
    interrupt_first_caption(monkeypatch)
    code, out, err = run(capsys, "caption", dataset, "--report", tmp_path / "r.json")
    assert (code, out) == (130, "")
    assert err.endswith("\nollama-generate: interrupted\n")
    assert ": 0 written, 0 skipped, 0 failed, 3 not reached (of 3 images)." in err
    assert [p.name for p in dataset.glob("*.txt")] == []
    assert len(cache_lines(dataset)) == 3
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["interrupted"], report["written"], report["not_reached"]) == (True, 0, 3)

    before = len(fake.requests)
    code, out, err = run(capsys, "caption", dataset)
    assert code == 0
    rerun = fake.requests[before:]
    assert [r for r in rerun if r.path == "/api/chat"] == []
    assert len([r for r in rerun if r.path == "/api/generate" and r.body.get("prompt")]) == 3
    assert err.splitlines()[-2].endswith("; 3 model calls, 3 descriptions from the cache, 0 model loads seen.")
    # All descriptions came from the cache: the speed line names the text stage only.
    assert err.splitlines()[-1].startswith(f"{fake.url}: text ") and "vision" not in err.splitlines()[-1]
    for name in names:
        assert (dataset / name).with_suffix(".txt").read_text() == expected_caption(dataset / name)


def test_restyling_a_captioned_folder_makes_only_text_calls(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    assert run(capsys, "caption", dataset)[0] == 0
    before = len(fake.requests)
    # The tags style gets an in-range tag list (structured: a JSON array), so no re-ask.
    fake.default_text = lambda rec: json.dumps(TAGS.split(", ")) if rec.body.get("format") else derived_answer(rec)
    code, _out, _err = run(capsys, "caption", dataset, "--overwrite", "--style", "tags", "--report",
                         tmp_path / "r.json")
    assert code == 0
    rerun = fake.requests[before:]
    assert [r.path for r in rerun if r.path == "/api/chat"] == []
    prompts = [r.body["prompt"] for r in rerun if r.path == "/api/generate" and r.body.get("prompt")]
    assert prompts == [
        og.render("caption_tags", description=f"Picture {tag_of((dataset / n).read_bytes())} seen. {DESCRIPTION}")
        + "\n/no_think" for n in ["a.png", "b.png"]]
    assert [(dataset / n).read_text() for n in ["a.txt", "b.txt"]] == [TAGS + "\n"] * 2
    assert json.loads((tmp_path / "r.json").read_text())["cached_descriptions"] == 2


def test_no_cache_asks_again_and_its_answers_win_next_time(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    answers = {"round": "one"}
    fake.default_text = lambda rec: (f"Round {answers['round']} view. {DESCRIPTION}" if rec.path == "/api/chat"
                                     else TRAINING)  # in range: one text request per image
    assert run(capsys, "caption", dataset)[0] == 0
    assert len(chats(fake)) == 2
    answers["round"] = "two"
    assert run(capsys, "caption", dataset, "--overwrite", "--no-cache")[0] == 0
    assert len(chats(fake)) == 4
    assert len(caption_prompts(fake)) == 4
    before = len(fake.requests)
    assert run(capsys, "caption", dataset, "--overwrite")[0] == 0
    rerun = fake.requests[before:]
    assert [r for r in rerun if r.path == "/api/chat"] == []
    prompts = [r.body["prompt"] for r in rerun if r.path == "/api/generate" and r.body.get("prompt")]
    assert len(prompts) == 2
    assert all("Round two view." in p and "Round one" not in p for p in prompts)


def test_a_torn_last_cache_line_is_ignored_and_ended(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    assert run(capsys, "caption", dataset)[0] == 0
    torn = b'{"key": "0123", "image": "x.png", "descr'
    with open(dataset / CACHE, "ab") as handle:
        handle.write(torn)
    make_images(dataset, ["c.png"])
    before = len(fake.requests)
    code, _out, _err = run(capsys, "caption", dataset)
    assert code == 0
    assert [tag_of(base64.b64decode(r.body["messages"][1]["images"][0]))
            for r in fake.requests[before:] if r.path == "/api/chat"] == [tag_of((dataset / "c.png").read_bytes())]
    assert (dataset / "c.txt").read_text() == expected_caption(dataset / "c.png")
    raw = (dataset / CACHE).read_bytes()
    assert raw.endswith(b"\n")
    lines = raw.split(b"\n")[:-1]
    assert lines[2] == torn
    assert [json.loads(line)["image"] for i, line in enumerate(lines) if i != 2] == ["a.png", "b.png", "c.png"]
    # The appended description is read back: no vision call at all now.
    before = len(fake.requests)
    assert run(capsys, "caption", dataset, "--overwrite")[0] == 0
    assert [r for r in fake.requests[before:] if r.path == "/api/chat"] == []


def test_another_vision_prompt_misses_the_cache(fake, capsys, tmp_path, monkeypatch):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    assert run(capsys, "caption", dataset)[0] == 0
    prompts = tmp_path / "prompts"
    shutil.copytree(os.path.join(os.path.dirname(og.__file__), "prompts"), prompts)
    (prompts / "vision_user.txt").write_text("Describe only the colours.\n", encoding="utf-8")
    monkeypatch.setattr(og, "template_dirs", lambda: [str(prompts)])
    before = len(fake.requests)
    assert run(capsys, "caption", dataset, "--overwrite")[0] == 0
    new_chats = [r for r in fake.requests[before:] if r.path == "/api/chat"]
    assert len(new_chats) == 2
    assert {r.body["messages"][1]["content"] for r in new_chats} == {"Describe only the colours.\n\n/no_think"}


def test_another_vision_model_misses_the_cache(fake, capsys, tmp_path):
    fake.add_model("llava:latest", capabilities=("completion", "vision"))
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    assert run(capsys, "caption", dataset)[0] == 0
    before = len(fake.requests)
    assert run(capsys, "caption", dataset, "--overwrite", "--vision-model", "llava")[0] == 0
    assert [r.body["model"] for r in fake.requests[before:] if r.path == "/api/chat"] == ["llava", "llava"]
    # ... and both models' descriptions are kept side by side.
    assert sorted(line["model"] for line in cache_lines(dataset)) == ["llava", "llava", VISION, VISION]


def test_a_renamed_image_keeps_its_description(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png"])
    assert run(capsys, "caption", dataset)[0] == 0
    (dataset / "a.png").rename(dataset / "z.png")
    before = len(fake.requests)
    assert run(capsys, "caption", dataset)[0] == 0
    assert [r for r in fake.requests[before:] if r.path == "/api/chat"] == []
    assert (dataset / "z.txt").read_text() == expected_caption(dataset / "z.png")


def test_cache_dir_moves_the_cache_out_of_the_dataset(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    cache = tmp_path / "cache"
    assert run(capsys, "caption", dataset, "--cache-dir", cache)[0] == 0
    assert sorted(os.listdir(dataset)) == ["a.png", "a.txt", "b.png", "b.txt"]
    assert [json.loads(line)["image"] for line in (cache / "descriptions.jsonl").read_text().splitlines()] == [
        "a.png", "b.png"]
    assert run(capsys, "caption", dataset, "--cache-dir", cache, "--overwrite")[0] == 0
    assert len(chats(fake)) == 2
    # The default place is another cache: it has nothing yet.
    assert run(capsys, "caption", dataset, "--overwrite")[0] == 0
    assert len(chats(fake)) == 4


# -- progress ------------------------------------------------------------------------------------


def test_a_log_gets_one_line_per_image(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png", "bad.png", "c.png"])
    (dataset / "b.txt").write_text("kept\n")
    code, out, err = run(capsys, "caption", dataset)
    assert (code, out) == (1, "")
    assert err.splitlines()[:4] == [
        "Skipping 1 image that already has a caption (--overwrite redoes them).",
        "[1/3] bad.png: failed: the file is empty",
        "[2/3] a.png: written",
        "[3/3] c.png: written",
    ]
    assert "\r" not in err and "\x1b" not in err


def test_quiet_prints_nothing_on_success(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    (dataset / "b.txt").write_text("kept\n")
    assert run(capsys, "caption", dataset, "--quiet") == (0, "", "")
    assert (dataset / "a.txt").read_text() == expected_caption(dataset / "a.png")
    assert run(capsys, "caption", dataset, "-q", "--overwrite") == (0, "", "")


def test_quiet_still_lists_failures(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "bad.png"])
    code, out, err = run(capsys, "caption", dataset, "--quiet")
    assert (code, out) == (1, "")
    lines = err.splitlines()
    assert re.fullmatch(r"Done after \d+\.\ds: 1 written, 0 skipped, 1 failed \(of 2 images\)\.", lines[0])
    assert re.fullmatch(r"\d+\.\d images/min; 2 model calls, 0 descriptions from the cache, "
                        r"0 model loads seen\.", lines[1])
    assert lines[2:] == [
        "Failed:",
        "  bad.png: the file is empty",
        "ollama-generate: error: 1 of 2 images failed",
        "ollama-generate: hint: fix or remove them and run the same command again; finished captions are kept",
    ]


def test_a_terminal_gets_one_live_line(fake, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    dataset = make_images(tmp_path / "set", ["a.png", "b.png", "c.png"])
    code, out, err = run(capsys, "caption", dataset)
    assert (code, out) == (0, "")
    parts = err.split("\r\x1b[K")
    assert parts[0] == ""
    assert parts[1] == "vision 0/3 | 0 written, 0 skipped, 0 failed of 3 | 0.0 written/min | ETA ?"
    assert any(p.startswith("text 0/3 | 0 written, 0 skipped, 0 failed of 3 | ") for p in parts)
    # The live line is cleared before the summary, and no per-image lines are printed.
    assert parts[-1].startswith("Done after ")
    assert all("\n" not in p for p in parts[:-1])
    assert "[1/3]" not in err
    assert (dataset / "c.txt").read_text() == expected_caption(dataset / "c.png")


def test_the_live_line_fits_a_narrow_terminal(fake, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "30")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    code, out, err = run(capsys, "caption", dataset)
    assert (code, out) == (0, "")
    parts = err.split("\r\x1b[K")[1:-1]
    assert parts and parts[0] == "vision 0/2 | 0 written, 0 ski"
    assert all(len(p) <= 29 for p in parts)


def test_progress_line_text(monkeypatch, capsys):
    clock = SimpleNamespace(now=1000.0)
    monkeypatch.setattr(og, "time", SimpleNamespace(monotonic=lambda: clock.now))
    progress = og.Progress(4, mode="lines")
    progress.stage("vision", 4)
    assert progress.line() == "vision 0/4 | 0 written, 0 skipped, 0 failed of 4 | 0.0 written/min | ETA ?"
    a = og.Job("set/a.png", "a.png", "set/a.txt", status="described")
    b = og.Job("set/b.png", "b.png", "set/b.txt", status="skipped", reason="caption appeared")
    c = og.Job("set/c.png", "c.png", "set/c.txt", status="failed", reason="the file is empty")
    d = og.Job("set/d.png", "d.png", "set/d.txt", status="described")
    clock.now = 1060.0
    progress.advance(a)
    progress.advance(b)  # finished in the vision stage: its text step counts as done too
    # 3 of 8 steps in a minute: 5 steps (100 s) to go, and nothing written yet.
    assert progress.line() == "vision 2/4 | 0 written, 1 skipped, 0 failed of 4 | 0.0 written/min | ETA 1m 40s"
    progress.advance(c)
    progress.advance(d)
    progress.stage("text", 2)
    a.status = d.status = "written"
    clock.now = 1210.0
    progress.advance(a)
    # 7 of 8 steps in 210 s: one step (30 s) to go; one caption written in 3.5 minutes.
    assert progress.line() == "text 1/2 | 1 written, 1 skipped, 1 failed of 4 | 0.3 written/min | ETA 30.0s"
    clock.now = 1240.0
    progress.advance(d)
    assert progress.line() == "text 2/2 | 2 written, 1 skipped, 1 failed of 4 | 0.5 written/min | ETA 0.0s"
    assert capsys.readouterr().err.splitlines() == [
        "[1/4] b.png: skipped (caption appeared)",
        "[2/4] c.png: failed: the file is empty",
        "[3/4] a.png: written",
        "[4/4] d.png: written",
    ]


# -- summary and --report ------------------------------------------------------------------------


def test_summary_counts_model_loads_seen(make_ollama, capsys, tmp_path, monkeypatch):
    server = make_ollama(load_cost=0.6)
    server.default_text = derived_answer
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    code, _out, err = run(capsys, "caption", dataset, "--report", tmp_path / "r.json")
    assert code == 0
    assert server.loads == 2
    assert err.splitlines()[-2].endswith("; 4 model calls, 0 descriptions from the cache, 2 model loads seen.")
    assert re.search(r"; stages one after the other; [\d.]+s waiting for model loads\.$", err.splitlines()[-1])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model_loads"] == 2
    assert report["hosts"][0]["model_loads"] == 2


def test_report_file_pins_every_key(make_ollama, capsys, tmp_path, monkeypatch):
    server = make_ollama(request_time=0.02)
    server.default_text = derived_answer
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    dataset = make_images(tmp_path / "set", ["a.png", "b.png", "bad.png", "d.png"])
    (dataset / "d.txt").write_text("kept\n")
    report_file = tmp_path / "run.json"
    code, out, err = run(capsys, "caption", dataset, "--report", report_file)
    assert (code, out) == (1, "")
    text = report_file.read_text(encoding="utf-8")
    assert text.endswith("\n")
    report = json.loads(text)
    assert list(report) == ["folder", "total", "written", "skipped", "failed", "needs_review", "not_reached", "later",
                            "interrupted", "seconds", "images_per_minute", "cached_descriptions",
                            "model_calls", "model_loads", "hosts", "throughput", "cleaning", "captions"]
    seconds, per_minute = report.pop("seconds"), report.pop("images_per_minute")
    stages = report["throughput"][0]["stages"]
    speeds = {name: stage.pop("images_per_minute") for name, stage in stages.items()}
    assert report == {
        "folder": str(dataset),
        "total": 4,
        "written": 2,
        "skipped": 1,
        "failed": [{"image": "bad.png", "reason": "the file is empty"}],
        "needs_review": [],
        "not_reached": 0,
        "later": 0,
        "interrupted": False,
        "cached_descriptions": 0,
        "model_calls": 4,
        "model_loads": 0,
        "hosts": [{"url": server.url, "model_calls": 4, "model_loads": 0, "dropped": None, "api": "ollama", "not_reported": []}],
        # Per stage: the images that asked the model (bad.png failed before), the requests at once.
        "throughput": [{"url": server.url, "overlapped": False, "load_wait_seconds": 0.0, "stages": {
            "vision": {"model": VISION, "images": 2, "jobs": 1, "in_flight": 1, "auto": True},
            "text": {"model": TEXT, "images": 2, "jobs": 1, "in_flight": 1, "auto": True}}}],
        # Nothing was cleaned away or flagged, and every concrete word of each caption is in its description.
        "cleaning": {},
        "captions": [{"image": n, "rules": [], "unsupported_share": 0.0, "invented": []} for n in ["a.png", "b.png"]],
    }
    assert isinstance(seconds, float) and seconds > 0
    assert per_minute == pytest.approx(2 * 60 / seconds, rel=0.05)
    assert all(speed > per_minute for speed in speeds.values())  # each stage ran only part of the time
    # The summary on stderr says the same.
    assert ": 2 written, 1 skipped, 1 failed (of 4 images)." in err
    assert "Failed:\n  bad.png: the file is empty\n" in err

    # A second run: everything left is skipped or still failing, nothing asked again.
    assert run(capsys, "caption", dataset, "--report", report_file)[0] == 1
    again = json.loads(report_file.read_text())
    assert (again["written"], again["skipped"], again["model_calls"], again["cached_descriptions"]) == (0, 3, 0, 0)


# -- dataset options -----------------------------------------------------------------------------


def test_recursive_enters_subfolders_but_not_hidden_or_linked_ones(fake, capsys, tmp_path):
    outside = make_images(tmp_path / "outside", ["o.png"])
    dataset = make_images(tmp_path / "set", ["a.png", "sub/b.png", "sub/deeper/c.png", ".hidden/h.png",
                                             ".ollama-generate/x.png"])
    (dataset / "link").symlink_to(outside, target_is_directory=True)
    (dataset / "sub" / "loop").symlink_to(dataset, target_is_directory=True)
    code, out, err = run(capsys, "caption", dataset, "--recursive")
    assert (code, out) == (0, "")
    assert err.splitlines()[:3] == ["[1/3] a.png: written", "[2/3] sub/b.png: written",
                                    "[3/3] sub/deeper/c.png: written"]
    assert sorted(chat_tags(fake)) == sorted(
        tag_of((dataset / n).read_bytes()) for n in ["a.png", "sub/b.png", "sub/deeper/c.png"])
    for name in ["a", "sub/b", "sub/deeper/c"]:
        assert (dataset / f"{name}.txt").read_text() == expected_caption(dataset / f"{name}.png")
    assert os.listdir(outside) == ["o.png"]
    assert os.listdir(dataset / ".hidden") == ["h.png"]
    # Without --recursive only the top folder.
    assert run(capsys, "caption", dataset, "--overwrite", "--no-cache")[0] == 0
    assert len(chats(fake)) == 4


def test_a_folder_with_images_only_in_subfolders_hints_recursive(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["sub/a.png"])
    code, out, err = run(capsys, "caption", dataset)
    assert (code, out) == (2, "")
    assert err == (f"ollama-generate: error: {dataset} has no images (.png, .jpg, .jpeg, .webp, .bmp, .gif, .mp4, .webm, .mov, .mkv, .avi); "
                   "--recursive looks in subfolders\n")
    assert fake.requests == []


@pytest.mark.parametrize("ext", [".caption", "caption"])
def test_ext_names_the_caption_files(fake, capsys, tmp_path, ext):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png"])
    (dataset / "b.caption").write_text("kept\n")
    (dataset / "a.txt").write_text("a .txt file is not a .caption file\n")
    code, out, _err = run(capsys, "caption", dataset, "--ext", ext)
    assert (code, out) == (0, "")
    assert (dataset / "a.caption").read_text() == expected_caption(dataset / "a.png")
    assert (dataset / "b.caption").read_text() == "kept\n"
    assert not (dataset / "b.txt").exists()
    assert len(chats(fake)) == 1


@pytest.mark.parametrize("ext", [".png", "", "png", ".JPG", "a/b"])
def test_ext_that_is_no_caption_extension_is_refused(fake, capsys, tmp_path, ext):
    dataset = make_images(tmp_path / "set", ["a.png"])
    code, out, err = run(capsys, "caption", dataset, "--ext", ext)
    assert (code, out) == (2, "")
    assert err.splitlines() == [f"ollama-generate: error: --ext {ext!r} is not a caption extension",
                                "ollama-generate: hint: use .txt (the default) or .caption"]
    assert fake.requests == []
    assert os.listdir(dataset) == ["a.png"]


def test_output_dir_mirrors_the_tree_and_is_where_skips_are_checked(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "sub/b.png", "sub/c.png"])
    (dataset / "a.txt").write_text("a caption beside the image does not count\n")
    out_dir = tmp_path / "captions"
    (out_dir / "sub").mkdir(parents=True)
    (out_dir / "sub" / "c.txt").write_text("kept\n")
    before = tree(dataset)
    code, out, err = run(capsys, "caption", dataset, "--recursive", "--output-dir", out_dir)
    assert (code, out) == (0, "")
    assert tree(dataset) == before
    assert (out_dir / "a.txt").read_text() == expected_caption(dataset / "a.png")
    assert (out_dir / "sub" / "b.txt").read_text() == expected_caption(dataset / "sub" / "b.png")
    assert (out_dir / "sub" / "c.txt").read_text() == "kept\n"
    assert ": 2 written, 1 skipped, 0 failed (of 3 images)." in err
    assert len(chats(fake)) == 2
    assert run(capsys, "caption", dataset, "-r", "--output-dir", out_dir)[0] == 0
    assert len(chats(fake)) == 2


def test_limit_captions_the_first_n_that_need_one(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png", "c.png", "d.png", "e.png"])
    (dataset / "b.txt").write_text("kept\n")
    code, out, err = run(capsys, "caption", dataset, "--limit", "2", "--report", tmp_path / "r.json")
    assert (code, out) == (0, "")
    assert sorted(p.name for p in dataset.glob("*.txt")) == ["a.txt", "b.txt", "c.txt"]
    assert (dataset / "c.txt").read_text() == expected_caption(dataset / "c.png")
    lines = err.splitlines()
    assert lines[1:3] == ["[1/2] a.png: written", "[2/2] c.png: written"]
    assert lines[3].endswith(": 2 written, 1 skipped, 0 failed, 2 left for later (of 5 images).")
    assert len(chats(fake)) == 2
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["written"], report["skipped"], report["later"], report["not_reached"]) == (2, 1, 2, 0)
    # The next run does the rest.
    assert run(capsys, "caption", dataset, "--limit", "5")[0] == 0
    assert sorted(p.name for p in dataset.glob("*.txt")) == ["a.txt", "b.txt", "c.txt", "d.txt", "e.txt"]


def test_dry_run_lists_the_plan_and_calls_nothing(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "b.png", "bad.png", "d.png", "e.png", "f.png"])
    (dataset / "b.txt").write_text("kept\n")
    before = tree(dataset)
    code, out, err = run(capsys, "caption", dataset, "--dry-run", "--limit", "2")
    assert code == 0
    assert out.splitlines() == [
        f"caption: a.png (2x2) -> {dataset / 'a.txt'}",
        "skip: b.png (caption exists)",
        "fail: bad.png (the file is empty)",
        f"caption: d.png (2x2) -> {dataset / 'd.txt'}",
        "later: e.png (beyond --limit 2)",
        "later: f.png (beyond --limit 2)",
    ]
    assert err == ("Dry run: 2 to caption, 1 skipped, 1 failing, 2 left for later (of 6 images); "
                   "no model was called.\n")
    assert fake.requests == []
    assert tree(dataset) == before


def test_dry_run_needs_no_server_and_shows_the_output_dir(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")
    dataset = make_images(tmp_path / "set", ["sub/a.png"])
    code, out, _err = run(capsys, "caption", dataset, "--dry-run", "-r", "--output-dir", tmp_path / "o",
                         "--ext", "caption")
    assert (code, out) == (0, f"caption: sub/a.png (2x2) -> {tmp_path / 'o' / 'sub' / 'a.caption'}\n")
    assert not (tmp_path / "o").exists()


def test_a_dry_run_predicts_what_the_run_does(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a_bad.png", "b.png", "c.png"])
    code, out, err = run(capsys, "caption", dataset, "--dry-run", "--limit", "1")
    assert code == 0
    plan = {verb: sorted(line.split(": ", 1)[1].split(" ")[0] for line in out.splitlines()
                         if line.startswith(verb + ": ")) for verb in ("caption", "later", "fail")}
    assert plan["caption"] == ["b.png"]  # what the user is told
    _code, _out, err = run(capsys, "caption", dataset, "--limit", "1")
    written = sorted(p.name.replace(".txt", ".png") for p in dataset.glob("*.txt"))
    assert written == plan["caption"]
    assert f", {len(plan['later'])} left for later (of 3 images)." in err


def test_manifest_lists_every_captioned_image(fake, capsys, tmp_path):
    dataset = make_images(tmp_path / "set", ["a.png", "bad.png", "sub/b.png", "sub/c.png"])
    (dataset / "sub" / "b.txt").write_text("café, ☕ latte art\n", encoding="utf-8")
    manifest = dataset / "metadata.jsonl"
    code, out, _err = run(capsys, "caption", dataset, "-r", "--manifest", manifest)
    assert (code, out) == (1, "")  # bad.png failed; the manifest is written all the same
    raw = manifest.read_bytes()
    assert "café, ☕".encode() in raw
    assert [json.loads(line) for line in raw.decode("utf-8").splitlines()] == [
        {"file_name": "a.png", "text": expected_caption(dataset / "a.png").strip()},
        {"file_name": "sub/b.png", "text": "café, ☕ latte art"},
        {"file_name": "sub/c.png", "text": expected_caption(dataset / "sub" / "c.png").strip()},
    ]
    # Elsewhere it would hold ../set/a.png names, which Hugging Face datasets refuses: see test_outputs.py.


@pytest.mark.parametrize("argv", [["--recursive"], ["-r"], ["--output-dir", "out"], ["--limit", "1"],
                                  ["--dry-run"], ["--manifest", "m.jsonl"], ["--report", "r.json"]])
def test_folder_only_flags_on_a_single_file(fake, capsys, tmp_path, argv):
    photo = make_images(tmp_path, ["a.png"]) / "a.png"
    code, out, err = run(capsys, "caption", photo, *argv)
    flag = "--recursive" if argv[0] == "-r" else argv[0]
    assert (code, out, err) == (2, "", f"ollama-generate: error: {flag} works on a folder, and {photo} is a file\n")
    assert fake.requests == []
    assert os.listdir(tmp_path) == ["a.png"]


def test_cache_flags_work_on_a_single_image(fake, capsys, tmp_path):
    photo = make_images(tmp_path / "set", ["a.png"]) / "a.png"
    cache = tmp_path / "cache"
    assert run(capsys, "caption", photo, "--cache-dir", cache) == (0, expected_caption(photo), "")
    # The description went to --cache-dir, nothing (no cache folder, no caption file) beside the image.
    assert os.listdir(photo.parent) == ["a.png"]
    [line] = [json.loads(line) for line in (cache / "descriptions.jsonl").read_text().splitlines()]
    assert (line["image"], line["model"]) == ("a.png", VISION)
    assert len(chats(fake)) == 1
    # Again with the same cache: no vision call; with --no-cache: the vision model is asked again.
    assert run(capsys, "caption", photo, "--cache-dir", cache) == (0, expected_caption(photo), "")
    assert len(chats(fake)) == 1
    assert run(capsys, "caption", photo, "--cache-dir", cache, "--no-cache") == (0, expected_caption(photo), "")
    assert len(chats(fake)) == 2
    assert len(caption_prompts(fake)) == 3


def test_a_single_image_uses_the_cache_beside_it(fake, capsys, tmp_path):
    photo = make_images(tmp_path / "set", ["a.png"]) / "a.png"
    for _ in range(2):
        assert run(capsys, "caption", photo) == (0, expected_caption(photo), "")
    assert sorted(os.listdir(photo.parent)) == [".ollama-generate", "a.png"]  # no caption file
    assert [line["image"] for line in cache_lines(photo.parent)] == ["a.png"]
    assert len(chats(fake)) == 1 and len(caption_prompts(fake)) == 2
    assert run(capsys, "caption", photo, "--no-cache") == (0, expected_caption(photo), "")
    assert len(chats(fake)) == 2


@pytest.mark.parametrize("flag", ["--cache-dir", "--output-dir"])
def test_an_unusable_folder_flag_is_a_clear_error(fake, capsys, tmp_path, flag):
    dataset = make_images(tmp_path / "set", ["a.png"])
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder\n")
    code, out, err = run(capsys, "caption", dataset, flag, blocker)
    assert "internal error" not in err
    assert str(blocker) in err
    assert (code, out) == (2, "")
    assert fake.generation_requests() == []


@pytest.mark.parametrize("flag", ["--report", "--manifest"])
def test_report_into_a_missing_folder_is_written_or_refused_up_front(fake, capsys, tmp_path, flag):
    dataset = make_images(tmp_path / "set", ["a.png"])
    target = tmp_path / "missing" / "out.json"
    code, _out, err = run(capsys, "caption", dataset, flag, target)
    assert "internal error" not in err
    assert (code == 0 and target.exists()) or (code == 2 and fake.generation_requests() == [])


def test_requests_waiting_for_the_same_load_count_it_once(make_ollama, capsys, tmp_path):
    server = make_ollama(max_loaded=1, load_cost=0.6, parallel=4)
    dataset = make_images(tmp_path / "set", [f"{n}.png" for n in range(4)])
    report = tmp_path / "run.json"
    code = run(capsys, "caption", dataset, "--host", server.url, "--jobs", "4", "--report", report)[0]
    assert code == 0
    assert server.loads == 2
    assert json.loads(report.read_text())["model_loads"] == 2


def test_load_waits_of_two_models_at_once_count_their_wall_time_once(make_ollama, capsys, tmp_path):
    # Stages forced to overlap on a server that holds one model: a description request waits
    # through the caption model's load and then its own, while a caption request waits for the first.
    server = make_ollama(max_loaded=1, load_cost=0.6)
    server.default_text = derived_answer
    dataset = make_images(tmp_path / "set", ["a.png", "b.png", "c.png"])
    code, out, _err = run(capsys, "caption", dataset, "--host", server.url, "--stages", "overlap", "--json")
    assert code == 0
    report = json.loads(out)
    assert server.loads >= 3
    assert 0.6 * server.loads - 0.3 <= report["throughput"][0]["load_wait_seconds"] <= report["seconds"]


# -- runner options ------------------------------------------------------------------------------


@pytest.mark.parametrize(("version", "shift"), [("0.12.6", [False]), ("0.12.5", [None]), ("0.0.0", [False])])
def test_shift_false_goes_on_every_generation_where_the_server_knows_it(make_ollama, capsys, tmp_path,
                                                                      version, shift):
    server = make_ollama(version=version, max_loaded=1, load_cost=0.05)
    server.default_text = derived_answer
    dataset = make_images(tmp_path / "set", ["a.png", "b.png", "c.png"])
    assert run(capsys, "caption", dataset, "--host", server.url, "--jobs", "2")[0] == 0
    assert sorted({r.body.get("shift") for r in content_requests(server)}, key=str) == shift
    assert server.loads == 2  # one runner per model: the shift setting never changed within the run


# -- --stages: overlapped stages on servers that hold both models ---------------------------------


def two_gpus(make_ollama, **settings):
    """A server whose vision and text models are both resident, each with its own slot."""
    server = make_ollama(max_loaded=2, parallel=1, load_cost=0.6, **settings)
    server.default_text = derived_answer
    return server


def interleaved(server):
    """Whether a caption request went out before the last description request."""
    paths = [r.path for r in content_requests(server)]
    return paths.index("/api/generate") < len(paths) - 1 - paths[::-1].index("/api/chat")


def test_stages_overlap_when_forced_and_each_model_loads_once(make_ollama, capsys, tmp_path):
    server = two_gpus(make_ollama, request_time=0.1)  # the vision stage outlasts the text model's load
    names = [f"{n:02}.png" for n in range(12)]
    dataset = make_images(tmp_path / "set", names)
    code, out, err = run(capsys, "caption", dataset, "--host", server.url, "--stages", "overlap",
                         "--report", tmp_path / "r.json")
    assert (code, out) == (0, "")
    assert interleaved(server) and server.max_concurrent_seen == 2  # both models answered at once
    assert server.loads == 2 and server.requests_to("/api/ps") != []  # (the hand-back's)
    for name in names:
        assert (dataset / name).with_suffix(".txt").read_text() == expected_caption(dataset / name)
    throughput = json.loads((tmp_path / "r.json").read_text())["throughput"][0]
    assert throughput["overlapped"] is True and throughput["load_wait_seconds"] >= 1.2  # two loads of 0.6 s
    assert {name: stage["images"] for name, stage in throughput["stages"].items()} == {
        "vision": 12, "text": 12}
    assert f"{server.url}: vision " in err and "; stages overlapped; " in err


def test_stages_overlap_from_the_second_chunk_on_a_server_that_holds_both(make_ollama, capsys, tmp_path):
    server = two_gpus(make_ollama, request_time=0.05)
    dataset = make_images(tmp_path / "set", [f"{n}.png" for n in "abcdef"])
    assert run(capsys, "caption", dataset, "--host", server.url, "--chunk", "3", "--jobs", "1")[0] == 0
    paths = [r.path for r in content_requests(server)]
    # The first chunk is stage-batched; after its first caption /api/ps showed both models loaded.
    assert paths[:4] == ["/api/chat"] * 3 + ["/api/generate"]
    assert server.loads == 2 and sorted(paths) == ["/api/chat"] * 6 + ["/api/generate"] * 6
    second = [r.path for r in content_requests(server)[6:]]
    assert second[0] == "/api/chat" and second.index("/api/generate") < 3  # before the last description


def test_auto_stages_stay_apart_on_a_server_that_holds_one_model(make_ollama, capsys, tmp_path):
    server = make_ollama(max_loaded=1, load_cost=0.6)
    server.default_text = derived_answer
    dataset = make_images(tmp_path / "set", [f"{n}.png" for n in "abcdef"])
    assert run(capsys, "caption", dataset, "--host", server.url, "--chunk", "3",
               "--report", tmp_path / "r.json")[0] == 0
    assert server.loads == 4  # two per chunk, as before --stages
    chat, gen = "/api/chat", "/api/generate"
    assert [r.path for r in content_requests(server)] == ([chat] * 3 + [gen] * 3) * 2
    assert json.loads((tmp_path / "r.json").read_text())["throughput"][0]["overlapped"] is False


def test_a_warm_server_that_holds_both_overlaps_from_the_start(make_ollama, capsys, tmp_path):
    server = two_gpus(make_ollama, request_time=0.05)
    client = og.OllamaClient(server.url)
    for model in (VISION, TEXT):  # loaded by an earlier run
        client.generate(model, "warm up", options={"num_ctx": og.NUM_CTX}, keep_alive=-1)
    dataset = make_images(tmp_path / "set", [f"{n}.png" for n in "abcd"])
    assert run(capsys, "caption", dataset, "--host", server.url)[0] == 0
    assert interleaved(server) and server.loads == 2


def test_sequential_stages_never_overlap_nor_look(make_ollama, capsys, tmp_path):
    server = two_gpus(make_ollama)
    dataset = make_images(tmp_path / "set", [f"{n}.png" for n in "abcdef"])
    assert run(capsys, "caption", dataset, "--host", server.url, "--chunk", "3",
               "--stages", "sequential")[0] == 0
    chat, gen = "/api/chat", "/api/generate"
    assert [r.path for r in content_requests(server)] == ([chat] * 3 + [gen] * 3) * 2
    assert len(server.requests_to("/api/ps")) == 1  # only the hand-back's


def test_one_model_for_both_stages_keeps_one_num_ctx_and_loads_once(make_ollama, capsys, tmp_path):
    # A vision model that also writes the captions: the vision stage's num_ctx (sized for a large
    # image) is the text stage's too, or every switch between the stages would reload it.
    server = make_ollama(max_loaded=1, load_cost=0.05, models={
        VISION: {"capabilities": ("completion", "vision"), "family": "someday-vl", "context_length": 262144}})
    server.default_text = derived_answer
    dataset = make_images(tmp_path / "set", [f"{n}.png" for n in "abcde"])
    # Only its header is read here (--max-side 0 sends it as it is): a large picture's pixels would
    # raise this process's peak memory, which a child started later inherits as its own peak.
    ihdr = struct.pack(">IIBBBBB", 2800, 2800, 8, 2, 0, 0, 0)
    (dataset / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                                      + _png_chunk(b"IDAT", zlib.compress(b"")) + _png_chunk(b"IEND", b""))
    for stages in ("sequential", "overlap"):
        code = run(capsys, "caption", dataset, "--host", server.url, "--model", VISION, "--vision-model",
                   VISION, "--max-side", "0", "--chunk", "3", "--stages", stages, "--overwrite")[0]
        assert code == 0
    contexts = {r.body["options"]["num_ctx"] for r in content_requests(server)}
    assert len(contexts) == 1 and contexts.pop() > og.NUM_CTX
    assert server.loads == 1


# -- --jobs auto ---------------------------------------------------------------------------------


def test_jobs_auto_finds_one_for_a_serial_vision_model_and_the_text_slots(make_ollama, capsys, tmp_path):
    # qwen3-vl runs one request at a time whatever the slots; the text model has 4. Requests are
    # long next to the client's turnaround (a false rise needs a turnaround over 1.3x a request),
    # so a loaded machine does not fake a gain from queueing past the slots.
    server = make_ollama(max_loaded=1, load_cost=0.6, parallel=4, request_time={VISION: 0.15, TEXT: 0.3})
    server.default_text = derived_answer
    dataset = make_images(tmp_path / "set", [f"{n:02}.png" for n in range(30)])
    code, out, err = run(capsys, "caption", dataset, "--host", server.url, "--jobs", "auto",
                         "--report", tmp_path / "r.json")
    assert (code, out) == (0, "")
    assert server.loads == 2  # learning stays within each stage
    assert server.max_concurrent_by_model == {VISION: 1, TEXT: 4}
    # It tried one more than the vision model takes, and twice the text model's slots, then settled.
    assert server.max_in_flight_by_model == {VISION: 2, TEXT: 8}
    stages = json.loads((tmp_path / "r.json").read_text())["throughput"][0]["stages"]
    assert {name: (stage["jobs"], stage["auto"]) for name, stage in stages.items()} == {
        "vision": (1, True), "text": (4, True)}
    assert {name: stage["in_flight"] for name, stage in stages.items()} == {"vision": 2, "text": 5}
    assert "(1 at once, learned; 2 in flight)" in err and "(4 at once, learned; 5 in flight)" in err


def test_jobs_auto_keeps_a_spare_request_in_flight_once_it_has_learned_the_slots(make_ollama, capsys, tmp_path):
    # Once settled, one request more than the slots waits at the server, so a slot that frees never
    # waits for the client; the learned limit stays the slot count, and the spare causes no load.
    server = make_ollama(max_loaded=1, load_cost=0.6, parallel=4, request_time={VISION: 0.15, TEXT: 0.3})
    server.default_text = derived_answer
    dataset = make_images(tmp_path / "set", [f"{n:02}.png" for n in range(60)])
    code, out, _err = run(capsys, "caption", dataset, "--host", server.url, "--jobs", "auto",
                          "--stages", "sequential", "--report", tmp_path / "r.json")
    assert (code, out) == (0, "")
    assert server.loads == 2
    assert server.max_concurrent_by_model == {VISION: 1, TEXT: 4}
    stages = json.loads((tmp_path / "r.json").read_text())["throughput"][0]["stages"]
    assert {name: (stage["jobs"], stage["in_flight"]) for name, stage in stages.items()} == {
        "vision": (1, 2), "text": (4, 5)}
    # Once settled, requests arrived with up to the learned limit plus the spare in flight (the
    # spare waits at the server; how many are in flight at one arrival depends on answers the
    # client has not yet turned around, so only the most is checked).
    log = server.in_flight_log_by_model
    assert log[VISION][-10:] == [2] * 10 and max(log[TEXT][-20:]) == 5


def test_jobs_auto_backs_off_when_the_server_is_busy(make_ollama, capsys, tmp_path):
    server = make_ollama(parallel=4, serial_families=(), request_time=0.02)
    server.default_text = derived_answer
    busy = "server busy, please try again.  maximum pending requests exceeded"
    for _ in range(2):  # the first caption request meets a full queue twice, then gets through
        server.reply(status=503, error=busy, endpoint="/api/generate")
    names = [f"{n:02}.png" for n in range(12)]
    dataset = make_images(tmp_path / "set", names)
    code, out, _err = run(capsys, "caption", dataset, "--host", server.url, "--jobs", "auto",
                          "--report", tmp_path / "r.json")
    assert (code, out) == (0, "")
    for name in names:
        assert (dataset / name).with_suffix(".txt").read_text() == expected_caption(dataset / name)
    # The text stage met "server busy" at its first request: it stopped raising its requests at once.
    assert server.max_in_flight_by_model[TEXT] == 1
    stages = json.loads((tmp_path / "r.json").read_text())["throughput"][0]["stages"]
    assert stages["text"]["jobs"] == 1


def test_lane_doubles_while_throughput_rises_and_settles_on_the_best():
    lane = og.Lane("m", "auto")
    clock = [0.0]

    def serve(slots, rounds):
        """rounds of requests at the lane's limit on a server with this many slots, 1 s each."""
        for _ in range(rounds):
            sent = [clock[0]] * lane.limit
            for _ in sent:
                lane.start(clock[0])
            for index, started in enumerate(sent):
                lane.finish(clock[0] + 1 + index // slots, asked=True, loaded=False, busy=False)
            clock[0] += 1 + (len(sent) - 1) // slots

    serve(4, 14)
    assert lane.limit == 4
    lane.start(clock[0])
    lane.finish(clock[0], asked=True, loaded=False, busy=True)  # 503: halve
    assert lane.limit == 2
    lane.start(clock[0])
    lane.finish(clock[0] + 1, asked=True, loaded=True, busy=False)  # a load: probe again
    clock[0] += 1
    serve(4, 10)
    assert lane.limit == 4
    serial = og.Lane("m", "auto")
    lane = serial
    serve(1, 10)
    assert lane.limit == 1
    fixed = og.Lane("m", 3)
    fixed.start(0.0)
    fixed.finish(1.0, asked=True, loaded=False, busy=True)
    assert (fixed.limit, fixed.auto, fixed.images) == (3, False, 1)
