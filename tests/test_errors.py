"""Every failure a user can hit: one error line, a hint, a documented exit code, no traceback."""

from __future__ import annotations

import pytest
from cli import run
from images import png_bytes
from traced import DESCRIPTION, TRAINING

import ollama_generate as og


def description_of(name):
    """A description of image `name` (the real ranges apply: captions must be in range)."""
    return f"Picture {name} seen. {DESCRIPTION}"


def caption_of(name):
    """An in-range training caption of image `name`, every concrete word in its description."""
    return f"Picture {name} seen. {TRAINING}"


@pytest.fixture
def dead_url(make_ollama):
    """The address of a server that has gone away: connections are refused."""
    server = make_ollama()
    url = server.url
    server.stop()
    return url


def test_unreachable_server_names_the_host_and_hints(capsys, monkeypatch, dead_url):
    monkeypatch.setenv("OLLAMA_HOST", dead_url)
    code, out, err = run(capsys, "prompt", "x")
    assert (code, out) == (3, "")
    first, second = err.splitlines()
    assert first.startswith(f"ollama-generate: error: cannot connect to Ollama at {dead_url} (")
    assert second == ("ollama-generate: hint: start it with `ollama serve`, "
                      "or set OLLAMA_HOST (or --host) to where it runs")
    assert "Traceback" not in err


def test_unreachable_server_fails_fast_without_retries(capsys, monkeypatch, dead_url):
    calls = []
    monkeypatch.setattr(og.time, "sleep", calls.append)
    assert run(capsys, "--host", dead_url, "lore", "x")[0] == 3
    assert calls == []


def test_unreachable_before_a_folder_run(capsys, tmp_path, dead_url):
    (tmp_path / "a.png").write_bytes(png_bytes())
    code, out, err = run(capsys, "caption", tmp_path, "--host", dead_url)
    assert (code, out) == (3, "")
    assert err.startswith(f"ollama-generate: error: cannot connect to Ollama at {dead_url}")
    assert not (tmp_path / "a.txt").exists()


def test_missing_text_model_hints_ollama_pull(ollama, capsys):
    code, out, err = run(capsys, "prompt", "x", "--model", "tinyllama")
    assert (code, out) == (4, "")
    assert err.splitlines() == [
        f"ollama-generate: error: model 'tinyllama' is not installed on {ollama.url}",
        "ollama-generate: hint: run `ollama pull tinyllama`",
    ]


@pytest.mark.parametrize("missing", ["vision", "text"])
def test_caption_checks_both_models_before_any_work(ollama, capsys, tmp_path, missing):
    (tmp_path / "a.png").write_bytes(png_bytes())
    flag = ["--vision-model", "llava:13b"] if missing == "vision" else ["--model", "phi4"]
    code, out, err = run(capsys, "caption", tmp_path, *flag)
    model = flag[1]
    assert (code, out) == (4, "")
    assert err.splitlines() == [
        f"ollama-generate: error: model '{model}' is not installed on {ollama.url}",
        f"ollama-generate: hint: run `ollama pull {model}`",
    ]
    assert ollama.generation_requests() == []


def test_vision_model_without_vision_is_refused_up_front(ollama, capsys, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    code, out, err = run(capsys, "caption", tmp_path / "a.png", "--vision-model", "qwen3-30b-a3b")
    assert (code, out) == (4, "")
    assert err.splitlines() == [
        "ollama-generate: error: the vision model 'qwen3-30b-a3b' cannot see images "
        "(its capabilities: completion, tools, thinking)",
        "ollama-generate: hint: pick a vision model with --vision-model or OLLAMA_VISION_MODEL, "
        "e.g. `ollama pull qwen3-vl:32b`",
    ]
    assert ollama.generation_requests() == []


def test_old_servers_without_capabilities_are_trusted(make_ollama, capsys, tmp_path, monkeypatch):
    server = make_ollama(show_capabilities=False)
    monkeypatch.setenv("OLLAMA_HOST", server.url)
    (tmp_path / "a.png").write_bytes(png_bytes())
    server.reply(DESCRIPTION, endpoint="/api/chat")
    server.reply(TRAINING[0].lower() + TRAINING[1:], endpoint="/api/generate")
    assert run(capsys, "caption", tmp_path / "a.png") == (0, TRAINING + "\n", "")
    assert len(server.requests_to("/api/generate")) == 1


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_server_errors_are_retried_then_succeed(ollama, capsys, status):
    ollama.reply(status=status, error="server busy, please try again.  maximum pending requests exceeded")
    ollama.reply(status=status, error="busy")
    ollama.reply("A fine prompt.")
    assert run(capsys, "prompt", "x") == (0, "A fine prompt.\n", "")
    assert len(ollama.generation_requests()) == 3


def test_retries_wait_longer_each_time(ollama, capsys, monkeypatch):
    waits = []
    monkeypatch.setattr(og.time, "sleep", waits.append)
    monkeypatch.setattr(og, "BACKOFF_SECONDS", 1.0)
    for _ in range(4):
        ollama.reply(status=503, error="busy")
    code, out, err = run(capsys, "prompt", "x")
    assert waits == [1.0, 2.0, 4.0]
    assert code == 1
    assert err == (f"ollama-generate: error: Ollama at {ollama.url} answered HTTP 503: busy "
                   "(gave up after 4 attempts)\n")
    assert len(ollama.generation_requests()) == 4


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ({"text": "A partial answer that breaks", "mid_stream": True, "error": "model runner has unexpectedly stopped"},
         "Ollama failed while answering: model runner has unexpectedly stopped"),
        ({"text": "A partial answer that ends early", "fault": "eof"},
         "the answer from Ollama at {url} stopped before it was complete"),
        ({"fault": "garbage"}, "Ollama at {url} sent something that is not JSON: '<html>oops"),
        ({"fault": "drop"}, "the connection to Ollama at {url} dropped"),
    ],
    ids=["mid-stream", "eof", "garbage", "drop"],
)
def test_broken_answers_are_retried_and_then_reported(ollama, capsys, reply, message):
    for _ in range(4):
        ollama.reply(**reply)
    code, out, err = run(capsys, "prompt", "x")
    assert (code, out) == (1, "")
    assert err.startswith("ollama-generate: error: " + message.format(url=ollama.url))
    assert err.rstrip("\n").endswith("(gave up after 4 attempts)")
    assert len(ollama.generation_requests()) == 4


def test_a_broken_answer_then_a_good_one(ollama, capsys):
    ollama.reply("half of it", mid_stream=True, error="runner crashed")
    ollama.reply("A whole prompt.")
    assert run(capsys, "prompt", "x") == (0, "A whole prompt.\n", "")


def test_a_stalled_server_times_out(ollama, capsys):
    ollama.reply("late", fault="stall", delay=2.0)
    ollama.reply("On time.")
    assert run(capsys, "prompt", "x", "--timeout", "0.3") == (0, "On time.\n", "")


def test_a_server_that_always_stalls_is_reported(ollama, capsys, monkeypatch):
    for _ in range(4):
        ollama.reply("late", fault="stall", delay=1.5)
    code, out, err = run(capsys, "prompt", "x", "--timeout", "0.2")
    assert (code, out) == (1, "")
    lines = err.splitlines()
    assert lines[0] in (
        f"ollama-generate: error: Ollama at {ollama.url} did not answer within 0.2 s (gave up after 4 attempts)",
        f"ollama-generate: error: Ollama at {ollama.url} stopped answering for 0.2 s (gave up after 4 attempts)",
    )
    assert lines[1].startswith("ollama-generate: hint: ")
    assert "--timeout" in lines[1]


def test_think_false_rejected_by_v0124_is_dropped_and_retried(ollama, capsys):
    ollama.reply(status=400, error="registry.ollama.ai/library/qwen3-30b-a3b:latest does not support thinking")
    ollama.reply("Works.")
    assert run(capsys, "prompt", "x") == (0, "Works.\n", "")
    first, second = ollama.generation_requests()
    assert first.body["think"] is False
    assert "think" not in second.body


def test_other_4xx_errors_are_reported_with_the_server_message(ollama, capsys):
    ollama.reply(status=400, error="invalid model name")
    code, out, err = run(capsys, "prompt", "x")
    assert (code, out) == (1, "")
    assert err == f"ollama-generate: error: Ollama at {ollama.url} refused the request (HTTP 400): invalid model name\n"
    assert len(ollama.generation_requests()) == 1


def test_empty_answer_after_thinking_says_why(ollama, capsys):
    # Only thinking, cut at the token limit: asked once more with 4x num_predict, then it fails
    # with an error that says the model thinks and suggests an -instruct tag.
    for _ in range(2):
        ollama.reply("<think>long reasoning", done_reason="length")
    code, out, err = run(capsys, "prompt", "x")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "ollama-generate: error: the model qwen3-30b-a3b:latest spent its whole answer thinking and wrote "
        "nothing, twice",
        "ollama-generate: hint: use a variant that does not think, such as an -instruct tag of qwen3-30b-a3b, "
        "or raise --max-tokens",
    ]
    asked = ollama.generation_requests()
    assert [r.body["options"]["num_predict"] for r in asked] == [400, 1600]
    assert all(r.body["think"] is False for r in asked)


def test_an_answer_after_thinking_on_the_larger_budget_is_used(ollama, capsys):
    ollama.reply("<think>long reasoning", done_reason="length")
    ollama.reply("A lighthouse on a cliff in a storm.")
    assert run(capsys, "prompt", "x") == (0, "A lighthouse on a cliff in a storm.\n", "")
    assert [r.body["options"]["num_predict"] for r in ollama.generation_requests()] == [400, 1600]


def test_server_dies_mid_folder_run_keeps_finished_work(make_ollama, capsys, tmp_path, monkeypatch):
    server = make_ollama()
    for seed, name in enumerate(["a.png", "b.png", "c.png"]):
        (tmp_path / name).write_bytes(png_bytes(seed=seed))
    for name in "abc":
        server.reply(description_of(name), endpoint="/api/chat")
    server.reply(caption_of("a"), endpoint="/api/generate")
    real_generate = og.OllamaClient.generate
    kills = []

    def generate_then_die(self, *args, **kwargs):
        answer = real_generate(self, *args, **kwargs)
        if not kills:
            kills.append(1)
            server.kill()
        return answer

    monkeypatch.setattr(og.OllamaClient, "generate", generate_then_die)
    code, out, err = run(capsys, "caption", tmp_path, "--host", server.url)
    assert (code, out) == (3, "")
    assert (tmp_path / "a.txt").read_text() == caption_of("a") + "\n"
    assert not (tmp_path / "b.txt").exists()
    lines = err.splitlines()
    assert lines[0] == "[1/3] a.png: written"
    assert lines[1].startswith("Stopped after ")
    assert lines[1].endswith(": 1 written, 0 skipped, 0 failed, 2 not reached (of 3 images).")
    assert lines[3].startswith(f"{server.url}: vision ")
    assert lines[4].startswith(f"ollama-generate: error: no Ollama server is left to work on ({server.url}: "
                               f"cannot connect to Ollama at {server.url}")
    assert lines[4].endswith("(gave up after 7 attempts))")
    assert lines[5] == ("ollama-generate: hint: start the servers again and rerun the same command: "
                        "finished work is kept")

    # The server comes back: the rerun asks the vision model nothing it answered before.
    server.restart()
    before = len(server.requests)
    server.reply(caption_of("b"), endpoint="/api/generate")
    server.reply(caption_of("c"), endpoint="/api/generate")
    assert run(capsys, "caption", tmp_path, "--host", server.url)[0] == 0
    rerun = server.requests[before:]
    assert [r.path for r in rerun if r.path == "/api/chat"] == []
    assert len([r for r in rerun if r.path == "/api/generate" and r.body.get("prompt")]) == 2
    assert (tmp_path / "b.txt").read_text() == caption_of("b") + "\n"
    assert (tmp_path / "c.txt").read_text() == caption_of("c") + "\n"
    assert (tmp_path / "a.txt").read_text() == caption_of("a") + "\n"


def test_ctrl_c_exits_130_and_leaves_no_partial_file(ollama, capsys, tmp_path, monkeypatch):
    for seed, name in enumerate(["a.png", "b.png"]):
        (tmp_path / name).write_bytes(png_bytes(seed=seed))
    ollama.reply("description a", endpoint="/api/chat")
    ollama.reply("caption a", endpoint="/api/generate")
    real_replace = og.os.replace

    def replace_then_interrupt(src, dst):
        if dst.endswith("b.txt"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(og.os, "replace", replace_then_interrupt)
    ollama.reply("description b", endpoint="/api/chat")
    ollama.reply("caption b", endpoint="/api/generate")
    code, out, err = run(capsys, "caption", tmp_path)
    assert (code, out) == (130, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ollama-generate", "a.png", "a.txt", "b.png"]
    assert ": 1 written, 0 skipped, 0 failed, 1 not reached (of 2 images)." in err
    assert err.endswith("\nollama-generate: interrupted\n")


def test_ctrl_c_during_a_text_command(ollama, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(og.OllamaClient, "generate", interrupted)
    assert run(capsys, "prompt", "x") == (130, "", "\nollama-generate: interrupted\n")


def test_a_bug_is_one_line_not_a_traceback(ollama, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(og, "text_command", broken)
    code, out, err = run(capsys, "prompt", "x")
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        "ollama-generate: error: internal error: ZeroDivisionError('division by zero')",
        "ollama-generate: hint: rerun with OLLAMA_GENERATE_DEBUG=1 and report the traceback",
    ]


def test_debug_variable_shows_the_traceback(ollama, monkeypatch):
    monkeypatch.setenv("OLLAMA_GENERATE_DEBUG", "1")
    with pytest.raises(og.ModelUnavailable):
        og.main(["prompt", "x", "-m", "missing-model"])


def test_write_failure_fails_that_image_only(ollama, capsys, tmp_path, monkeypatch):
    for seed, name in enumerate(["a.png", "b.png"]):
        (tmp_path / name).write_bytes(png_bytes(seed=seed))
    for name in "ab":
        ollama.reply(description_of(name), endpoint="/api/chat")
        ollama.reply(caption_of(name), endpoint="/api/generate")
    real = og.write_caption_file

    def disk_full(path, caption):
        if path.endswith("a.txt"):
            raise OSError(28, "No space left on device")
        real(path, caption)

    monkeypatch.setattr(og, "write_caption_file", disk_full)
    code, out, err = run(capsys, "caption", tmp_path)
    assert code == 1
    assert f"[1/2] a.png: failed: cannot write {tmp_path / 'a.txt'} (No space left on device)" in err
    assert (tmp_path / "b.txt").read_text() == caption_of("b") + "\n"
